"""The author's verbs: `keygen` (an ed25519 signing key), `build` (fill in a package directory's
package.toml and sign it) and `publish` (a built directory, or a package copied from another registry,
pushed to a registry as an OCI artifact)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import load_system, set_system_value, tomllib
from .manifest import (MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, ManifestError, describe_models,
                        digest_bytes, dump_manifest, infer_role, manifest_from_dict, parse_manifest, sha256_file,
                        source_files, variant_of)
from .registry import (ANN_DESCRIPTION, ANN_SIGNATURE, ANN_TITLE, ANN_VERSION, MEDIA_CONFIG, MEDIA_FILE, Descriptor,
                        DirRegistry, Progress, Registry, RegistryError, oci_manifest, parse_ref, resolve)
from .signing import Signature, default_key_path, generate_key, sign_digest
from .signing import verify as verify_signature
from .cache import BlobCache
from .context import PackageError, context, one_line_errors, opened


@one_line_errors("making a key")
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


@one_line_errors("building the package")
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
        verify_signature(sig, digest_bytes(raw), str(sig_path))
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


@one_line_errors("publishing")
def publish(source: str | Path, registry: str | Path | None = None, *, tag: str | None = None,
            from_registry: str | Path | None = None, progress: Progress | None = None,
            config: str | Path | None = None) -> PublishResult:
    """Publish a built package directory, or copy NAME[:TAG] from another registry, to `registry`."""
    ctx = context(config, registry=registry)
    src = Path(str(source)).expanduser()
    if src.is_dir():
        return _publish_dir(src, ctx.registry, tag, progress)
    name, src_tag = parse_ref(str(source))
    origin = str(from_registry) if from_registry else context(config).registry
    if origin.rstrip("/") == ctx.registry.rstrip("/"):
        raise PackageError(f"{source}: already in {origin}; give --registry to copy it elsewhere, or a package "
                           "directory to publish")
    with opened(origin) as src_reg, opened(ctx.registry) as dst:
        res = resolve(src_reg, name, src_tag)
        m = parse_manifest(res.package_raw, f"{res.source} package.toml")
        if isinstance(dst, DirRegistry):
            dst.init()
        uploaded = skipped = 0
        with tempfile.TemporaryDirectory(prefix="hublab-copy-") as tmp:
            for path, desc in list(res.layers.items()) + [(MANIFEST_NAME, res.config)]:
                before = dst.has_blob(name, desc.digest, desc.size)
                _copy_blob(src_reg, dst, name, desc, Path(tmp), progress, label=path)
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
    with opened(registry) as reg:
        if isinstance(reg, DirRegistry):
            reg.init()
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


def _copy_blob(src: Registry, dst: Registry, name: str, desc: Descriptor, tmpdir: Path,
               progress: Progress | None = None, label: str = "") -> None:
    """Copy one blob between registries through a verified local file."""
    if dst.has_blob(name, desc.digest, desc.size):
        return
    if isinstance(src, DirRegistry):
        path = src.blob_path(desc.digest)
        if sha256_file(path) != desc.hex:
            raise RegistryError(f"{path}: blob does not match its digest; the source registry is corrupt")
    else:
        path = BlobCache(tmpdir).fetch(src, name, desc, label=label, progress=progress).path
    dst.push_blob(name, desc, path, progress=progress, label=label)
    if path.parent == tmpdir:
        path.unlink()
