"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into one red line on stderr and exit code 2, never a traceback.
Anything else that escapes is a bug in cnncli and keeps its traceback.
"""

import difflib
from collections.abc import Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input: recipe, flags, paths or data."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for close matches of `name`, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""
