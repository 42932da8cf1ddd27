"""Exceptions raised by planar3d.

Every error about user input names the offending file (or case) and the problem, so a batch job
can report it and move on to the next case.

The policy: library code raises these (never a bare ``ValueError``) for every problem a user can
cause and fix; the ``planar3d`` command catches them alone and prints one line. Anything else is
a bug and keeps its traceback. Messages name files and settings, not command-line flags.
"""

from __future__ import annotations

from pathlib import Path


class Planar3DError(Exception):
    """Base class of all errors raised on purpose by planar3d."""


class InputError(Planar3DError, ValueError):
    """A file or case given by the user cannot be used (also a ``ValueError``: a bad value).

    Args:
        source: the file path or case id the problem is about.
        problem: what is wrong, in words a user can act on.
    """

    def __init__(self, source: str | Path, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class WeightsError(InputError):
    """A weight file is missing, corrupted, fails its hash check or does not fit the model."""


class ConfigError(Planar3DError, ValueError):
    """A setting has an impossible value: a configuration or experiment file with unknown keys or
    values of the wrong type, or an argument out of range (also a ``ValueError``)."""
