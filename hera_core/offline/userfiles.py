"""Files a user names on the command line (tasks, traces, votes): read whole, and a missing or
unreadable one is a one-line UsageError that says which, never a traceback."""

from __future__ import annotations

from pathlib import Path

from hera_core.errors import UsageError


def read_lines(path: str | Path, what: str, hint: str = "") -> list[str]:
    """The lines of the user's `what` file (e.g. "tasks file"); `hint` says how to make a missing one."""
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist{'; ' + hint if hint else ''}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} cannot be read ({exc})") from None
