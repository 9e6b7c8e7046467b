"""The installed store: the packages under one models_dir, their install records, and the transaction
machinery (lock, staging, commit, recovery) that leaves the old package or the new one after a kill -9.

    <models_dir>/packages/<name>/   base models and bundles
    <models_dir>/experts/<name>/    experts
    <models_dir>/router/            the router package (the runtime's default router directory)
    <models_dir>/.hublab/           lock, staging trees, blob cache (partial downloads for resume)

Each package root holds the files of the chosen variant and `package.toml`, the installed-state record
(manifest digest, registry, tag, variant, and size + sha256 of every file) that `pkg verify` re-hashes.

Store state is judged by what each path is (lstat: a dangling symlink is not "nothing there"): the
store's own paths are healed, anything else in the way is refused in one line before a download.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import toml_value, tomllib
from .manifest import CATEGORIES, MANIFEST_NAME, FileEntry, ManifestError, safe_relpath, sha256_file
from .registry import valid_name
from .cache import BlobCache
from .context import PackageError
from .fs import describe, exchange, fsync_path, path_kind, remove_any, tree_files

STATE = ".hublab"


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

    def to_toml(self) -> str:
        """The record as package.toml text (written by us, byte-stable)."""
        lines = ["# hublab installed-package record: pkg verify re-hashes the files listed here.", "[package]"]
        for key in ("name", "version", "category", "description", "experts", "models", "router"):
            lines.append(f"{key} = {toml_value(getattr(self, key))}")
        lines += ["", "[install]"]
        for key in ("digest", "registry", "tag", "variant", "quant", "profile", "signed_by", "installed"):
            lines.append(f"{key} = {toml_value(getattr(self, key))}")
        for f in self.files:
            lines += ["", "[[files]]", f"path = {toml_value(f.path)}", f"role = {toml_value(f.role)}",
                      f"size = {f.size}", f"sha256 = {toml_value(f.sha256)}"]
        return "\n".join(lines) + "\n"


def read_record(root: Path) -> Installed:
    path = root / MANIFEST_NAME
    try:
        if path_kind(path) != "file":  # a fifo would block the read, a link could lead anywhere
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


class Store:
    """The installed packages under one models_dir, and the transaction machinery around them.

    The store's own paths (.hublab, staging, blobs, lock) are checked before every use: what is ours is
    healed, what is not (the user's file where the store wants a directory) is refused with one line.
    """

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self.state = self.models_dir / STATE
        self.staging = self.state / "staging"
        self.cache = BlobCache(self.state / "blobs")  # downloads, kept to resume
        self.healed: list[str] = []     # what the layout check repaired, reported by recover()
        self.problems: list[str] = []   # what recover() could not repair, reported by verify

    def _require_dir(self, path: Path, what: str, fix: str) -> None:
        """`path` is a directory (a symlink to one is fine); make it if missing; PackageError otherwise."""
        kind = path_kind(path)
        if kind == "missing":
            path.mkdir(parents=True, exist_ok=True)
        elif not (kind == "dir" or (kind == "symlink" and path.is_dir())):
            raise PackageError(f"{path}: is {describe(path)}, where hublab keeps {what}; {fix}")

    def prepare(self) -> None:
        """Check and heal the store's own layout (call before taking the lock)."""
        self._require_dir(self.models_dir, "its models",
                          "move it away or point [runtime] models_dir in system.toml at a directory")
        if path_kind(self.state) != "dir":  # a symlinked .hublab would put staging on another file system
            if path_kind(self.state) != "missing":
                raise PackageError(f"{self.state}: is {describe(self.state)}, where hublab keeps its store state "
                                   "(lock, staging, downloads); move it away")
            self.state.mkdir(exist_ok=True)
        for path in (self.staging, self.cache.root):
            if path_kind(path) not in ("dir", "missing"):  # ours: a stray file or link is replaced
                self.healed.append(f"replaced {describe(path)} at {path.relative_to(self.models_dir)}")
                remove_any(path)
            path.mkdir(exist_ok=True)
        lock = self.state / "lock"
        if path_kind(lock) not in ("file", "missing"):
            self.healed.append(f"replaced {describe(lock)} at {lock.relative_to(self.models_dir)}")
            remove_any(lock)

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
                out += sorted(p for p in d.iterdir() if path_kind(p) == "dir")
        if path_kind(self.models_dir / "router") == "dir":
            out.append(self.models_dir / "router")
        # Folders without a record are the user's own model folders, not packages.
        return [p for p in out if path_kind(p / MANIFEST_NAME) == "file"]

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
        if path_kind(root) != "dir":
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
        if path_kind(self.staging) != "dir":
            return actions
        entries = sorted(self.staging.iterdir())
        trees: dict[str, dict[str, Path]] = {}
        for p in entries:
            base, _, suffix = p.name.rpartition(".")
            # NAME.tmp-<hex> and NAME.del-<hex> never end in .new/.old, whatever NAME is ("a.tmp-b" is a name)
            if suffix in ("new", "old") and path_kind(p) == "dir":
                trees.setdefault(base, {})[suffix] = p
                continue
            # unfinished trees, half-removed packages, and anything else: staging is ours alone
            try:
                remove_any(p)
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
            elif path_kind(root) == "missing" and path_kind(root.parent) == "dir":
                os.rename(p, root)
                fsync_path(root.parent)
                actions.append(f"{name}: " + (f"completed interrupted install of {recs[p].version}" if p is new
                                              else f"restored previous version {recs[p].version}"))
            elif p is new:
                shutil.rmtree(p)  # never installed: nothing is lost by dropping it
                actions.append(f"{name}: dropped unfinished install of {recs[p].version} "
                               f"({root} is {describe(root)})")
            else:
                what = (describe(root) if path_kind(root) != "missing"
                        else f"missing, and {root.parent} is {describe(root.parent)}")
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
        kind = path_kind(root)
        if kind in ("symlink", "file", "other"):
            raise PackageError(f"{root}: is {describe(root)}, where {name} would be installed; move it away "
                               "and install again")
        parent = root.parent
        if os.stat(parent).st_dev != os.stat(self.staging).st_dev:
            raise PackageError(f"{parent}: is on another file system than {self.staging}, so an install cannot "
                               "replace a package in one step; make it a plain directory inside models_dir")
        if existing is not None:
            listed = {MANIFEST_NAME} | {f.path for f in existing.files}
            foreign = [p for p in tree_files(existing.root) if p not in listed]
            if foreign:
                raise PackageError(f"{existing.root / foreign[0]}: is not part of package {name}, and an update "
                                   "replaces the whole directory; move it out first")

    def commit(self, name: str, stage: Path, root: Path) -> None:
        """Move a complete, fsync'd staging tree to `root`, replacing what is there in one step."""
        new = self.staging / f"{name}.new"
        remove_any(new)
        os.rename(stage, new)
        fsync_path(self.staging)
        if path_kind(root) == "missing":
            os.rename(new, root)
        elif path_kind(root) != "dir":
            raise PackageError(f"{root}: is {describe(root)}, where {name} would be installed; move it away")
        elif exchange(new, root):
            pass  # `new` now holds the previous tree
        else:
            old = self.staging / f"{name}.old"
            os.rename(root, old)
            os.rename(new, root)
            new = old
        fsync_path(root.parent)
        fsync_path(self.staging)
        shutil.rmtree(new, ignore_errors=True)

    def discard(self, root: Path, name: str) -> None:
        """Remove a package root atomically (rename away, then delete)."""
        trash = self.staging / f"{name}.del-{secrets.token_hex(4)}"
        os.rename(root, trash)
        fsync_path(root.parent)
        shutil.rmtree(trash, ignore_errors=True)


def check_files(rec: Installed, rehash: bool = True) -> list[str]:
    """What is wrong with an installed package's files; [] when it is intact."""
    out = []
    listed = {MANIFEST_NAME}
    for f in rec.files:
        listed.add(f.path)
        p = rec.root.joinpath(*f.path.split("/"))
        kind = path_kind(p)
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
    out += [f"{rel}: not part of the package" for rel in tree_files(rec.root) if rel not in listed]
    return out
