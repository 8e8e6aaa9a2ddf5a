"""The exceptions mbuild raises for user mistakes, each carrying where the mistake is, and the
warnings it gives for what it ignores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """A place in a Mergefile: the file, a 1-based line, and the target it belongs to."""

    file: Path | None = None
    line: int | None = None
    target: str | None = None

    def __str__(self) -> str:
        where = str(self.file) if self.file else "<mergefile>"
        if self.line:
            where += f":{self.line}"
        if self.target:
            where += f": target '{self.target}'"
        return where


@dataclass(frozen=True)
class MergefileWarning:
    """Something a Mergefile says that mbuild ignores, as mergekit does, and where it is written."""

    message: str
    location: Location

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class MbuildError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""

    def __init__(self, message: str, location: Location | None = None):
        super().__init__(message)
        self.message = message
        self.location = location

    def __str__(self) -> str:
        if self.location is None:
            return self.message
        return f"{self.location}: {self.message}"


class MergefileError(MbuildError):
    """The Mergefile is malformed or asks for something impossible."""


class ModelError(MbuildError):
    """A source model is missing, unreadable, or does not fit the recipe."""


class BuildError(MbuildError):
    """A build step failed (non-finite values, a full disk, a broken input file)."""
