"""`hublab pkg`: build, sign, publish, install, verify, remove, list, search, show and update model packages.

Every verb is also a function with the same arguments (`install("python-expert:1.0", registry=...)`)
that returns plain data; only `cli()` prints.

Where packages land (all under the runtime's models_dir, which it scans recursively for model TOMLs):

    <models_dir>/packages/<name>/   base models and bundles
    <models_dir>/experts/<name>/    experts
    <models_dir>/router/            the router package (the runtime's default router directory)
    <models_dir>/.hublab/           lock, staging trees, blob cache (partial downloads for resume)

Each package root holds the files of the chosen variant and `package.toml`, the installed-state record
(manifest digest, registry, tag, variant, and size + sha256 of every file) that `pkg verify` re-hashes.

Install is a transaction: manifest and package.toml first (signature, schema, fit check against the
board profile), then the needed blobs into the cache (resumable, sha256-checked), then a complete tree
in .hublab/staging, fsync'd, and one rename into place. An update swaps the trees with
renameat2(RENAME_EXCHANGE) where the filesystem has it, else two renames whose half-done state
`recover()` (run first by every mutating verb and by verify) rolls forward. A kill -9 at any point
leaves the old package or the new one.

Store state is judged by what each path is (lstat: a dangling symlink is not "nothing there"): the
store's own paths are healed, anything else in the way is refused in one line before a download, and
every verb turns an OSError (full disk, read-only card) into one PackageError line.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import secrets
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import SystemConfig, format_size, load_system, set_system_value, toml_value, tomllib
from .errors import HublabError
from .manifest import (CATEGORIES, MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, ManifestError, describe_models,
                       digest_bytes, dump_manifest, infer_role, join_inside, manifest_from_dict, parse_manifest,
                       requirement_met, safe_relpath, sha256_file, source_files, variant_of)
from .profiles import Profile, resolve_profile
from .registry import (ANN_DESCRIPTION, ANN_SIGNATURE, ANN_TITLE, ANN_VERSION, MEDIA_CONFIG, MEDIA_FILE,
                       Descriptor, DirRegistry, Progress, Registry, RegistryError, Resolved, copy_blob_via, valid_name,
                       default_registry_dir, fetch_blob, now_iso, oci_manifest, open_registry, parse_ref, resolve)
from .signing import Signature, check_trust, default_key_path, generate_key, sign_digest

STATE = ".hublab"
GGUF_ROLES = ("model", "adapter")


class PackageError(HublabError):
    """A package operation cannot go ahead; nothing was changed."""


# What to do about an OS error a verb meets on disk (store state, a full disk, a read-only card).
_OS_FIX = {
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


def _one_line_errors(verb: str):
    """Every verb's last line of defence: an OSError from the disk becomes one PackageError line that
    names the path and the fix, never a traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                fix = _OS_FIX.get(exc.errno, "something unexpected is at that path: move it away and run "
                                             "hublab pkg verify")
                msg = f"{where}{exc.strerror or exc.__class__.__name__} while {verb}; {fix}"
                raise PackageError(" ".join(msg.split())) from None
        return inner
    return wrap


# ---------------------------------------------------------------------------------------------------
# Settings shared by the verbs

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


def _context(config: str | Path | None = None, models_dir: str | Path | None = None,
             registry: str | Path | None = None, profile: Profile | str | None = None,
             trusted_keys: list[str] | None = None) -> Context:
    system = load_system(Path(config) if config else None)
    if registry is None:
        url = str((system.raw.get("registry") or {}).get("url", "") or "")
        if url and "://" not in url and not os.path.isabs(os.path.expanduser(url)) and system.path:
            url = str(system.path.parent / url)
        registry = url or str(default_registry_dir())
    return Context(system=system, models_dir=Path(models_dir) if models_dir else system.models_dir,
                   registry=str(registry), trusted=list(system.trusted_keys if trusted_keys is None else trusted_keys),
                   profile_arg=profile)


@contextlib.contextmanager
def _registry(location: str):
    reg = open_registry(location)
    try:
        yield reg
    finally:
        reg.close()


# ---------------------------------------------------------------------------------------------------
# The installed store

def package_root(models_dir: Path, name: str, category: str) -> Path:
    if category == "expert":
        return models_dir / "experts" / name
    if category == "router":
        return models_dir / "router"
    return models_dir / "packages" / name


@dataclass
class Installed:
    """One installed package, as its package.toml record says."""
    name: str
    version: str
    category: str
    root: Path
    digest: str
    registry: str
    tag: str
    variant: str = ""
    quant: str = ""
    profile: str = ""
    signed_by: str = ""
    installed: str = ""
    description: str = ""
    experts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    router: str = ""
    files: list[FileEntry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["root"] = str(self.root)
        d["size"] = self.size
        return d


def _record_text(rec: Installed) -> str:
    lines = ["# hublab installed-package record: pkg verify re-hashes the files listed here.", "[package]"]
    for key in ("name", "version", "category", "description", "experts", "models", "router"):
        lines.append(f"{key} = {toml_value(getattr(rec, key))}")
    lines += ["", "[install]"]
    for key in ("digest", "registry", "tag", "variant", "quant", "profile", "signed_by", "installed"):
        lines.append(f"{key} = {toml_value(getattr(rec, key))}")
    for f in rec.files:
        lines += ["", "[[files]]", f"path = {toml_value(f.path)}", f"role = {toml_value(f.role)}",
                  f"size = {f.size}", f"sha256 = {toml_value(f.sha256)}"]
    return "\n".join(lines) + "\n"


def read_record(root: Path) -> Installed:
    path = root / MANIFEST_NAME
    try:
        if _kind(path) != "file":  # a fifo would block the read, a link could lead anywhere
            raise ValueError("not a regular file")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        p, i = data["package"], data["install"]
        files = [FileEntry(path=safe_relpath(f["path"]), role=f.get("role", ""), size=int(f["size"]),
                           sha256=str(f["sha256"])) for f in data.get("files", [])]
        # name and category become a directory path (package_root): never trust them unchecked
        if not valid_name(p["name"]) or p["category"] not in CATEGORIES:
            raise ValueError("bad name or category")
        return Installed(name=p["name"], version=p["version"], category=p["category"], root=root,
                         digest=i["digest"], registry=i.get("registry", ""), tag=i.get("tag", "latest"),
                         variant=i.get("variant", ""), quant=i.get("quant", ""), profile=i.get("profile", ""),
                         signed_by=i.get("signed_by", ""), installed=i.get("installed", ""),
                         description=p.get("description", ""), experts=list(p.get("experts", [])),
                         models=list(p.get("models", [])), router=p.get("router", ""), files=files)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError,
            ManifestError) as exc:
        raise PackageError(f"{path}: not a readable install record ({exc.__class__.__name__}); "
                           "reinstall the package with hublab pkg install") from None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
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


# What is at a path, never following a symlink: every store decision starts from this, because
# exists()/is_dir() follow links and call a dangling symlink "nothing there".
def _kind(path: Path) -> str:
    """'missing', 'dir', 'file', 'symlink' or 'other' (fifo, socket, device)."""
    try:
        mode = path.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _describe(path: Path) -> str:
    kind = _kind(path)
    if kind == "symlink":
        target = os.readlink(path)
        return f"a symlink to {target}" + ("" if os.path.exists(path) else " (dangling)")
    return {"dir": "a directory", "file": "a file", "other": "a special file"}.get(kind, "missing")


def _remove_any(path: Path) -> None:
    """Remove whatever is at `path` (a link is removed, never followed)."""
    if _kind(path) == "dir":
        shutil.rmtree(path)
    elif _kind(path) != "missing":
        path.unlink()


class Store:
    """The installed packages under one models_dir, and the transaction machinery around them.

    The store's own paths (.hublab, staging, blobs, lock) are checked before every use: what is ours is
    healed, what is not (the user's file where the store wants a directory) is refused with one line.
    """

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self.state = self.models_dir / STATE
        self.staging = self.state / "staging"
        self.blobs = self.state / "blobs"
        self.healed: list[str] = []     # what the layout check repaired, reported by recover()
        self.problems: list[str] = []   # what recover() could not repair, reported by verify

    def _require_dir(self, path: Path, what: str, fix: str) -> None:
        """`path` is a directory (a symlink to one is fine); make it if missing; PackageError otherwise."""
        kind = _kind(path)
        if kind == "missing":
            path.mkdir(parents=True, exist_ok=True)
        elif not (kind == "dir" or (kind == "symlink" and path.is_dir())):
            raise PackageError(f"{path}: is {_describe(path)}, where hublab keeps {what}; {fix}")

    def prepare(self) -> None:
        """Check and heal the store's own layout (call before taking the lock)."""
        self._require_dir(self.models_dir, "its models",
                          "move it away or point [runtime] models_dir in system.toml at a directory")
        if _kind(self.state) != "dir":  # a symlinked .hublab would put staging on another file system
            if _kind(self.state) != "missing":
                raise PackageError(f"{self.state}: is {_describe(self.state)}, where hublab keeps its store state "
                                   "(lock, staging, downloads); move it away")
            self.state.mkdir(exist_ok=True)
        for path in (self.staging, self.blobs):
            if _kind(path) not in ("dir", "missing"):  # ours: a stray file or link is replaced
                self.healed.append(f"replaced {_describe(path)} at {path.relative_to(self.models_dir)}")
                _remove_any(path)
            path.mkdir(exist_ok=True)
        lock = self.state / "lock"
        if _kind(lock) not in ("file", "missing"):
            self.healed.append(f"replaced {_describe(lock)} at {lock.relative_to(self.models_dir)}")
            _remove_any(lock)

    @contextlib.contextmanager
    def lock(self):
        self.prepare()
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)  # releases the lock

    def roots(self) -> list[Path]:
        """Directories that hold (or claim to hold) a package."""
        out = []
        for area in ("packages", "experts"):
            d = self.models_dir / area
            if d.is_dir():
                out += sorted(p for p in d.iterdir() if _kind(p) == "dir")
        if _kind(self.models_dir / "router") == "dir":
            out.append(self.models_dir / "router")
        # Folders without a record are the user's own model folders, not packages.
        return [p for p in out if _kind(p / MANIFEST_NAME) == "file"]

    def installed(self) -> dict[str, Installed]:
        out = {}
        for root in self.roots():
            with contextlib.suppress(PackageError):
                rec = read_record(root)
                out[rec.name] = rec
        return out

    def get(self, name: str) -> Installed | None:
        return self.installed().get(name)

    def _holds(self, root: Path, name: str) -> bool:
        """Whether `root` is a real directory holding installed package `name`."""
        if _kind(root) != "dir":
            return False
        try:
            return read_record(root).name == name
        except PackageError:
            return False

    def recover(self) -> list[str]:
        """Finish or undo what a killed install/remove left in staging (call with the lock held).

        Never raises on store state: what cannot be repaired is kept and listed in self.problems.
        """
        actions, self.healed = self.healed, []
        self.problems = []
        if _kind(self.staging) != "dir":
            return actions
        entries = sorted(self.staging.iterdir())
        trees: dict[str, dict[str, Path]] = {}
        for p in entries:
            base, _, suffix = p.name.rpartition(".")
            # NAME.tmp-<hex> and NAME.del-<hex> never end in .new/.old, whatever NAME is ("a.tmp-b" is a name)
            if suffix in ("new", "old") and _kind(p) == "dir":
                trees.setdefault(base, {})[suffix] = p
                continue
            # unfinished trees, half-removed packages, and anything else: staging is ours alone
            try:
                _remove_any(p)
                actions.append(f"removed unfinished {p.name}")
            except OSError as exc:
                self.problems.append(f"{p}: cannot remove ({exc.strerror}); delete it by hand")
        for name, pair in sorted(trees.items()):
            try:
                actions += self._recover_pair(name, pair.get("new"), pair.get("old"))
            except OSError as exc:
                self.problems.append(f"{self.staging / name}: cannot finish the interrupted install "
                                     f"({exc.strerror}: {exc.filename}); fix that path and run hublab pkg verify")
        return actions

    def _recover_pair(self, name: str, new: Path | None, old: Path | None) -> list[str]:
        """Roll an interrupted commit of package `name` forward (new tree) or back (old tree)."""
        actions = []
        recs = {}
        for p in (new, old):
            if p is None:
                continue
            try:
                rec = read_record(p)
                if rec.name != name:
                    raise PackageError("record names another package")
                recs[p] = rec
            except PackageError:
                shutil.rmtree(p)
                actions.append(f"removed unreadable {p.name}")
        new, old = (new if new in recs else None), (old if old in recs else None)
        for p in (new, old):
            if p is None:
                continue
            root = package_root(self.models_dir, name, recs[p].category)
            if self._holds(root, name):
                # The swap happened (p holds the replaced tree) or never started: the root is whole.
                shutil.rmtree(p)
                actions.append(f"{name}: dropped leftover tree {p.name}")
            elif _kind(root) == "missing" and _kind(root.parent) == "dir":
                os.rename(p, root)
                _fsync_path(root.parent)
                actions.append(f"{name}: " + (f"completed interrupted install of {recs[p].version}" if p is new
                                              else f"restored previous version {recs[p].version}"))
            elif p is new:
                shutil.rmtree(p)  # never installed: nothing is lost by dropping it
                actions.append(f"{name}: dropped unfinished install of {recs[p].version} "
                               f"({root} is {_describe(root)})")
            else:
                what = (_describe(root) if _kind(root) != "missing"
                        else f"missing, and {root.parent} is {_describe(root.parent)}")
                self.problems.append(f"{root}: is {what}, so package {name} {recs[p].version} kept in {p} cannot be "
                                     "put back; move that path away and run hublab pkg verify")
        return actions

    def check_target(self, name: str, root: Path, existing: Installed | None) -> None:
        """Refuse, before any download, to install `name` at `root` where something not ours is in the way."""
        probe = root.parent
        chain = []
        while probe != self.models_dir and self.models_dir in probe.parents:
            chain.append(probe)
            probe = probe.parent
        for d in reversed(chain):
            self._require_dir(d, "packages", "move it away")
        kind = _kind(root)
        if kind in ("symlink", "file", "other"):
            raise PackageError(f"{root}: is {_describe(root)}, where {name} would be installed; move it away "
                               "and install again")
        parent = root.parent
        if os.stat(parent).st_dev != os.stat(self.staging).st_dev:
            raise PackageError(f"{parent}: is on another file system than {self.staging}, so an install cannot "
                               "replace a package in one step; make it a plain directory inside models_dir")
        if existing is not None:
            listed = {MANIFEST_NAME} | {f.path for f in existing.files}
            foreign = [p for p in _tree_files(existing.root) if p not in listed]
            if foreign:
                raise PackageError(f"{existing.root / foreign[0]}: is not part of package {name}, and an update "
                                   "replaces the whole directory; move it out first")

    def commit(self, name: str, stage: Path, root: Path) -> None:
        """Move a complete, fsync'd staging tree to `root`, replacing what is there in one step."""
        new = self.staging / f"{name}.new"
        _remove_any(new)
        os.rename(stage, new)
        _fsync_path(self.staging)
        if _kind(root) == "missing":
            os.rename(new, root)
        elif _kind(root) != "dir":
            raise PackageError(f"{root}: is {_describe(root)}, where {name} would be installed; move it away")
        elif _exchange(new, root):
            pass  # `new` now holds the previous tree
        else:
            old = self.staging / f"{name}.old"
            os.rename(root, old)
            os.rename(new, root)
            new = old
        _fsync_path(root.parent)
        _fsync_path(self.staging)
        shutil.rmtree(new, ignore_errors=True)

    def discard(self, root: Path, name: str) -> None:
        """Remove a package root atomically (rename away, then delete)."""
        trash = self.staging / f"{name}.del-{secrets.token_hex(4)}"
        os.rename(root, trash)
        _fsync_path(root.parent)
        shutil.rmtree(trash, ignore_errors=True)


def _tree_files(root: Path) -> list[str]:
    """Relative paths of the files and links under `root` (links to directories included, not entered)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            out.append(Path(dirpath, n).relative_to(root).as_posix())
    return out


# ---------------------------------------------------------------------------------------------------
# Variants and the board fit

@dataclass
class Choice:
    """One way to install a package on a board: a variant, its files, and whether it fits."""
    variant: str
    quant: str
    files: list[FileEntry]
    size: int
    memory: int
    largest: int
    fits: bool
    reason: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = [f.path for f in self.files]
        return d


def plan(m: Manifest, profile: Profile) -> list[Choice]:
    """Every variant of `m` with its fit verdict on `profile`, best choice first."""
    options = [(v.name, v.quant, v.memory) for v in m.variants] or [("", "", 0)]
    choices = []
    for name, quant, declared in options:
        files = m.files_for(name)
        ggufs = [f for f in files if f.role in GGUF_ROLES]
        largest = max((f.size for f in ggufs), default=0)
        memory = declared or sum(f.size for f in ggufs)
        what = f"variant {name}" if name else "it"
        if profile.max_model_size and largest > profile.max_model_size:
            big = max(ggufs, key=lambda f: f.size)
            fits, reason = False, (f"{what}: {big.path} is {format_size(largest)}, over {profile.name}'s largest "
                                   f"model size {format_size(profile.max_model_size)}")
        elif profile.model_budget and memory > profile.model_budget:
            fits, reason = False, (f"{what} needs {format_size(memory)} of model memory, over {profile.name}'s "
                                   f"budget {format_size(profile.model_budget)}")
        else:
            fits, reason = True, (f"{what} needs {format_size(memory)} of {format_size(profile.model_budget)} "
                                  f"on {profile.name}")
        choices.append(Choice(variant=name, quant=quant, files=files, size=sum(f.size for f in files),
                              memory=memory, largest=largest, fits=fits, reason=reason))
    prefs = [q.upper() for q in profile.preferred_quants]

    def rank(c: Choice):
        # Fitting first; then the profile's quant preference; then the biggest (least lossy) that fits.
        pref = prefs.index(c.quant.upper()) if c.quant.upper() in prefs else len(prefs)
        return (not c.fits, pref, -c.memory)

    return sorted(choices, key=rank)


def select_variant(m: Manifest, profile: Profile, wanted: str | None = None) -> Choice:
    choices = plan(m, profile)
    if wanted:
        hit = [c for c in choices if c.variant == wanted or c.quant.upper() == wanted.upper()]
        if not hit:
            have = ", ".join(c.variant for c in choices) or "none"
            raise PackageError(f"{m.name}: no variant {wanted!r} (variants: {have}); pick one of those")
        choices = hit
    best = choices[0]
    if not best.fits:
        smallest = min(choices, key=lambda c: c.memory)
        raise PackageError(f"{m.name} {m.version} does not fit board profile {profile.name}: {smallest.reason}; "
                           "nothing was downloaded (choose a smaller variant or another --profile)")
    return best


# ---------------------------------------------------------------------------------------------------
# keygen and build

@_one_line_errors("making a key")
def keygen(path: str | Path | None = None, *, trust: bool = False, force: bool = False,
           config: str | Path | None = None) -> dict:
    """Make an ed25519 signing key; with trust=True also add its public key to system.toml [trust] keys."""
    path = Path(path) if path else default_key_path()
    pub = generate_key(path, overwrite=force)
    trusted_in = ""
    if trust:
        system = load_system(Path(config) if config else None)
        keys = list(system.trusted_keys)
        if pub not in keys:
            set_system_value(system.path, "trust", "keys", keys + [pub])
        trusted_in = str(system.path)
    return {"key_file": str(path), "public_key": pub, "trusted_in": trusted_in}


@dataclass
class BuildResult:
    directory: str
    name: str
    version: str
    category: str
    digest: str
    files: int
    size: int
    variants: list[str]
    experts: list[str]
    signed_by: str

    def to_dict(self) -> dict:
        return asdict(self)


@_one_line_errors("building the package")
def build(directory: str | Path, *, key: str | Path | None = None, sign: bool = True) -> BuildResult:
    """Fill in package.toml of DIR (files, roles, sizes, sha256, variants) and sign it into package.sig.

    Signs with `key`, else with the default key (hublab pkg keygen) when it exists, unless sign=False.
    """
    d = Path(directory)
    src = d / MANIFEST_NAME
    if not src.is_file():
        raise PackageError(f"{src}: not found; write a package.toml with [package] name, version and category")
    try:
        data = tomllib.loads(src.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{src}: invalid TOML ({str(exc).splitlines()[0]}); fix the syntax") from None
    m = manifest_from_dict(data, str(src), built=False)
    declared = {f.path: f for f in m.files}
    patterns = {v["name"]: list(v.get("files") or [f"{v['name']}/*"]) for v in data.get("variants", [])}
    present = source_files(d)
    missing = sorted(set(declared) - set(present))
    if missing:
        raise PackageError(f"{src}: lists {missing[0]!r} but the file is not in {d}; restore it or remove its "
                           "[[files]] entry")
    files = []
    for rel in present:
        old = declared.get(rel)
        path = d / rel
        variant = (old.variant if old and old.variant else variant_of(rel, patterns, str(src)))
        files.append(FileEntry(path=rel, role=(old.role if old and old.role else infer_role(path)),
                               size=path.stat().st_size, sha256=sha256_file(path), variant=variant))
    if not files:
        raise PackageError(f"{d}: no files to package; put the GGUF/ONNX/TOML files next to package.toml")
    for v in m.variants:
        v_files = [f for f in files if f.variant == v.name]
        if not v_files:
            raise PackageError(f"{src}: variant {v.name!r} has no files; put them under {v.name}/ or set its files "
                               "patterns")
    experts, models = describe_models(d, [f.path for f in files])
    m.files = files
    # The model TOMLs are the truth about what the package provides; declared names only stand in
    # for packages without TOMLs (a bare GGUF).
    if experts or models:
        m.experts, m.models = experts, models
    if m.category == "router" and not m.router:
        m.router = m.name
    for v in m.variants:
        v.files = patterns.get(v.name, [])  # kept so a rebuild tags new files the same way
    text = dump_manifest(m)
    raw = text.encode("utf-8")
    parse_manifest(raw, str(src))  # what we write must pass what install checks
    tmp = src.with_name(".package.toml.tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, src)
    digest = digest_bytes(raw)
    signed_by = ""
    sig_path = d / SIGNATURE_NAME
    key_path = Path(key) if key else (default_key_path() if sign and default_key_path().is_file() else None)
    if sign and key_path:
        sig = sign_digest(key_path, digest)
        sig_path.write_text(sig.to_json() + "\n")
        signed_by = sig.key
    elif sig_path.exists():
        sig_path.unlink()  # a stale signature would claim the old manifest
    return BuildResult(directory=str(d), name=m.name, version=m.version, category=m.category, digest=digest,
                       files=len(files), size=m.size, variants=[v.name for v in m.variants],
                       experts=m.experts, signed_by=signed_by)


def _load_built(d: Path) -> tuple[Manifest, bytes, Signature | None]:
    src = d / MANIFEST_NAME
    if not src.is_file():
        raise PackageError(f"{src}: not found; run hublab pkg build {d} first")
    raw = src.read_bytes()
    try:
        m = parse_manifest(raw, str(src))
    except ManifestError as exc:
        raise PackageError(f"{exc}; or run hublab pkg build {d}") from None
    sig = None
    sig_path = d / SIGNATURE_NAME
    if sig_path.is_file():
        sig = Signature.from_json(sig_path.read_bytes(), str(sig_path))
        from .signing import verify as verify_sig

        verify_sig(sig, digest_bytes(raw), str(sig_path))
    present = set(source_files(d))
    listed = {f.path for f in m.files}
    extra = sorted(present - listed)
    if extra:
        raise PackageError(f"{d / extra[0]}: not listed in package.toml; run hublab pkg build {d} again")
    # Every file is re-hashed: a registry that already holds the built bytes would otherwise accept
    # the package without reading the edited file, and publish stale content under a valid manifest.
    for f in m.files:
        p = d / f.path
        if not p.is_file():
            raise PackageError(f"{p}: listed in package.toml but missing; restore it or run hublab pkg build {d}")
        if p.stat().st_size != f.size:
            raise PackageError(f"{p}: size changed since hublab pkg build ({p.stat().st_size} bytes, built "
                               f"{f.size}); run hublab pkg build {d} again")
        if sha256_file(p) != f.sha256:
            raise PackageError(f"{p}: content changed since hublab pkg build (sha256 differs from package.toml); "
                               f"run hublab pkg build {d} again")
    return m, raw, sig


# ---------------------------------------------------------------------------------------------------
# publish

@dataclass
class PublishResult:
    name: str
    version: str
    tags: list[str]
    registry: str
    manifest_digest: str
    package_digest: str
    uploaded_blobs: int
    skipped_blobs: int
    bytes: int
    signed_by: str

    def to_dict(self) -> dict:
        return asdict(self)


@_one_line_errors("publishing")
def publish(source: str | Path, registry: str | Path | None = None, *, tag: str | None = None,
            from_registry: str | Path | None = None, progress: Progress | None = None,
            config: str | Path | None = None) -> PublishResult:
    """Publish a built package directory, or copy NAME[:TAG] from another registry, to `registry`."""
    ctx = _context(config, registry=registry)
    src = Path(str(source)).expanduser()
    if src.is_dir():
        return _publish_dir(src, ctx.registry, tag, progress)
    name, src_tag = parse_ref(str(source))
    origin = str(from_registry) if from_registry else _context(config).registry
    if origin.rstrip("/") == ctx.registry.rstrip("/"):
        raise PackageError(f"{source}: already in {origin}; give --registry to copy it elsewhere, or a package "
                           "directory to publish")
    with _registry(origin) as src_reg, _registry(ctx.registry) as dst:
        res = resolve(src_reg, name, src_tag)
        m = parse_manifest(res.package_raw, f"{res.source} package.toml")
        if isinstance(dst, DirRegistry):
            dst.init()
        import tempfile

        uploaded = skipped = 0
        with tempfile.TemporaryDirectory(prefix="hublab-copy-") as tmp:
            for path, desc in list(res.layers.items()) + [(MANIFEST_NAME, res.config)]:
                before = dst.has_blob(name, desc.digest, desc.size)
                copy_blob_via(src_reg, dst, name, desc, Path(tmp), progress, label=path)
                uploaded, skipped = uploaded + (not before), skipped + before
        tags = [tag] if tag else [src_tag]
        digest = dst.push_manifest(name, tags, res.oci_raw)
    return PublishResult(name=name, version=m.version, tags=tags, registry=ctx.registry, manifest_digest=digest,
                         package_digest=res.package_digest, uploaded_blobs=uploaded, skipped_blobs=skipped,
                         bytes=m.size, signed_by=res.signature.key if res.signature else "")


def _publish_dir(d: Path, registry: str, tag: str | None, progress: Progress | None) -> PublishResult:
    m, raw, sig = _load_built(d)
    layers = [Descriptor(MEDIA_FILE, f.digest, f.size, {ANN_TITLE: f.path}) for f in m.files]
    annotations = {ANN_VERSION: m.version}
    if m.description:
        annotations[ANN_DESCRIPTION] = m.description
    if sig:
        annotations[ANN_SIGNATURE] = sig.to_json()
    oci_raw = oci_manifest(raw, layers, annotations)
    tags = [tag] if tag else [m.version, "latest"]
    uploaded = skipped = 0
    with _registry(registry) as reg:
        if isinstance(reg, DirRegistry):
            reg.init()
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".hublab-pub-") as tmp:
            cfg = Path(tmp) / MANIFEST_NAME
            cfg.write_bytes(raw)
            blobs = [(Descriptor(MEDIA_CONFIG, digest_bytes(raw), len(raw)), cfg, MANIFEST_NAME)]
            blobs += [(desc, d / desc.annotations[ANN_TITLE], desc.annotations[ANN_TITLE]) for desc in layers]
            seen = set()
            for desc, path, label in blobs:
                if desc.digest in seen:
                    continue
                seen.add(desc.digest)
                if reg.push_blob(m.name, desc, path, progress=progress, label=label):
                    uploaded += 1
                else:
                    skipped += 1
        digest = reg.push_manifest(m.name, tags, oci_raw)
    return PublishResult(name=m.name, version=m.version, tags=tags, registry=registry, manifest_digest=digest,
                         package_digest=digest_bytes(raw), uploaded_blobs=uploaded, skipped_blobs=skipped,
                         bytes=m.size, signed_by=sig.key if sig else "")


# ---------------------------------------------------------------------------------------------------
# install

@dataclass
class InstallResult:
    name: str
    version: str
    category: str
    status: str          # installed | updated | unchanged
    previous: str        # version replaced, or ''
    variant: str
    quant: str
    profile: str
    root: str
    registry: str
    tag: str
    digest: str
    signed_by: str
    files: int
    size: int
    downloaded: int
    reused: int
    seconds: float
    experts: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _check_layers(m: Manifest, res: Resolved) -> None:
    for f in m.files:
        d = res.layers.get(f.path)
        if d is None:
            raise PackageError(f"{res.source}: {f.path} is in package.toml but not in the published manifest; "
                               "republish the package")
        if d.digest != f.digest or d.size != f.size:
            raise PackageError(f"{res.source}: {f.path}: published blob {d.digest[:19]}… ({d.size} bytes) does not "
                               f"match package.toml (sha256:{f.sha256[:12]}…, {f.size} bytes); the package was "
                               "tampered with or published wrongly")


def _verified_package(reg: Registry, name: str, tag: str, trusted: list[str],
                      allow_unsigned: bool) -> tuple[Resolved, Manifest, str]:
    """Resolve NAME:TAG and run every check that needs no file blob: digest, signature, schema, paths."""
    from hublab import __version__

    res = resolve(reg, name, tag)
    # The signature is checked before the manifest is parsed, so a forged manifest is reported as such.
    signer = check_trust(res.signature, res.package_digest, trusted, res.source, allow_unsigned)
    m = parse_manifest(res.package_raw, f"{res.source} package.toml")
    if m.name != name:
        raise PackageError(f"{res.source}: package.toml names {m.name!r}, not {name!r}; republish it under its own "
                           "name")
    if m.requires and not requirement_met(m.requires, __version__):
        raise PackageError(f"{res.source}: needs hublab {m.requires}, this is {__version__}; update hublab or pick "
                           "an older package version")
    _check_layers(m, res)
    return res, m, signer


@_one_line_errors("checking the package")
def check(ref: str, registry: str | Path | None = None, *, profile: Profile | str | None = None,
          variant: str | None = None, allow_unsigned: bool = False, trusted_keys: list[str] | None = None,
          config: str | Path | None = None) -> Choice:
    """Every check `install` makes before downloading (signature, schema, paths, version, board fit),
    writing nothing; PackageError/RegistryError on the first failure, else the variant it would pick."""
    ctx = _context(config, None, registry, profile, trusted_keys)
    name, tag = parse_ref(ref)
    with _registry(ctx.registry) as reg:
        _, m, _ = _verified_package(reg, name, tag, ctx.trusted, allow_unsigned)
        return select_variant(m, ctx.profile, variant)


@_one_line_errors("installing")
def install(ref: str, registry: str | Path | None = None, *, models_dir: str | Path | None = None,
            profile: Profile | str | None = None, variant: str | None = None, allow_unsigned: bool = False,
            trusted_keys: list[str] | None = None, progress: Progress | None = None,
            config: str | Path | None = None) -> InstallResult:
    """Install NAME[:TAG] from a registry: the best variant that fits the board, atomically."""
    ctx = _context(config, models_dir, registry, profile, trusted_keys)
    name, tag = parse_ref(ref)
    store = Store(ctx.models_dir)
    with _registry(ctx.registry) as reg:
        res, m, signer = _verified_package(reg, name, tag, ctx.trusted, allow_unsigned)
        prof = ctx.profile
        choice = select_variant(m, prof, variant)
        try:
            with store.lock():
                store.recover()
                return _install_locked(store, reg, res, m, signer, choice, prof, progress)
        except OSError as exc:
            exc.filename = exc.filename or str(store.models_dir)  # a failed write names no file: say where
            raise


def _install_locked(store: Store, reg: Registry, res: Resolved, m: Manifest, signer: str, choice: Choice,
                    prof: Profile, progress: Progress | None) -> InstallResult:
    t0 = time.monotonic()
    installed = store.installed()
    existing = installed.get(m.name)
    root = package_root(store.models_dir, m.name, m.category)
    _check_conflicts(store, m, root, existing, installed)

    def result(status: str, downloaded: int = 0, reused: int = 0) -> InstallResult:
        return InstallResult(name=m.name, version=m.version, category=m.category, status=status,
                             previous=existing.version if existing and status == "updated" else "",
                             variant=choice.variant, quant=choice.quant, profile=prof.name, root=str(root),
                             registry=res.registry, tag=res.tag, digest=res.package_digest, signed_by=signer,
                             files=len(choice.files), size=choice.size, downloaded=downloaded, reused=reused,
                             seconds=round(time.monotonic() - t0, 3), experts=m.experts, reason=choice.reason)

    if (existing and existing.digest == res.package_digest and existing.variant == choice.variant
            and not _problems(existing)):
        return result("unchanged")
    _check_space(store, choice)
    # 1. blobs into the cache, each checked against its sha256 (resumes a partial download)
    digests: dict[str, Path] = {}
    downloaded = reused = 0
    todo = {f.digest: f for f in choice.files}
    for i, f in enumerate(todo.values(), start=1):
        got = fetch_blob(reg, m.name, res.layers[f.path], store.blobs,
                         label=f"[{i}/{len(todo)}] {f.path}", progress=progress)
        digests[f.digest] = got.path
        downloaded += got.downloaded
        reused += got.reused
    # 2. a complete tree in staging, fsync'd, then 3. checked before it replaces anything
    stage = store.staging / f"{m.name}.tmp-{secrets.token_hex(4)}"
    try:
        _stage_tree(stage, m, res, signer, choice, prof, root, digests)
    except BaseException:
        # The installed tree was never touched; the downloads go back to the cache for the next try
        # (fetch_blob re-hashes them before use).
        for f in choice.files:
            staged = stage.joinpath(*f.path.split("/"))
            if _kind(staged) == "file" and _kind(digests[f.digest]) == "missing":
                with contextlib.suppress(OSError):
                    os.rename(staged, digests[f.digest])
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # 4. one rename (or exchange) into place
    old_root = existing.root if existing else None
    store.commit(m.name, stage, root)
    if old_root and old_root != root and _kind(old_root) == "dir":
        store.discard(old_root, m.name)  # the package changed category
    for p in store.blobs.glob("sha256-*.partial"):
        if f"sha256:{p.name[7:-8]}" in todo:
            p.unlink()
    return result("updated" if existing else "installed", downloaded, reused)


def _stage_tree(stage: Path, m: Manifest, res: Resolved, signer: str, choice: Choice,
                prof: Profile, root: Path, digests: dict[str, Path]) -> None:
    stage.mkdir()
    placed: dict[str, Path] = {}
    for f in choice.files:
        dest = join_inside(stage, f.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.digest in placed:
            shutil.copyfile(placed[f.digest], dest)
            with open(dest, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            os.rename(digests[f.digest], dest)
            placed[f.digest] = dest
    record = Installed(name=m.name, version=m.version, category=m.category, root=root,
                       digest=res.package_digest, registry=res.registry, tag=res.tag, variant=choice.variant,
                       quant=choice.quant, profile=prof.name, signed_by=signer, installed=now_iso(),
                       description=m.description, experts=m.experts, models=m.models, router=m.router,
                       files=[FileEntry(f.path, f.role, f.size, f.sha256) for f in choice.files])
    with open(stage / MANIFEST_NAME, "w", encoding="utf-8") as fh:
        fh.write(_record_text(record))
        fh.flush()
        os.fsync(fh.fileno())
    for dirpath, _, _ in os.walk(stage):
        _fsync_path(Path(dirpath))
    bad = _problems(read_record(stage), rehash=False)
    if bad:
        raise PackageError(f"{m.name}: staged install failed its check ({bad[0]}); nothing was changed")


def _check_conflicts(store: Store, m: Manifest, root: Path, existing: Installed | None,
                     installed: dict[str, Installed]) -> None:
    store.check_target(m.name, root, existing)
    if _kind(root) == "dir" and not (existing and existing.root == root):
        if (root / MANIFEST_NAME).is_file():
            other = read_record(root).name
            raise PackageError(f"{root}: holds package {other!r}; remove it first (hublab pkg remove {other})")
        raise PackageError(f"{root}: exists and is not an installed package; move it away before installing {m.name}")
    provided = set(m.experts) | set(m.models)
    foreign = _foreign_models(store)
    for model in sorted(provided & set(foreign)):
        raise PackageError(f"{m.name}: provides {model!r}, which {foreign[model]} already defines; rename or move "
                           "that TOML, or install into another --models-dir")
    for other in installed.values():
        if other.name == m.name:
            continue
        clash = provided & (set(other.experts) | set(other.models))
        if clash:
            raise PackageError(f"{m.name}: provides {sorted(clash)[0]!r}, which package {other.name!r} already "
                               f"provides; remove {other.name} first")


def _foreign_models(store: Store) -> dict[str, Path]:
    """Model names defined by TOMLs under models_dir that belong to no package (the user's own)."""
    skip = {store.state} | set(store.roots())
    out: dict[str, Path] = {}
    for path in sorted(store.models_dir.rglob("*.toml")) if store.models_dir.is_dir() else []:
        if (path.name in ("package.toml", "router.toml") or any(p in skip for p in path.parents)
                or _kind(path) != "file"):
            continue
        try:
            name = tomllib.loads(path.read_text(encoding="utf-8")).get("model", {}).get("name")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
            continue
        if isinstance(name, str):
            out.setdefault(name, path)
    return out


def _check_space(store: Store, choice: Choice) -> None:
    need = sum(f.size for f in {f.digest: f for f in choice.files}.values())
    probe = store.models_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise PackageError(f"{store.models_dir}: needs {format_size(need)} free, has {format_size(free)}; "
                           "free some space (hublab pkg remove) first")


# ---------------------------------------------------------------------------------------------------
# verify, remove, list, show, search, update

def _problems(rec: Installed, rehash: bool = True) -> list[str]:
    """What is wrong with an installed package's files; [] when it is intact."""
    out = []
    listed = {MANIFEST_NAME}
    for f in rec.files:
        listed.add(f.path)
        p = rec.root.joinpath(*f.path.split("/"))
        kind = _kind(p)
        if kind == "missing":
            out.append(f"{f.path}: missing")
        elif kind != "file":
            out.append(f"{f.path}: not a regular file")
        elif p.lstat().st_size != f.size:
            out.append(f"{f.path}: size {p.lstat().st_size}, expected {f.size}")
        elif rehash:
            try:
                if sha256_file(p) != f.sha256:
                    out.append(f"{f.path}: sha256 does not match")
            except OSError as exc:
                out.append(f"{f.path}: unreadable ({exc.strerror})")
    out += [f"{rel}: not part of the package" for rel in _tree_files(rec.root) if rel not in listed]
    return out


@dataclass
class VerifyReport:
    name: str
    version: str
    root: str
    files: int
    ok: bool
    problems: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyResult:
    packages: list[VerifyReport]
    recovered: list[str]
    store_problems: list[str]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.packages) and not self.store_problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "packages": [p.to_dict() for p in self.packages], "recovered": self.recovered,
                "store_problems": self.store_problems}


@_one_line_errors("verifying the store")
def verify(names: list[str] | None = None, *, models_dir: str | Path | None = None,
           config: str | Path | None = None) -> VerifyResult:
    """Finish interrupted transactions, then re-hash every installed file against its record."""
    ctx = _context(config, models_dir)
    store = Store(ctx.models_dir)
    recovered: list[str] = []
    reports, store_problems = [], []
    if store.models_dir.is_dir() and os.access(store.models_dir, os.W_OK):
        try:
            with store.lock():
                recovered = store.recover()  # a read-only card is only checked, not repaired
        except PackageError as exc:  # the store's layout is not ours to fix: report it, still check packages
            store_problems.append(str(exc))
        store_problems += store.problems
    for root in store.roots():
        try:
            rec = read_record(root)
        except PackageError as exc:
            store_problems.append(str(exc))
            continue
        if names and rec.name not in names:
            continue
        if package_root(store.models_dir, rec.name, rec.category) != root:
            store_problems.append(f"{root}: record names {rec.name} ({rec.category}), which belongs elsewhere; "
                                  "reinstall it")
        probs = _problems(rec)
        reports.append(VerifyReport(rec.name, rec.version, str(root), len(rec.files), not probs, probs))
    if names:
        missing = sorted(set(names) - {r.name for r in reports})
        if missing:
            raise PackageError(f"{missing[0]}: not installed in {store.models_dir}; see hublab pkg list")
    if _kind(store.staging) == "dir" and not store.problems:
        left = [p.name for p in store.staging.iterdir()]
        store_problems += [f"{store.staging / n}: leftover from an interrupted operation" for n in left]
    return VerifyResult(reports, recovered, store_problems)


@_one_line_errors("removing the package")
def remove(name: str, *, models_dir: str | Path | None = None, config: str | Path | None = None) -> dict:
    """Uninstall a package (its directory disappears in one rename)."""
    ctx = _context(config, models_dir)
    store = Store(ctx.models_dir)
    with store.lock():
        store.recover()
        rec = store.get(name)
        if rec is None:
            raise PackageError(f"{name}: not installed in {store.models_dir}; see hublab pkg list")
        store.discard(rec.root, name)
    return {"name": name, "version": rec.version, "root": str(rec.root), "freed": rec.size}


@_one_line_errors("listing packages")
def list_packages(*, models_dir: str | Path | None = None, config: str | Path | None = None) -> list[Installed]:
    """Installed packages, by name."""
    ctx = _context(config, models_dir)
    return sorted(Store(ctx.models_dir).installed().values(), key=lambda r: r.name)


def _summary(m: Manifest, tags: list[str] | None = None) -> dict:
    return {"name": m.name, "version": m.version, "category": m.category, "description": m.description,
            "license": m.license, "experts": m.experts, "models": m.models, "router": m.router,
            "size": m.size, "variants": [v.name for v in m.variants], "tags": tags or []}


@_one_line_errors("searching the registry")
def search(term: str = "", registry: str | Path | None = None, *, config: str | Path | None = None) -> list[dict]:
    """Packages in a registry whose name, description, category, experts or models contain `term`."""
    ctx = _context(config, registry=registry)
    needle = term.lower().strip()
    out = []
    with _registry(ctx.registry) as reg:
        for name in reg.names():
            tags = reg.tags(name)
            if not tags:
                continue
            tag = "latest" if "latest" in tags else tags[-1]
            try:
                res = resolve(reg, name, tag)
                m = parse_manifest(res.package_raw, res.source)
            except HublabError:
                continue  # one broken entry does not hide the others
            hay = " ".join([m.name, m.description, m.category, *m.experts, *m.models]).lower()
            if needle in hay:
                out.append(_summary(m, tags) | {"signed": res.signature is not None})
    return out


@_one_line_errors("showing the package")
def show(ref: str, registry: str | Path | None = None, *, models_dir: str | Path | None = None,
         profile: Profile | str | None = None, config: str | Path | None = None) -> dict:
    """A package's details: from the registry (with each variant's fit on the board) and, if installed, its record."""
    ctx = _context(config, models_dir, registry, profile)
    name, tag = parse_ref(ref)
    rec = Store(ctx.models_dir).get(name)
    out: dict[str, Any] = {"name": name, "installed": rec.to_dict() if rec else None}
    try:
        with _registry(ctx.registry) as reg:
            res = resolve(reg, name, tag)
            m = parse_manifest(res.package_raw, res.source)
            prof = ctx.profile
            out |= {"registry": ctx.registry, "tag": tag, "package": _summary(m, reg.tags(name)),
                    "files": [asdict(f) for f in m.files], "digest": res.package_digest,
                    "signed_by": res.signature.key if res.signature else "", "profile": prof.name,
                    "variants": [c.to_dict() | {"description": m.variant(c.variant).description if c.variant else ""}
                                 for c in plan(m, prof)]}
    except RegistryError as exc:
        if rec is None:
            raise
        out["registry_error"] = str(exc)
    return out


@dataclass
class UpdateResult:
    name: str
    status: str      # updated | up-to-date | failed
    old_version: str
    new_version: str
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@_one_line_errors("updating")
def update(names: list[str] | None = None, registry: str | Path | None = None, *,
           models_dir: str | Path | None = None, profile: Profile | str | None = None,
           allow_unsigned: bool = False, trusted_keys: list[str] | None = None,
           progress: Progress | None = None, config: str | Path | None = None) -> list[UpdateResult]:
    """Re-resolve each installed package's tag in its registry and install what changed."""
    ctx = _context(config, models_dir, None, profile, trusted_keys)
    installed = Store(ctx.models_dir).installed()
    if names:
        unknown = sorted(set(names) - set(installed))
        if unknown:
            raise PackageError(f"{unknown[0]}: not installed in {ctx.models_dir}; see hublab pkg list")
    out = []
    for rec in sorted(installed.values(), key=lambda r: r.name):
        if names and rec.name not in names:
            continue
        try:
            r = install(f"{rec.name}:{rec.tag}", registry or rec.registry, models_dir=ctx.models_dir,
                        profile=ctx.profile, allow_unsigned=allow_unsigned, trusted_keys=ctx.trusted,
                        progress=progress, config=config)
            status = "up-to-date" if r.status == "unchanged" else "updated"
            out.append(UpdateResult(rec.name, status, rec.version, r.version,
                                    f"variant {r.variant}" if r.variant else ""))
        except HublabError as exc:
            out.append(UpdateResult(rec.name, "failed", rec.version, "", str(exc)))
    return out


# ---------------------------------------------------------------------------------------------------
# Command line

class ProgressBar:
    """size, percentage and rate on stderr; a tty gets a live bar, a log gets one line per file."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = None
        self.last = 0.0

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if label != self.label:
            self.label, self.t0, self.start, self.last = label, now, done, 0.0
        finished = done >= total
        if not finished and (not self.tty or now - self.last < 0.1):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-3)
        pct = 100.0 * done / total if total else 100.0
        bar = "#" * int(pct / 5)
        line = (f"{label[:38]:<38} [{bar:<20}] {pct:5.1f}%  {format_size(done)} / {format_size(total)}  "
                f"{format_size(rate)}/s")
        self.stream.write(("\r" if self.tty else "") + line + ("\n" if finished else ""))
        self.stream.flush()
        if finished:
            self.label = None


def _common(p, registry: bool = False, models: bool = False, profile: bool = False) -> None:
    import argparse

    if registry:
        p.add_argument("--registry", help="registry: a directory or http(s)://host[:port][/namespace] "
                                          "(default: system.toml [registry] url, else ~/.local/share/hublab/registry)")
    if models:
        p.add_argument("--models-dir", help="models directory to work on (default: system.toml [runtime] models_dir)")
    if profile:
        p.add_argument("--profile", default=argparse.SUPPRESS, help="board profile to fit (e.g. pi4-4gb)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="pkg_command", metavar="COMMAND", required=True)
    p = sub.add_parser("keygen", help="make an ed25519 signing key")
    p.add_argument("--out", help="key file (default: ~/.config/hublab/signing.key)")
    p.add_argument("--trust", action="store_true", help="also add the public key to system.toml [trust] keys")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    _common(p)
    p = sub.add_parser("build", help="fill in DIR/package.toml (files, sizes, sha256) and sign it")
    p.add_argument("directory")
    p.add_argument("--key", help="signing key file (default: ~/.config/hublab/signing.key if it exists)")
    p.add_argument("--unsigned", action="store_true", help="do not sign")
    _common(p)
    p = sub.add_parser("publish", help="publish a built DIR, or copy NAME[:TAG] from --from, to a registry")
    p.add_argument("source", help="package directory or NAME[:TAG]")
    p.add_argument("--tag", help="tag to publish under (default: the version, and latest)")
    p.add_argument("--from", dest="from_registry", help="registry to copy NAME[:TAG] from (default registry)")
    _common(p, registry=True)
    p = sub.add_parser("install", help="install NAME[:TAG] (the variant that fits the board)")
    p.add_argument("refs", nargs="+", metavar="NAME[:TAG]")
    p.add_argument("--variant", help="install this variant (name or quant) instead of the best fit")
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned or untrusted packages")
    _common(p, registry=True, models=True, profile=True)
    p = sub.add_parser("remove", help="uninstall packages")
    p.add_argument("names", nargs="+", metavar="NAME")
    _common(p, models=True)
    p = sub.add_parser("list", help="installed packages")
    _common(p, models=True)
    p = sub.add_parser("search", help="packages in a registry matching TERM")
    p.add_argument("term", nargs="?", default="")
    _common(p, registry=True)
    p = sub.add_parser("show", help="details of a package and how its variants fit the board")
    p.add_argument("ref", metavar="NAME[:TAG]")
    _common(p, registry=True, models=True, profile=True)
    p = sub.add_parser("update", help="install newer versions of installed packages")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--allow-unsigned", action="store_true", help="accept unsigned or untrusted packages")
    _common(p, registry=True, models=True, profile=True)
    p = sub.add_parser("verify", help="re-hash installed files; finish interrupted installs")
    p.add_argument("names", nargs="*", metavar="NAME")
    _common(p, models=True)


def run(argv: list[str]) -> int:
    """`pkg ARGV...` exactly as the command line prints it, for the hublab> shell.

    HublabError propagates (the caller prints it); argparse usage errors raise SystemExit(2).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="pkg", description="build, publish, install and verify model packages")
    add_arguments(parser)
    return cli(parser.parse_args(argv))


def _print_json(data) -> None:
    import json

    print(json.dumps(data, indent=2, default=str))


def cli(args) -> int:
    cmd = args.pkg_command
    kw_models = {"models_dir": getattr(args, "models_dir", None)}
    prof = getattr(args, "profile", None)
    bar = None if args.json else ProgressBar()
    if cmd == "keygen":
        r = keygen(args.out, trust=args.trust, force=args.force)
        if args.json:
            _print_json(r)
        else:
            print(f"key file    {r['key_file']}  (keep it private)\npublic key  {r['public_key']}")
            print(f"trusted in  {r['trusted_in']}" if r["trusted_in"] else
                  "add the public key to a device's system.toml [trust] keys to accept packages signed with it")
        return 0
    if cmd == "build":
        r = build(args.directory, key=args.key, sign=not args.unsigned)
        if args.json:
            _print_json(r.to_dict())
        else:
            print(f"built {r.name} {r.version} ({r.category}): {r.files} files, {format_size(r.size)}"
                  + (f", variants {', '.join(r.variants)}" if r.variants else ""))
            print(f"digest {r.digest}")
            print(f"signed by {r.signed_by}" if r.signed_by else "not signed (make a key with hublab pkg keygen)")
        return 0
    if cmd == "publish":
        r = publish(args.source, args.registry, tag=args.tag, from_registry=args.from_registry, progress=bar)
        if args.json:
            _print_json(r.to_dict())
        else:
            print(f"published {r.name} {r.version} as {', '.join(r.tags)} to {r.registry} "
                  f"({r.uploaded_blobs} blobs uploaded, {r.skipped_blobs} already there)"
                  + ("" if r.signed_by else "; unsigned"))
        return 0
    if cmd == "install":
        results = [install(ref, args.registry, profile=prof, variant=args.variant,
                           allow_unsigned=args.allow_unsigned, progress=bar, **kw_models) for ref in args.refs]
        if args.json:
            _print_json([r.to_dict() for r in results])
        for r in results if not args.json else []:
            what = f"{r.name} {r.version}" + (f" [{r.variant}]" if r.variant else "")
            if r.status == "unchanged":
                print(f"{what} is already installed and intact")
            else:
                prev = f" (was {r.previous})" if r.previous else ""
                print(f"{r.status} {what}{prev} for {r.profile} in {r.root}: {r.files} files, "
                      f"{format_size(r.size)}, {format_size(r.downloaded)} downloaded in {r.seconds:.1f} s"
                      + ("" if r.signed_by else "; NOT signed by a trusted key"))
        return 0
    if cmd == "remove":
        results = [remove(n, **kw_models) for n in args.names]
        if args.json:
            _print_json(results)
        for r in results if not args.json else []:
            print(f"removed {r['name']} {r['version']} ({format_size(r['freed'])})")
        return 0
    if cmd == "list":
        recs = list_packages(**kw_models)
        if args.json:
            _print_json([r.to_dict() for r in recs])
        elif not recs:
            print("no packages installed")
        for r in recs if not args.json else []:
            variant = f" [{r.variant}]" if r.variant else ""
            print(f"{r.name:<24} {r.version:<10} {r.category:<7} {format_size(r.size):>10}{variant}  {r.description}")
        return 0
    if cmd == "search":
        found = search(args.term, args.registry)
        if args.json:
            _print_json(found)
        elif not found:
            print("no packages match")
        for p in found if not args.json else []:
            print(f"{p['name']:<24} {p['version']:<10} {p['category']:<7} {format_size(p['size']):>10}  "
                  f"{p['description']}")
        return 0
    if cmd == "show":
        info = show(args.ref, args.registry, profile=prof, **kw_models)
        if args.json:
            _print_json(info)
            return 0
        rec = info.get("installed")
        if "package" in info:
            p = info["package"]
            print(f"{p['name']} {p['version']} ({p['category']})  {p['description']}")
            print(f"registry  {info['registry']}  tags: {', '.join(p['tags'])}")
            print(f"signed by {info['signed_by'] or '(unsigned)'}")
            if p["experts"]:
                print(f"experts   {', '.join(p['experts'])}")
            print(f"variants on {info['profile']}:")
            for i, v in enumerate(info["variants"]):
                mark = "*" if i == 0 and v["fits"] else ("-" if not v["fits"] else " ")
                print(f"  {mark} {v['variant'] or '(single)':<12} {v['quant']:<8} {format_size(v['size']):>10}  "
                      f"{v['reason']}")
        if rec:
            print(f"installed {rec['version']}" + (f" [{rec['variant']}]" if rec["variant"] else "")
                  + f" in {rec['root']} from {rec['registry']}")
        if info.get("registry_error"):
            print(f"registry: {info['registry_error']}")
        return 0
    if cmd == "update":
        results = update(args.names or None, args.registry, profile=prof, allow_unsigned=args.allow_unsigned,
                         progress=bar, **kw_models)
        if args.json:
            _print_json([r.to_dict() for r in results])
        elif not results:
            print("no packages installed")
        for r in results if not args.json else []:
            if r.status == "updated":
                print(f"{r.name}: {r.old_version} -> {r.new_version} {r.detail}".rstrip())
            elif r.status == "up-to-date":
                print(f"{r.name}: {r.old_version} is up to date")
            else:
                print(f"{r.name}: update failed: {r.detail}")
        return 0 if all(r.status != "failed" for r in results) else 1
    if cmd == "verify":
        v = verify(args.names or None, **kw_models)
        if args.json:
            _print_json(v.to_dict())
            return 0 if v.ok else 1
        for a in v.recovered:
            print(f"recovered: {a}")
        for r in v.packages:
            print(f"{r.name} {r.version}: " + ("ok" if r.ok else "; ".join(r.problems)) + f"  ({r.files} files)")
        for prob in v.store_problems:
            print(f"store: {prob}")
        if not v.packages and not v.store_problems:
            print("no packages installed")
        return 0 if v.ok else 1
    raise PackageError(f"unknown pkg command {cmd!r}")
