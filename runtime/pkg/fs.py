"""The file-system moves a package transaction is made of: what is at a path (never following a link),
removing it, fsync, and the atomic swap of two trees."""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path


# Every store decision starts from this, because exists()/is_dir() follow links and call a dangling
# symlink "nothing there".
def path_kind(path: Path) -> str:
    """What is at `path`, never following a symlink: 'missing', 'dir', 'file', 'symlink' or 'other'
    (fifo, socket, device)."""
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def describe(path: Path) -> str:
    """What is at `path`, in words for an error message ("a symlink to X (dangling)")."""
    kind = path_kind(path)
    if kind == "symlink":
        target = os.readlink(path)
        return f"a symlink to {target}" + ("" if os.path.exists(path) else " (dangling)")
    return {"dir": "a directory", "file": "a file", "other": "a special file"}.get(kind, "missing")


def remove_any(path: Path) -> None:
    """Remove whatever is at `path` (a link is removed, never followed)."""
    if path_kind(path) == "dir":
        shutil.rmtree(path)
    elif path_kind(path) != "missing":
        path.unlink()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def tree_files(root: Path) -> list[str]:
    """Relative paths of the files and links under `root` (links to directories included, not entered)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            out.append(Path(dirpath, n).relative_to(root).as_posix())
    return out
