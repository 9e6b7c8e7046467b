"""The verbs that change or check the installed store: `install` (and `check`, its dry run), `update`,
`verify`, `remove` and `list_packages`.

Install is a transaction: manifest and package.toml first (signature, schema, fit check against the
board profile), then the needed blobs into the cache (resumable, sha256-checked), then a complete tree
in .hublab/staging, fsync'd, and one rename into place. An update swaps the trees with
renameat2(RENAME_EXCHANGE) where the filesystem has it, else two renames whose half-done state
`Store.recover()` (run first by every mutating verb and by verify) rolls forward. A kill -9 at any point
leaves the old package or the new one.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hublab import __version__

from ..config import format_size, tomllib
from ..errors import HublabError
from .manifest import MANIFEST_NAME, FileEntry, Manifest, join_inside, parse_manifest, requirement_met
from ..engine.profiles import Profile
from .registry import Progress, Registry, Resolved, parse_ref, resolve
from .signing import check_trust
from .context import PackageError, context, one_line_errors, opened
from .fit import Choice, select_variant
from .fs import fsync_path, path_kind
from .store import Installed, Store, check_files, package_root, read_record


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


@one_line_errors("checking the package")
def check(ref: str, registry: str | Path | None = None, *, profile: Profile | str | None = None,
          variant: str | None = None, allow_unsigned: bool = False, trusted_keys: list[str] | None = None,
          config: str | Path | None = None) -> Choice:
    """Every check `install` makes before downloading (signature, schema, paths, version, board fit),
    writing nothing; PackageError/RegistryError on the first failure, else the variant it would pick."""
    ctx = context(config, None, registry, profile, trusted_keys)
    name, tag = parse_ref(ref)
    with opened(ctx.registry) as reg:
        _, m, _ = _verified_package(reg, name, tag, ctx.trusted, allow_unsigned)
        return select_variant(m, ctx.profile, variant)


@one_line_errors("installing")
def install(ref: str, registry: str | Path | None = None, *, models_dir: str | Path | None = None,
            profile: Profile | str | None = None, variant: str | None = None, allow_unsigned: bool = False,
            trusted_keys: list[str] | None = None, progress: Progress | None = None,
            config: str | Path | None = None) -> InstallResult:
    """Install NAME[:TAG] from a registry: the best variant that fits the board, atomically."""
    ctx = context(config, models_dir, registry, profile, trusted_keys)
    name, tag = parse_ref(ref)
    store = Store(ctx.models_dir)
    with opened(ctx.registry) as reg:
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
            and not check_files(existing)):
        return result("unchanged")
    _check_space(store, choice)
    # 1. blobs into the cache, each checked against its sha256 (resumes a partial download)
    digests: dict[str, Path] = {}
    downloaded = reused = 0
    todo = {f.digest: f for f in choice.files}
    for i, f in enumerate(todo.values(), start=1):
        got = store.cache.fetch(reg, m.name, res.layers[f.path], label=f"[{i}/{len(todo)}] {f.path}",
                                progress=progress)
        digests[f.digest] = got.path
        downloaded += got.downloaded
        reused += got.reused
    # 2. a complete tree in staging, fsync'd, then 3. checked before it replaces anything
    stage = store.staging / f"{m.name}.tmp-{secrets.token_hex(4)}"
    try:
        _stage_tree(stage, m, res, signer, choice, prof, root, digests)
    except BaseException:
        # The installed tree was never touched; the downloads go back to the cache for the next try
        # (the cache re-hashes them before use).
        for f in choice.files:
            staged = stage.joinpath(*f.path.split("/"))
            if path_kind(staged) == "file" and path_kind(digests[f.digest]) == "missing":
                with contextlib.suppress(OSError):
                    os.rename(staged, digests[f.digest])
        shutil.rmtree(stage, ignore_errors=True)
        raise
    # 4. one rename (or exchange) into place
    old_root = existing.root if existing else None
    store.commit(m.name, stage, root)
    if old_root and old_root != root and path_kind(old_root) == "dir":
        store.discard(old_root, m.name)  # the package changed category
    store.cache.drop_partials(todo)
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
                       quant=choice.quant, profile=prof.name, signed_by=signer, installed=_now_iso(),
                       description=m.description, experts=m.experts, models=m.models, router=m.router,
                       files=[FileEntry(f.path, f.role, f.size, f.sha256) for f in choice.files])
    with open(stage / MANIFEST_NAME, "w", encoding="utf-8") as fh:
        fh.write(record.to_toml())
        fh.flush()
        os.fsync(fh.fileno())
    for dirpath, _, _ in os.walk(stage):
        fsync_path(Path(dirpath))
    bad = check_files(read_record(stage), rehash=False)
    if bad:
        raise PackageError(f"{m.name}: staged install failed its check ({bad[0]}); nothing was changed")


def _check_conflicts(store: Store, m: Manifest, root: Path, existing: Installed | None,
                     installed: dict[str, Installed]) -> None:
    store.check_target(m.name, root, existing)
    if path_kind(root) == "dir" and not (existing and existing.root == root):
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
                or path_kind(path) != "file"):
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


@one_line_errors("verifying the store")
def verify(names: list[str] | None = None, *, models_dir: str | Path | None = None,
           config: str | Path | None = None) -> VerifyResult:
    """Finish interrupted transactions, then re-hash every installed file against its record."""
    ctx = context(config, models_dir)
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
        probs = check_files(rec)
        reports.append(VerifyReport(rec.name, rec.version, str(root), len(rec.files), not probs, probs))
    if names:
        missing = sorted(set(names) - {r.name for r in reports})
        if missing:
            raise PackageError(f"{missing[0]}: not installed in {store.models_dir}; see hublab pkg list")
    if path_kind(store.staging) == "dir" and not store.problems:
        left = [p.name for p in store.staging.iterdir()]
        store_problems += [f"{store.staging / n}: leftover from an interrupted operation" for n in left]
    return VerifyResult(reports, recovered, store_problems)


@one_line_errors("removing the package")
def remove(name: str, *, models_dir: str | Path | None = None, config: str | Path | None = None) -> dict:
    """Uninstall a package (its directory disappears in one rename)."""
    ctx = context(config, models_dir)
    store = Store(ctx.models_dir)
    with store.lock():
        store.recover()
        rec = store.get(name)
        if rec is None:
            raise PackageError(f"{name}: not installed in {store.models_dir}; see hublab pkg list")
        store.discard(rec.root, name)
    return {"name": name, "version": rec.version, "root": str(rec.root), "freed": rec.size}


@one_line_errors("listing packages")
def list_packages(*, models_dir: str | Path | None = None, config: str | Path | None = None) -> list[Installed]:
    """Installed packages, by name."""
    ctx = context(config, models_dir)
    return sorted(Store(ctx.models_dir).installed().values(), key=lambda r: r.name)


@dataclass
class UpdateResult:
    name: str
    status: str      # updated | up-to-date | failed
    old_version: str
    new_version: str
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@one_line_errors("updating")
def update(names: list[str] | None = None, registry: str | Path | None = None, *,
           models_dir: str | Path | None = None, profile: Profile | str | None = None,
           allow_unsigned: bool = False, trusted_keys: list[str] | None = None,
           progress: Progress | None = None, config: str | Path | None = None) -> list[UpdateResult]:
    """Re-resolve each installed package's tag in its registry and install what changed."""
    ctx = context(config, models_dir, None, profile, trusted_keys)
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


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
