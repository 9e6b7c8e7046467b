"""What every pkg verb shares: its settings (system.toml, models_dir, registry, trusted keys, board), the
registry it opens, and the rule that a disk error becomes one line, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..config import SystemConfig, load_system
from ..errors import HublabError
from ..engine.profiles import Profile, resolve_profile
from .registry import Registry, default_registry_dir, open_registry


class PackageError(HublabError):
    """A package operation cannot go ahead; nothing was changed."""


# What to do about an OS error a verb meets on disk (store state, a full disk, a read-only card).
OS_FIX = {
    errno.ENOSPC: "the disk is full: free some space (hublab pkg remove NAME) and run it again; a partial "
                  "download is kept in .hublab/blobs and resumes",
    errno.EDQUOT: "the disk quota is used up: free some space and run it again",
    errno.EROFS: "the file system is read-only: remount it read-write",
    errno.EACCES: "permission denied: run as the user that owns it, or fix its permissions",
    errno.EPERM: "not permitted: run as the user that owns it, or fix its permissions",
    errno.ENAMETOOLONG: "the path is too long for the file system: use a shorter models_dir or name",
    errno.EXDEV: "it is on another file system than models_dir/.hublab: keep both on one file system",
    errno.EIO: "the disk reported an I/O error: check the card or disk",
}


def one_line_errors(verb: str):
    """Every verb's last line of defence: an OSError from the disk becomes one PackageError line that
    names the path and the fix, never a traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                fix = OS_FIX.get(exc.errno, "something unexpected is at that path: move it away and run "
                                            "hublab pkg verify")
                msg = f"{where}{exc.strerror or exc.__class__.__name__} while {verb}; {fix}"
                raise PackageError(" ".join(msg.split())) from None
        return inner
    return wrap


@dataclass
class Context:
    system: SystemConfig
    models_dir: Path
    registry: str
    trusted: list[str]
    profile_arg: Profile | str | None = None

    @property
    def profile(self) -> Profile:
        if isinstance(self.profile_arg, Profile):
            return self.profile_arg
        return resolve_profile(self.profile_arg, self.system.profile)


def context(config: str | Path | None = None, models_dir: str | Path | None = None,
            registry: str | Path | None = None, profile: Profile | str | None = None,
            trusted_keys: list[str] | None = None) -> Context:
    """The settings a verb runs with: each argument given, else system.toml's value, else the default."""
    system = load_system(Path(config) if config else None)
    if registry is None:
        url = str((system.raw.get("registry") or {}).get("url", "") or "")
        if url and "://" not in url and not os.path.isabs(os.path.expanduser(url)) and system.path:
            url = str(system.path.parent / url)
        registry = url or str(default_registry_dir())
    return Context(system=system, models_dir=Path(models_dir) if models_dir else system.models_dir,
                   registry=str(registry), trusted=list(system.trusted_keys if trusted_keys is None else trusted_keys),
                   profile_arg=profile)


def configured_registry(config: str | Path | None = None) -> str:
    """The registry the verbs use when given none: system.toml [registry] url (a relative path is read from
    system.toml's folder), else ~/.local/share/hublab/registry."""
    return context(config).registry


@contextlib.contextmanager
def opened(location: str) -> Iterator[Registry]:
    """The registry at `location`, closed when the block ends."""
    reg = open_registry(location)
    try:
        yield reg
    finally:
        reg.close()
