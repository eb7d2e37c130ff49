"""Atomic file writes: a temp file in the same folder, then a rename, so a reader (or a crash, a full
disk, a Stop) never leaves a half-written file, and a failed write leaves the old file intact.

Every file the trainer writes goes through :func:`temp_file` (directly or via :func:`atomic_write`), so
each gets the permissions a plain ``open()`` would give: ``0o666`` less the umask (``-rw-r--r--`` with
umask 022), or the mode of the file it replaces. ``tempfile.mkstemp`` alone makes ``-rw-------``, which
a Web-UI or ComfyUI running as another user cannot read."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (os.umask() sets it, which
    would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(path: Path | str) -> int:
    """The permission bits a new file at ``path`` gets: those of the file it replaces, else 0o666 & ~umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~current_umask()


def temp_file(path: Path | str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new temp file beside ``path``, with the permissions ``path`` will have."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, file_mode(path))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write(path: Path | str, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """Call write(tmp_path) and move the result onto path; on any failure remove the temp file.
    With ``overwrite=False`` an existing file (even one that appeared meanwhile) is never replaced:
    FileExistsError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _link_new(tmp: str, path: Path) -> None:
    """Move tmp onto a path that must not exist: a hard link is atomic and never clobbers."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
    except OSError:  # file systems without hard links
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def atomic_write_text(path: Path | str, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)
