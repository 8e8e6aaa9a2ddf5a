"""Reading the files a user hands mbuild: regular files only, whole ones bounded in size,
and positioned reads that fill a buffer.

Every other part of `mbuild.io` reads through these, so a FIFO, a device or an oversized
file is refused in one place. It is the bottom of the package: it imports nothing of it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from mbuild.errors import ModelError

# What mbuild reads whole from a model folder (config.json, an index, tokenizer_config.json)
# is a few MB at most: the index of a 400B model is about 2 MB.
SMALL_FILE_LIMIT = 64 * 1024 * 1024


def open_regular(path: str | Path, error: type[Exception] = ModelError) -> tuple[int, int]:
    """Open a file for reading; returns its descriptor and size, or raises ``error`` if it is not a regular file.

    Links are followed (a hub snapshot's files are links to blobs). The open does not block,
    so a FIFO with no writer is refused here instead of waited on forever, and a device such
    as /dev/zero is never read without end. OSError (a missing file) passes through.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    details = os.fstat(fd)
    if not stat.S_ISREG(details.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(details.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{path} is {kind}, where mbuild expects a file")
    return fd, details.st_size


def read_small_file(path: str | Path, limit: int = SMALL_FILE_LIMIT, error: type[Exception] = ModelError) -> bytes:
    """The bytes of a file mbuild reads whole (a config, an index), refused past ``limit`` bytes.

    FileNotFoundError passes through, for callers that have their own words for a missing file.
    """
    try:
        fd, _ = open_regular(path, error)
    except FileNotFoundError:
        raise
    except OSError as problem:
        raise error(f"cannot read {path}: {problem.strerror}") from None
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as problem:
        raise error(f"cannot read {path}: {problem.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{path} is larger than {limit // (1024 * 1024)} MiB: too large for a file mbuild reads whole")
    return data


def read_small_json(path: str | Path, limit: int = SMALL_FILE_LIMIT, error: type[Exception] = ModelError) -> dict:
    """A JSON object read as ``read_small_file`` reads (every such file mbuild reads holds an object)."""
    data = read_small_file(path, limit, error)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not valid JSON: {problem}") from None
    except RecursionError:
        raise error(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def advise(fd: int, offset: int, length: int, advice: str) -> None:
    """posix_fadvise (``advice``: its name in `os`) where the system has it; advice only, so a
    failure is ignored. On dirty pages, POSIX_FADV_DONTNEED starts their write-back."""
    if hasattr(os, "posix_fadvise") and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, getattr(os, advice))
        except OSError:
            pass


def write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the bytes read (fewer only at end of file)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done
