"""The one exception type for mistakes a user can fix, and the faults of the environment that read alike.

The CLI turns a `UserError` into one red line on stderr and exit code 2, never a traceback.
A full disk, a read-only file system or a missing permission is no bug of cnncli either: `os_fault`
words it as one line too. Anything else that escapes is a bug in cnncli and keeps its traceback.
"""

import difflib
import errno
from collections.abc import Iterable

EXIT_USER_ERROR = 2

# errno values that describe the machine, not cnncli: each becomes one line naming the file
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error (a failing disk or a lost network file system?)",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "the name is too long",
}


class UserError(Exception):
    """A mistake in the user's input (recipe, flags, paths or data), or a fault of the machine it runs on."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for close matches of `name`, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def os_fault(e: BaseException, doing: str) -> UserError | None:
    """A UserError saying what failed and why, when `e` is an OSError of the environment (disk full,
    read-only, no permission, ...); None for any other exception (a bug keeps its traceback)."""
    if not isinstance(e, OSError) or e.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" ({e.filename})" if e.filename and str(e.filename) not in doing else ""
    return UserError(f"{doing}{where}: {ENVIRONMENT_ERRNOS[e.errno]}")


def is_disk_full(e: BaseException) -> bool:
    """An OSError or a storage-library error (TensorStore, Orbax) that reports a full disk or quota."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def brief(value, limit: int = 80) -> str:
    """A short repr of user input for a message: nesting, lists and strings are cut, so that a huge or
    self-referencing input (a YAML alias bomb) costs nothing to describe."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 4, 4, 4, 4
    short.maxstring = short.maxother = short.maxlong = 40
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
