"""The output folders mbuild writes and owns: their manifest, files written in one step,
the lock a build holds, publishing a finished folder and cleaning up after a crashed one.

Apart from the modules that read models because sources are only ever read: this is where
mbuild writes, renames and removes on disk, bar the tensor data that `writer` lays out.
It knows nothing of tensors, so the model readers may ask it which files are its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

from mbuild import keys
from mbuild.errors import BuildError
from mbuild.io.files import read_small_file

MANIFEST_NAME = "mbuild.json"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """An output folder's mbuild manifest, or None if absent, unreadable or not mbuild's.

    Only a manifest of the shape mbuild writes counts (its version, key, tensors and files):
    any `mbuild.json` of the user's own (`{"theme": "dark"}`) does not make a folder mbuild's.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MANIFEST_LIMIT:
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    shape = {"mbuild": str, "target": str, "key": (str, type(None)), "tensors": dict, "files": dict}
    if not isinstance(data, dict) or any(not isinstance(data.get(k), kinds) for k, kinds in shape.items()):
        return None
    if not all(isinstance(entry, dict) for entry in (*data["tensors"].values(), *data["files"].values())):
        return None
    return data


# A manifest lists every tensor of a model: 64 MiB holds hundreds of thousands of entries.
MANIFEST_LIMIT = 64 * 1024 * 1024


def unlisted_entries(folder: Path, manifest: Mapping[str, Any]) -> list[str]:
    """What is in an output folder that its manifest does not list: what mbuild did not write there."""
    listed = set(manifest.get("files", {})) | {MANIFEST_NAME}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [name for name in names if name not in listed or not os.path.isfile(os.path.join(folder, name))]


def write_json(path: Path, data: Any) -> None:
    """Write JSON with a trailing newline, via a temporary file and rename."""
    replace_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def replace_text(path: Path, text: str) -> None:
    """Put ``text`` at ``path`` in one step: written to a new file of this process's, then renamed.

    The temporary is created, never opened if it exists, and never through a link: a file or
    link planted under its name (`Mergefile.lock.tmp` -> a user's file) is not written into.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(temporary) or temporary.is_file():
            temporary.unlink()  # a dead process's leftover under our name, or a planted link
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def store_text(folder: Path, text: str, suffix: str) -> Path:
    """Keep a text once under ``folder``, named by its digest; returns its path.

    ``folder`` is in the cache: where that cannot be written (a read-only or full disk), the
    text is kept in the system's temporary folder instead, so a build never fails for it.
    """
    name = keys.text_name(text) + suffix
    try:
        return _keep_text(Path(folder) / name, text)
    except OSError:
        return _keep_text(Path(tempfile.gettempdir()) / "mbuild-texts" / name, text)


def _keep_text(path: Path, text: str) -> Path:
    """``path``, written with ``text`` unless it holds it already (a damaged copy is written again)."""
    try:
        if read_small_file(path, error=OSError) == text.encode():
            return path
    except OSError:
        pass  # absent, or not a file of ours: written below
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, text)
    return path


class FileLock:
    """An exclusive flock on a lock file holding the holder's pid and host.

    The kernel releases it when the holder dies (even by kill -9), so a dead holder
    never blocks anyone; a live one is waited for, with ``on_wait`` told who it is.
    """

    def __init__(self, path: Path, on_wait=None):
        self.path = Path(path)
        self.on_wait = on_wait
        self.fd: int | None = None
        self.waited = False

    def __enter__(self) -> "FileLock":
        import fcntl
        import socket
        import stat

        # Never through a link: the holder's line is written into the file, and a link planted
        # here would have it truncate whatever it points at.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            advice = "remove it if it is not mbuild's" if os.path.lexists(self.path) else "its folder must be writable"
            raise BuildError(f"cannot use the lock file {self.path}: {error.strerror}; {advice}") from None
        details = os.fstat(self.fd)
        if not stat.S_ISREG(details.st_mode) or details.st_nlink > 1:
            os.close(self.fd)
            self.fd = None
            raise BuildError(f"the lock file {self.path} is not a plain file of mbuild's (a link?); remove it")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.waited = True
            if self.on_wait is not None:
                holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
                self.on_wait(f"waiting for {holder} (lock {self.path.name})")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError:
            pass  # a full disk: the line only tells a waiting process who holds the lock
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def target_lock(output: Path, on_wait=None) -> FileLock:
    """The lock a process holds while it decides and builds one target's output."""
    return FileLock(target_lock_file(output), on_wait)


def target_lock_file(output: Path) -> Path:
    """The file of `target_lock`, beside the output."""
    return output.parent / f".{output.name}.mbuild-lock"


def fsync_folder(folder: Path) -> None:
    """Flush every file of a folder, and the folder itself, to disk."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temporary: Path, output: Path) -> None:
    """Move a finished folder into place; the old output survives until the new one is there.

    Where the kernel can swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), the
    output path is never missing; elsewhere it is missing between two renames, and a crash
    there is undone by `recover` on the next run.
    """
    if output.exists() and _exchange(temporary, output):
        shutil.rmtree(temporary, ignore_errors=True)  # now the old output
        return
    retired = output.parent / f".{output.name}.mbuild-old-{os.getpid()}"
    if output.exists():
        os.rename(output, retired)
    os.rename(temporary, output)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the platform or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    import ctypes

    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not here; fall back to two renames
        return False
    raise OSError(errno, os.strerror(errno), str(second))


def _renameat2():
    """libc's renameat2 (glibc 2.28 and later), or None."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def leftovers(output: Path) -> list[Path]:
    """Temporaries and retired outputs beside ``output`` whose process is gone (a crashed build's)."""
    found = []
    for leftover in sorted(output.parent.glob(f".{output.name}.mbuild-*")):
        pid = leftover.name.rsplit("-", 1)[-1]
        if leftover.name.endswith("-lock") or not pid.isdigit():
            continue
        if process_alive(int(pid)) and int(pid) != os.getpid():
            continue
        found.append(leftover)
    return found


def recover(output: Path) -> list[Path]:
    """Undo a publish interrupted between its two renames, and drop dead temporaries; returns those dropped."""
    dropped = []
    for leftover in leftovers(output):
        if ".mbuild-old-" in leftover.name and not output.exists() and read_manifest(leftover):
            os.rename(leftover, output)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            dropped.append(leftover)
    return dropped


def process_alive(pid: int) -> bool:
    """Whether a process with this id is running (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fresh_temporary(output: Path) -> Path:
    """An empty hidden folder beside ``output`` for this process to build into."""
    temporary = output.parent / f".{output.name}.mbuild-tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    return temporary


def discard(folder: Path) -> None:
    """Remove a folder (a failed build's temporary) if it is there."""
    shutil.rmtree(folder, ignore_errors=True)


def write_companions(folder: Path, files, config, card: str) -> None:
    """Everything of an output folder but the weights: copied files, config.json, the model card."""
    for name, origin in files.items():
        shutil.copyfile(origin, folder / name)
    write_json(folder / "config.json", config)
    (folder / "README.md").write_text(card)
