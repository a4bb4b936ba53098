"""The errors that mean bad input or a run that cannot go on, shared by every layer (only the standard library here).

Each subclasses :class:`ReportedError`: its message names the file or key, the value and what was expected, so the
command line prints it in one or two lines instead of a traceback, also when a library (jsonargparse, a
DataLoader worker) wrapped it. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib

# Exceptions that mean the code is wrong, never the data: a per-sample handler lets them through.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    AttributeError,
    NameError,
    AssertionError,
    NotImplementedError,
    ImportError,
)


class ReportedError(Exception):
    """An error whose message is the whole story for the user (see the module docstring)."""


class ConfigError(ReportedError, ValueError):
    """A config value that cannot work: ``<section>.<key>: expected <what>, got <value>``."""


class DataError(ReportedError, OSError):
    """An unreadable input in strict mode, or a data set that cannot be read at all (names the file)."""


class MediaError(OSError):
    """One image or video that cannot be used (names the file): a data source skips and counts it as
    ``<reason>_<image|video>``."""

    reason: str = "unreadable"


class OversizedMediaError(MediaError):
    """An image over the pixel cap (a decompression bomb), refused before it is decoded."""

    reason = "oversized"


class CheckpointError(ReportedError, ValueError):
    """A checkpoint file that cannot be read: empty, truncated or not a checkpoint (names the file)."""


class ResumeError(ReportedError, FileNotFoundError):
    """``--ckpt_path last`` with no checkpoint to resume (says where it looked)."""


class TrainingFailed(ReportedError, RuntimeError):
    """A run that must not end as a success: no optimizer step, or too many samples skipped."""


def is_programming_error(error: BaseException) -> bool:
    """Whether ``error`` is a bug in the code rather than a problem with the data it read."""
    return isinstance(error, PROGRAMMING_ERRORS)


def reported_cause(error: BaseException) -> ReportedError | None:
    """The :class:`ReportedError` that ``error`` is or was raised from (``raise ... from``), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ReportedError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def one_line(error: BaseException) -> str:
    """The message of ``error`` without the traceback text a DataLoader worker wraps around it."""
    message = str(error).strip()
    if "Original Traceback" in message:  # torch re-raises a worker's error with its traceback in the message
        last = message.splitlines()[-1]
        name, sep, rest = last.partition(": ")
        message = rest if sep and name.rpartition(".")[2] == type(error).__name__ else last
    return message


def valid_choices(given: str, valid: list[str]) -> str:
    """``did you mean 'x'? valid choices: a, b, c`` for a name that is not among ``valid``."""
    close = difflib.get_close_matches(given, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}valid choices: {', '.join(valid)}"


def listed_problems(*problems: tuple[str, list[str]], shown: int = 5) -> str:
    """``label (count): [the first few]; ...`` for each non-empty list of ``(label, items)``: how a weights file
    and a model differ (missing, unexpected or mis-shaped keys), in one line."""
    return "; ".join(f"{label} ({len(items)}): {items[:shown]}" for label, items in problems if items)
