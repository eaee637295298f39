"""User-facing errors: one line of what went wrong and one line of what to do about it."""

from __future__ import annotations


class GradselError(Exception):
    """A mistake the user can fix. The CLI prints it as `error:` plus `hint:` and exits 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def missing_extra(package: str, extra: str) -> GradselError:
    return GradselError(
        f"the optional dependency {package!r} is not installed",
        f"pip install 'gradsel[{extra}]'",
    )
