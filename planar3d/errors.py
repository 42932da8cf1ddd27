"""Exceptions raised by planar3d.

Every error about user input names the offending file (or case) and the problem, so a batch job
can report it and move on to the next case.

The policy: library code raises these (never a bare ``ValueError``) for every problem a user can
cause and fix; the ``planar3d`` command catches them alone and prints one line. Anything else is
a bug and keeps its traceback. Messages name files and settings, not command-line flags.
"""

from __future__ import annotations

from pathlib import Path

from planar3d.naming import display_path


class Planar3DError(Exception):
    """Base class of all errors raised on purpose by planar3d."""


class InputError(Planar3DError, ValueError):
    """A file or case given by the user cannot be used (also a ``ValueError``: a bad value).

    Args:
        source: the file path or case id the problem is about.
        problem: what is wrong, in words a user can act on.
    """

    def __init__(self, source: str | Path, problem: str):
        self.source = display_path(source)  # a file name may hold a newline: one line per error
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class WeightsError(InputError):
    """A weight file is missing, corrupted, fails its hash check or does not fit the model."""


class ConfigError(Planar3DError, ValueError):
    """A setting has an impossible value: a configuration or experiment file with unknown keys or
    values of the wrong type, or an argument out of range (also a ``ValueError``)."""


class TrainingError(Planar3DError):
    """Training cannot go on meaningfully, e.g. the loss became NaN or infinite."""


class SummaryWriteError(Planar3DError):
    """A batch finished but its summary could not be written (full disk, folder gone...).

    Args:
        path: the summary file.
        problem: why it could not be written.
        summary: the batch's results, so that a caller can still print them.
    """

    def __init__(self, path: str | Path, problem: str, summary: object):
        self.summary = summary
        super().__init__(f"{display_path(path)}: {problem}")
