"""How often Backrest checks a repository, and so how old its off-site copy may get.

The mirror runs after each Backrest check, and Backrest's default check is monthly: a fixed
26 h staleness window would alarm every day and teach users to ignore it. The window is the
longest gap between two scheduled checks plus slack (docs/notifications.md). Only the cron
subset Backrest's schedules use is understood; anything else (`L`, `W`, `#`) falls back to
the configured `max_age`. The longest gap is found by walking nine years of calendar.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta

#: Backrest's default check schedule (a new repository's checkPolicy).
BACKREST_DEFAULT_CRON = "0 0 1 * *"
SLACK_MIN = timedelta(hours=2)
SLACK_SHARE = 0.10
#: Checks further apart than this are "less often than daily" for doctor and hook-snippet.
DAILY = timedelta(hours=25)

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {
    name: i + 1
    for i, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}
_DAYS = {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_SPAN_START = date(2024, 1, 1)
_SPAN_DAYS = (date(2033, 1, 1) - _SPAN_START).days


class CronError(ValueError):
    """A cron expression this parser does not understand (the message says why)."""


def _field(text: str, low: int, high: int, names: Mapping[str, int]) -> set[int]:
    values: set[int] = set()
    for part in text.lower().split(","):
        if not part:
            raise CronError(f"empty list item in {text!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"bad step in {part!r}")
            step = int(step_text)
        if base in ("*", "?"):
            start, end = low, high
        else:
            first, dash, last = base.partition("-")
            start = _value(first, names, low, high)
            end = _value(last, names, low, high) if dash else (high if slash else start)
            if end < start:
                raise CronError(f"range {part!r} runs backwards")
        values.update(range(start, end + 1, step))
    return values


def _value(text: str, names: Mapping[str, int], low: int, high: int) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise CronError(f"{text!r} is not a number or a name this parser knows")
    value = int(text)
    if high == 7 and value == 7:  # day of week: 7 is Sunday too
        return 0
    if not low <= value <= high:
        raise CronError(f"{value} is outside {low}-{high}")
    return value


@dataclass(frozen=True)
class CronSchedule:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    def runs_on(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow


def parse_cron(expression: str) -> CronSchedule:
    text = _MACROS.get(expression.strip().lower(), expression.strip())
    fields = text.split()
    if len(fields) == 6 and fields[5] in ("*", "?"):
        fields = fields[:5]  # a year field that allows every year
    if len(fields) != 5:
        raise CronError(f"cron {expression!r}: expected 5 fields, found {len(fields)}")
    minute, hour, dom, month, dow = fields
    if re.search(r"[lw#]", (dom + dow).lower()):
        raise CronError(f"cron {expression!r}: L, W and # are not supported here")
    return CronSchedule(
        minutes=frozenset(_field(minute, 0, 59, {})),
        hours=frozenset(_field(hour, 0, 23, {})),
        days=frozenset(_field(dom, 1, 31, {})),
        months=frozenset(_field(month, 1, 12, _MONTHS)),
        weekdays=frozenset(_field(dow, 0, 7, _DAYS)),
        days_restricted=dom not in ("*", "?"),
        weekdays_restricted=dow not in ("*", "?"),
    )


def cron_interval(expression: str) -> timedelta:
    """The longest time between two consecutive runs of the cron schedule."""
    schedule = parse_cron(expression)
    times = sorted(h * 60 + m for h in schedule.hours for m in schedule.minutes)
    within_day = max((b - a for a, b in itertools.pairwise(times)), default=0)
    longest = within_day
    previous_last: int | None = None  # absolute minute of the last run of the last run day
    runs = 0
    for offset in range(_SPAN_DAYS):
        if not schedule.runs_on(_SPAN_START + timedelta(days=offset)):
            continue
        runs += 1
        base = offset * 1440
        if previous_last is not None:
            longest = max(longest, base + times[0] - previous_last)
        previous_last = base + times[-1]
    if runs < 2:
        raise CronError(f"cron {expression!r} runs less than twice in nine years")
    return timedelta(minutes=longest)


@dataclass(frozen=True)
class CheckCadence:
    """How often Backrest checks a repository; `interval` None: never (disabled)."""

    interval: timedelta | None
    source: str

    @property
    def window(self) -> timedelta | None:
        """The staleness window this cadence implies (interval + slack)."""
        if self.interval is None:
            return None
        return self.interval + max(SLACK_MIN, self.interval * SLACK_SHARE)

    @property
    def less_than_daily(self) -> bool:
        return self.interval is None or self.interval > DAILY


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isdigit():  # protojson may quote integers
        return int(value) or None
    return None


def cadence_of(schedule: Mapping[str, object] | None) -> CheckCadence:
    """The cadence of a `checkPolicy.schedule` (None or empty: Backrest's monthly default).

    Raises CronError for a cron string this parser does not understand.
    """
    if not schedule:
        interval = cron_interval(BACKREST_DEFAULT_CRON)
        return CheckCadence(
            interval, f"Backrest's default check schedule {BACKREST_DEFAULT_CRON!r}"
        )
    if schedule.get("disabled") is True:
        return CheckCadence(None, "checks disabled")
    cron = schedule.get("cron")
    if isinstance(cron, str) and cron.strip():
        return CheckCadence(cron_interval(cron), f"check schedule cron {cron.strip()!r}")
    days = _positive_int(schedule.get("maxFrequencyDays"))
    if days:
        return CheckCadence(timedelta(days=days), f"check schedule every {days} day(s)")
    hours = _positive_int(schedule.get("maxFrequencyHours"))
    if hours:
        return CheckCadence(timedelta(hours=hours), f"check schedule every {hours} hour(s)")
    interval = cron_interval(BACKREST_DEFAULT_CRON)
    return CheckCadence(interval, f"Backrest's default check schedule {BACKREST_DEFAULT_CRON!r}")


def describe_interval(interval: timedelta) -> str:
    hours = interval.total_seconds() / 3600
    if hours < 1:
        return f"{interval.total_seconds() / 60:.0f} min"
    if hours < 48:
        return f"{hours:.0f} h" if hours == int(hours) else f"{hours:.1f} h"
    days = hours / 24
    return f"{days:.0f} days" if days == int(days) else f"{days:.1f} days"


def cadence_advice(repo_id: str, cadence: CheckCadence) -> str | None:
    """What doctor and hook-snippet say when checks run less often than daily, else None."""
    how = (
        f"in Backrest open Repositories > {repo_id} > Edit > Check Policy and set the schedule "
        "to daily (e.g. cron '0 3 * * *') with 'structure only' — a structure-only check reads "
        "no pack data, so it is cheap"
    )
    if cadence.interval is None:
        return (
            f"Backrest never checks {repo_id} ({cadence.source}), so the hook never runs and "
            f"nothing is mirrored; {how}"
        )
    if not cadence.less_than_daily:
        return None
    window = cadence.window
    assert window is not None
    return (
        f"Backrest checks {repo_id} only every {describe_interval(cadence.interval)} "
        f"({cadence.source}); the off-site copy is refreshed after each check, so it can be "
        f"that old, and the silence alarm allows {describe_interval(window)}. For a daily "
        f"copy, {how}"
    )


def schedule_note(repo_id: str) -> tuple[bool | None, str] | None:
    """(ok, text) about the repository's check schedule from Backrest's config here, or None
    when this host has no readable Backrest config. ok None: a warning."""
    from local_agent.backrest import lookup_backrest_repo
    from local_agent.errors import RelayError

    try:
        found = lookup_backrest_repo(repo_id)
    except RelayError:
        return None  # the repository check reports an unreadable or mismatched config
    if found is None:
        return None
    try:
        cadence = cadence_of(found.check_schedule)
    except CronError as exc:
        return None, f"{exc}; the silence alarm uses notify.max_age for {repo_id}"
    advice = cadence_advice(repo_id, cadence)
    if advice is not None:
        return None, advice
    assert cadence.interval is not None and cadence.window is not None
    return True, (
        f"Backrest checks {repo_id} every {describe_interval(cadence.interval)} "
        f"({cadence.source}); the silence alarm allows {describe_interval(cadence.window)}"
    )
