"""User-facing errors.

Anything the user can fix (a wrong path, a corrupt file, mismatched shapes) raises :class:`MedsegError`
with a message naming the file and the problem. The CLI prints it as one line and exits non-zero;
the model server turns it into a 4xx answer.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """An error caused by the input, with a message meant for a person."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ValidationError(MedsegError):
    """A dataset or a file failed validation. ``problems`` lists (case, file, problem) rows."""

    def __init__(self, message: str, problems: list[tuple[str, str, str]] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            rows = "\n".join(f"  {c} | {f} | {p}" for c, f, p in self.problems)
            message = f"{message}\n  case | file | problem\n{rows}"
        super().__init__(message)
