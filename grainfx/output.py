"""Write an output folder all at once: the previous folder or the new one, never a mix.

The files are written into a hidden temporary folder beside the target, given the permissions
the user's umask gives (``tempfile`` creates them private), then swapped with the target in
one ``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere two renames) or renamed into place.
A crash, a full disk or a ``kill -9`` before the swap leaves the previous folder as it was;
the temporary folder a ``kill -9`` leaves behind goes at the next successful write.
:func:`locked` lets one process at a time write a folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

#: renameat2 arguments: paths relative to the working directory; swap the two names.
AT_FDCWD, RENAME_EXCHANGE = -100, 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_permissions(*paths: str | os.PathLike[str]) -> None:
    """Give each file, and each folder and everything in it, the modes a plain ``open`` /
    ``mkdir`` would (``tempfile`` creates them readable by their owner only)."""
    mask = _umask()
    for path in paths:
        if not os.path.isdir(path):
            os.chmod(path, 0o666 & ~mask)
            continue
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _exchange(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` (both exist) atomically where the system can."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(b))
    backup = a.with_name(a.name + ".previous")
    os.rename(b, backup)
    os.rename(a, b)
    os.rename(backup, a)


def write_folder(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(folder)`` on a temporary folder beside ``out``, then put it in ``out``'s
    place (replacing a previous ``out``). Any error leaves ``out`` as it was and removes the
    temporary folder. Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        open_permissions(tmp)
        if out.exists():
            _exchange(tmp, out)  # tmp now holds the previous output
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(out)
    return out


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders of earlier writes of ``out`` that were killed."""
    name = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}")
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if name.fullmatch(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


class FolderLocked(OSError):
    """Another process holds the lock of an output folder; ``pid`` is its process id (None
    when it has not written it yet)."""

    def __init__(self, out: Path, pid: int | None) -> None:
        super().__init__(f"{out} is locked by process {pid}")
        self.out, self.pid = out, pid


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of ``out``: ``.NAME.lock`` in its parent folder (whose symbolic links
    are resolved, so that every spelling of one folder names one lock)."""
    out = Path(os.path.abspath(out))
    return out.parent.resolve() / f".{out.name}.lock"


@contextlib.contextmanager
def locked(out: str | os.PathLike) -> Iterator[Path]:
    """Within: this process alone writes ``out`` (an ``flock`` on :func:`lock_path`, which
    holds the holder's pid). Raises :class:`FolderLocked` at once when another process holds
    it. The lock file, and the parent folders created for it, are removed on the way out;
    one that a ``kill -9`` leaves behind is taken over by the next run (its lock died with
    the process)."""
    path = lock_path(out)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # a run that just gave it up removed the folder
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise FolderLocked(Path(out), int(text) if text.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file locked is still the one at ``path`` (not one a leaving run removed)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the lock goes, so no one locks a removed file
        os.close(fd)
        for folder in created:  # the deepest first; those that hold something stay
            try:
                folder.rmdir()
            except OSError:
                break
