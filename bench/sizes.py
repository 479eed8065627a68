"""How big each scenario is: issue 8's sizes, scaled down for `--quick` or a slow machine."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6")
QUICK_SCALE = 0.05  # ~20x smaller


@dataclass(frozen=True)
class Sizes:
    """Sizes at scale 1 are the ones issue 8 names."""

    s1_bytes: int = 1 * GiB  # of ~16 MiB packs
    s1_pack_size: int = 16 * MiB
    s1_small_files: int = 2_000
    s1_small_size: tuple[int, int] = (2 * KiB, 64 * KiB)
    s2_files: int = 20_000
    small_size: int = 4 * KiB  # S2, S3-S6 files
    big_files: int = 100_000  # S3, S4, S5
    s4_percent: float = 1.0
    s6_files: tuple[int, ...] = (10_000, 100_000, 300_000)
    scale: dict[str, float] = field(default_factory=dict)  # scenario -> factor (1 = full)

    @property
    def s1_packs(self) -> int:
        return max(1, round(self.s1_bytes / self.s1_pack_size))

    @property
    def s4_new_files(self) -> int:
        return max(1, math.ceil(self.big_files * self.s4_percent / 100))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sizes:
        return cls(
            **{
                **d,
                "s1_small_size": tuple(d["s1_small_size"]),
                "s6_files": tuple(d["s6_files"]),
            }
        )

    def factor(self, scenario: str) -> float:
        return self.scale.get(scenario, 1.0)

    def scaled(self, factors: dict[str, float]) -> Sizes:
        """These sizes with each scenario's counts multiplied by its factor.

        S3, S4 and S5 share one repository, so they share the smallest of their factors.
        """

        def n(count: int, f: float, low: int = 1) -> int:
            return max(low, round(count * f))

        big = min(factors.get(s, 1.0) for s in ("S3", "S4", "S5"))
        f1, f2, f6 = (factors.get(s, 1.0) for s in ("S1", "S2", "S6"))
        return replace(
            self,
            s1_bytes=n(self.s1_bytes, f1, self.s1_pack_size),
            s1_small_files=n(self.s1_small_files, f1, 10),
            s2_files=n(self.s2_files, f2, 50),
            big_files=n(self.big_files, big, 100),
            s6_files=tuple(n(c, f6, 50) for c in self.s6_files),
            scale={
                **{s: factors.get(s, 1.0) for s in SCENARIOS},
                **dict.fromkeys(("S3", "S4", "S5"), big),
            },
        )

    def is_full(self) -> bool:
        return all(self.factor(s) >= 1.0 for s in SCENARIOS)

    def describe(self, scenario: str) -> str:
        """The size of a scenario in words, as the report shows it."""
        if scenario == "S1":
            return (
                f"full mirror of {self.s1_packs} packs of ~{self.s1_pack_size // MiB} MiB "
                f"({self.s1_packs * self.s1_pack_size / GiB:.2f} GiB) plus "
                f"{self.s1_small_files:,} small files of "
                f"{self.s1_small_size[0] // KiB}-{self.s1_small_size[1] // KiB} KiB"
            )
        if scenario == "S2":
            return f"full mirror of {self.s2_files:,} files of {self.small_size // KiB} KiB"
        if scenario == "S3":
            return f"run with nothing new over a {self.big_files:,}-file repository"
        if scenario == "S4":
            return (
                f"incremental: +{self.s4_percent:g} % new files ({self.s4_new_files:,} "
                f"of {self.small_size // KiB} KiB) on the {self.big_files:,}-file repository"
            )
        if scenario == "S5":
            return f"verification of the ~{self.big_files:,}-object mirror of S3/S4"
        if scenario == "S6":
            counts = ", ".join(f"{c:,}" for c in self.s6_files)
            return f"peak RSS of a full-mirror upload (and verify) at {counts} files"
        raise ValueError(scenario)
