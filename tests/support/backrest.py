"""What Backrest does with a command hook, re-implemented for tests.

``render_backrest_template`` renders the subset of Go ``text/template`` that our snippets use,
with Backrest's ``HookVars`` semantics; anything outside that subset raises
:class:`TemplateError` so a test can never pass because the renderer silently skipped something.
``backrest_shell`` splits off a ``#!`` line the way Backrest's command hook does.

Sources (garethgeorge/backrest): ``internal/hook/types/command.go`` (render, then ``sh`` with
the script on stdin; a ``#!`` first line picks the interpreter), ``internal/orchestrator/tasks/
hookvars.go`` (``HookVars``; ``ShellEscape`` = ``shellescape.Quote``), alessio/shellescape
``shellescape.go`` (the quoting algorithm), Go ``text/template`` (lexing, trim markers,
``validateType``: a method argument of the wrong Go type is an execution error).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

__all__ = ["TemplateError", "backrest_shell", "render_backrest_template", "shell_escape"]


class TemplateError(ValueError):
    """The template would fail in Backrest, or uses syntax this re-implementation lacks."""


# shellescape.Quote: `[^\w@%+=:,./-]` with Go RE2 semantics, where \w is ASCII-only.
_UNSAFE = re.compile(r"[^A-Za-z0-9_@%+=:,./-]")


def shell_escape(value: str) -> str:
    """Backrest's ``.ShellEscape`` (alessio/shellescape ``Quote``), byte for byte."""
    if not value:
        return "''"
    if _UNSAFE.search(value):
        return "'" + value.replace("'", "'\"'\"'") + "'"
    return value


@dataclass(frozen=True)
class _Value:
    """A template value with the Go type it has in Backrest's HookVars."""

    text: str
    go_type: str  # "string" or "v1.Hook_Condition"


_SPACE = " \t\r\n"
_FIELD = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_RAW_STRING = re.compile(r"`([^`]*)`")
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_CONDITION = re.compile(r"CONDITION_[A-Z_]+")


def render_backrest_template(
    template: str,
    *,
    repo_id: str,
    repo_uri: str,
    repo_guid: str,
    event: str,
    error: str = "",
) -> str:
    """Render ``template`` as Backrest would for a repository hook.

    Supported: literal text; actions ``{{ FIELD }}``, ``{{ "string" }}`` and
    ``{{ .ShellEscape ARG }}`` (ARG a field or string literal) with optional ``{{-``/``-}}``
    trim markers. Fields: ``.Repo.Id``, ``.Repo.Uri``, ``.Repo.Guid``, ``.Event`` (Go type
    ``v1.Hook_Condition``, prints its enum name) and ``.Error``. Everything else, including
    other Backrest fields such as ``.Repo.Password``, raises :class:`TemplateError`.
    """
    if not _CONDITION.fullmatch(event):
        raise TemplateError(f"{event!r} is not a Hook_Condition enum name")
    fields = {
        ".Repo.Id": _Value(repo_id, "string"),
        ".Repo.Uri": _Value(repo_uri, "string"),
        ".Repo.Guid": _Value(repo_guid, "string"),
        ".Event": _Value(event, "v1.Hook_Condition"),
        ".Error": _Value(error, "string"),
    }
    out: list[str] = []
    pos = 0
    trim_next = False
    while True:
        start = template.find("{{", pos)
        text = template[pos:] if start < 0 else template[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            out.append(text)
            return "".join(out)
        inner_start = start + 2
        marker = template[inner_start : inner_start + 2]
        if len(marker) == 2 and marker[0] == "-" and marker[1] in _SPACE:  # "{{- "
            text = text.rstrip(_SPACE)
            inner_start += 2
        out.append(text)
        tokens, pos, trim_next = _lex_action(template, inner_start)
        out.append(_evaluate(tokens, fields))


def _lex_action(template: str, pos: int) -> tuple[list[str | _Value], int, bool]:
    """Tokens of one action (field names as ``str``, literals as ``_Value``), end, right trim."""
    tokens: list[str | _Value] = []
    while True:
        spaced = pos < len(template) and template[pos] in _SPACE
        while pos < len(template) and template[pos] in _SPACE:
            pos += 1
        if spaced and template.startswith("-}}", pos):
            return tokens, pos + 3, True
        if template.startswith("}}", pos):
            return tokens, pos + 2, False
        if pos >= len(template):
            raise TemplateError("unclosed action: missing '}}'")
        if tokens and not spaced:
            raise TemplateError(f"unsupported template syntax at {template[pos : pos + 20]!r}")
        char = template[pos]
        if char == ".":
            match = _FIELD.match(template, pos)
            if match is None:
                raise TemplateError(f"unsupported template syntax at {template[pos : pos + 20]!r}")
            tokens.append(match.group(0))
            pos = match.end()
        elif char == '"':
            value, pos = _interpreted_string(template, pos)
            tokens.append(_Value(value, "string"))
        elif char == "`":
            raw = _RAW_STRING.match(template, pos)
            if raw is None or "\r" in raw.group(1):
                raise TemplateError("unterminated or unsupported raw string")
            tokens.append(_Value(raw.group(1), "string"))
            pos = raw.end()
        else:
            raise TemplateError(f"unsupported template syntax at {template[pos : pos + 20]!r}")


def _interpreted_string(template: str, pos: int) -> tuple[str, int]:
    """A Go ``"..."`` literal starting at ``pos``: its value and the index after it."""
    chars: list[str] = []
    i = pos + 1
    while i < len(template):
        char = template[i]
        if char == '"':
            return "".join(chars), i + 1
        if char == "\n":
            break
        if char != "\\":
            chars.append(char)
            i += 1
            continue
        escape = template[i + 1 : i + 2]
        if escape in _SIMPLE_ESCAPES:
            chars.append(_SIMPLE_ESCAPES[escape])
            i += 2
        elif escape in _HEX_ESCAPES:
            digits = template[i + 2 : i + 2 + _HEX_ESCAPES[escape]]
            if len(digits) != _HEX_ESCAPES[escape] or not all(
                d in "0123456789abcdefABCDEF" for d in digits
            ):
                raise TemplateError(f"bad \\{escape} escape in string literal")
            if escape == "x" and int(digits, 16) > 0x7F:  # a byte, not a character
                raise TemplateError("non-ASCII \\x escape is not supported")
            chars.append(chr(int(digits, 16)))
            i += 2 + len(digits)
        else:
            raise TemplateError(f"unsupported escape \\{escape} in string literal")
    raise TemplateError("unterminated string literal")


def _evaluate(tokens: list[str | _Value], fields: dict[str, _Value]) -> str:
    if not tokens:
        raise TemplateError("missing value for command")
    head, args = tokens[0], tokens[1:]
    if head == ".ShellEscape":
        if len(args) != 1:
            raise TemplateError(f"wrong number of args for ShellEscape: want 1 got {len(args)}")
        value = _resolve(args[0], fields)
        if value.go_type != "string":
            raise TemplateError(f"wrong type for value; expected string; got {value.go_type}")
        return shell_escape(value.text)
    if args:
        raise TemplateError(f"unsupported command with arguments: {head!r}")
    return _resolve(head, fields).text


def _resolve(token: str | _Value, fields: dict[str, _Value]) -> _Value:
    if isinstance(token, _Value):
        return token
    try:
        return fields[token]
    except KeyError:
        raise TemplateError(f"unsupported or unknown field {token}") from None


def backrest_shell(script: str) -> tuple[list[str], str]:
    """The interpreter argv and stdin text Backrest uses for a rendered script (POSIX).

    ``sh`` with the whole script, unless the script starts with ``#!``: then that line (split
    with shell-like rules; Backrest uses google/shlex, which :func:`shlex.split` matches for
    simple lines) is the interpreter and the rest of the script is its stdin.
    """
    if len(script) > 2 and script.startswith("#!"):
        end = script.find("\n")
        if end < 0:
            end = len(script)
        argv = shlex.split(script[2:end].strip(" "))
        if not argv:
            raise TemplateError("must specify shell for command")
        return argv, script[end + 1 :]
    return ["sh"], script
