"""Package registries: a plain directory (OCI image layout) or any OCI distribution registry.

Both store a package the same way, as an OCI artifact:

    OCI manifest (application/vnd.oci.image.manifest.v1+json, artifactType application/vnd.hublab.package.v1)
      config  = package.toml bytes            (application/vnd.hublab.package.config.v1+toml)
      layers  = one blob per package file     (application/vnd.hublab.package.file.v1, title = its path)
      annotations: version, description, and the signature JSON (dev.hublab.package.signature)

so a package copies between a USB stick and a server byte for byte, signature included, and install
can read the small manifest and package.toml first, check the board fit, and only then fetch the
blobs it needs (one variant's files, not all of them).

A directory registry is the OCI image-layout: `oci-layout`, `index.json` (descriptors annotated with
`org.opencontainers.image.ref.name` = "name:tag") and `blobs/sha256/<hex>`. It needs no server and works
from an SD card or USB stick.

Remote registries are spoken to with httpx (already a runtime dependency) rather than `oras` from PyPI:
oras-py pulls a whole artifact to a folder in one call, with no way to stop after the manifest for the fit
check, no HTTP Range resume of a half-downloaded blob, and no per-blob progress; it would also add
requests and jsonschema to the Pi. The part of the distribution protocol needed here (manifests, blob
HEAD/GET with Range, monolithic blob upload, catalog, tags, Basic and Bearer token auth) is small.
Credentials come from HUBLAB_REGISTRY_USERNAME / HUBLAB_REGISTRY_PASSWORD, or a ready bearer token in
HUBLAB_REGISTRY_TOKEN.

A registry is not trusted to behave: every blob is checked against its sha256 before use, a download cut
off mid-way is resumed (HTTP Range) a few times and then left to resume on the next run, a transfer
slower than MIN_RATE over HUBLAB_REGISTRY_TIMEOUT seconds (default 30) is abandoned, manifests are read
within that time and at most MAX_SMALL bytes, and credentials only ever go to the registry's own origin:
a token realm, a redirect, an upload location or a next-page link on another host gets none (unless the
host is listed in HUBLAB_REGISTRY_AUTH_HOSTS, as a registry whose token server lives elsewhere needs).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol
from urllib.parse import urljoin, urlsplit

from ..errors import HublabError
from ..inputs import quote
from .manifest import ManifestError, safe_relpath, sha256_file
from .signing import Signature

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
ARTIFACT_TYPE = "application/vnd.hublab.package.v1"
MEDIA_CONFIG = "application/vnd.hublab.package.config.v1+toml"
MEDIA_FILE = "application/vnd.hublab.package.file.v1"
ANN_TITLE = "org.opencontainers.image.title"
ANN_REF = "org.opencontainers.image.ref.name"
ANN_VERSION = "org.opencontainers.image.version"
ANN_DESCRIPTION = "org.opencontainers.image.description"
ANN_SIGNATURE = "dev.hublab.package.signature"
MAX_SMALL = 4 << 20  # manifests and package.toml are read into memory; anything bigger is not ours
CHUNK = 1 << 20
MIN_RATE = 1024      # bytes/s: a download slower than this over a whole timeout window is abandoned
RESUMES = 4          # a blob cut off mid-way is resumed this many times in one run
DEFAULT_TIMEOUT = 30.0

Progress = Callable[[str, int, int], None]  # (label, bytes done, bytes total)


class RegistryError(HublabError):
    """A registry cannot be reached, refuses us, or serves something that is not a valid package."""


class NotFound(RegistryError):
    pass


class Interrupted(RegistryError):
    """A download stopped part-way (connection lost, too slow); what arrived is kept to resume from."""


# ---------------------------------------------------------------------------------------------------
# References and descriptors

_NAME_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def valid_name(name: object) -> bool:
    """Whether `name` is a package name (the schema's pattern, at most 64 characters)."""
    return isinstance(name, str) and len(name) <= 64 and _NAME_RE.fullmatch(name) is not None


def parse_ref(ref: str) -> tuple[str, str]:
    """'name' -> (name, 'latest'); 'name:1.2' -> (name, '1.2')."""
    name, _, tag = ref.strip().partition(":")
    tag = tag or "latest"
    if not _NAME_RE.fullmatch(name) or not _TAG_RE.fullmatch(tag):
        raise RegistryError(f"{quote(ref)} is not a package reference; write NAME or NAME:TAG "
                            "(lower-case letters, digits, '.', '_', '-')")
    return name, tag


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def to_json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @classmethod
    def from_json(cls, d: object, source: str) -> "Descriptor":
        if not isinstance(d, dict):
            raise RegistryError(f"{source}: a descriptor is not an object; the registry content is corrupt")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise RegistryError(f"{source}: descriptor digest {quote(digest)} is not sha256:<64 hex>; republish the "
                                "package")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size >= 1 << 50:
            raise RegistryError(f"{source}: descriptor size {quote(size)} is not a byte count; republish the package")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
            raise RegistryError(f"{source}: annotations must map strings to strings; republish the package")
        return cls(media_type=str(d.get("mediaType", "")), digest=digest, size=size, annotations=ann)


def oci_manifest(package_raw: bytes, layers: list[Descriptor], annotations: dict[str, str]) -> bytes:
    """The OCI manifest for a package (deterministic bytes)."""
    config = Descriptor(MEDIA_CONFIG, "sha256:" + hashlib.sha256(package_raw).hexdigest(), len(package_raw))
    doc = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": config.to_json(), "layers": [d.to_json() for d in layers], "annotations": annotations}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Resolved:
    """What a registry says about NAME:TAG before any file blob is fetched."""
    registry: str
    name: str
    tag: str
    manifest_digest: str          # of the OCI manifest
    oci_raw: bytes
    config: Descriptor
    package_raw: bytes            # package.toml
    signature: Signature | None
    layers: dict[str, Descriptor]  # by package path

    @property
    def package_digest(self) -> str:
        return self.config.digest

    @property
    def source(self) -> str:
        return f"{self.registry} {self.name}:{self.tag}"


def parse_oci(raw: bytes, source: str) -> tuple[Descriptor, list[Descriptor], dict]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise RegistryError(f"{source}: manifest is not JSON; the registry content is corrupt") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise RegistryError(f"{source}: not an OCI image manifest (schemaVersion 2); is this a hublab package?")
    config = Descriptor.from_json(doc.get("config"), source)
    if config.media_type != MEDIA_CONFIG:
        raise RegistryError(f"{source}: not a hublab package (config media type {quote(config.media_type)}); "
                            "publish it with hublab pkg publish")
    layers = doc.get("layers") or []
    if not isinstance(layers, list):
        raise RegistryError(f"{source}: manifest layers is not a list; the registry content is corrupt")
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise RegistryError(f"{source}: manifest annotations is not an object; the registry content is corrupt")
    return config, [Descriptor.from_json(d, source) for d in layers], ann


class Registry(Protocol):
    """What install, publish, search and show need of a registry; DirRegistry and OCIRegistry implement it."""
    location: str   # the directory or URL, as install records and messages name it

    def get_manifest(self, name: str, tag: str) -> bytes:
        """The OCI manifest of NAME:TAG (NotFound when there is none)."""

    def open_blob(self, name: str, digest: str, offset: int) -> ContextManager[tuple[int, Iterator[bytes]]]:
        """(the offset the bytes start at, the bytes) of a blob from `offset` on (Interrupted when cut off)."""

    def has_blob(self, name: str, digest: str, size: int) -> bool:
        """Whether the registry holds the blob already."""

    def names(self) -> list[str]:
        """The packages it holds."""

    def tags(self, name: str) -> list[str]:
        """The tags of package `name`."""

    def push_blob(self, name: str, desc: Descriptor, src: Path, progress: Progress | None = None,
                  label: str = "") -> bool:
        """Upload file `src` as blob `desc`; False when it was there already."""

    def push_manifest(self, name: str, tags: list[str], raw: bytes) -> str:
        """Point each of `tags` at manifest `raw`; its digest."""

    def close(self) -> None:
        """Let go of connections."""


def resolve(reg: Registry, name: str, tag: str) -> Resolved:
    """Fetch and check the OCI manifest, package.toml and signature of NAME:TAG (no file blobs)."""
    source = f"{reg.location} {name}:{tag}"
    raw = reg.get_manifest(name, tag)
    config, layers, ann = parse_oci(raw, source)
    if config.size > MAX_SMALL:
        raise RegistryError(f"{source}: package.toml is {config.size} bytes, larger than any real manifest; "
                            "refusing it")
    package_raw = read_blob(reg, name, config)
    sig = None
    if ann.get(ANN_SIGNATURE):
        sig = Signature.from_json(ann[ANN_SIGNATURE], source)
    by_path: dict[str, Descriptor] = {}
    for d in layers:
        title = d.annotations.get(ANN_TITLE, "")
        try:
            safe_relpath(title, f"{source}: layer {d.digest[:19]}")
        except ManifestError as exc:
            raise RegistryError(str(exc)) from None
        if title in by_path:
            raise RegistryError(f"{source}: two layers are titled {quote(title)}; republish the package")
        by_path[title] = d
    return Resolved(registry=reg.location, name=name, tag=tag,
                    manifest_digest="sha256:" + hashlib.sha256(raw).hexdigest(), oci_raw=raw, config=config,
                    package_raw=package_raw, signature=sig, layers=by_path)


def read_blob(reg: Registry, name: str, desc: Descriptor) -> bytes:
    """A small blob, read into memory and checked against its digest (read again if cut off)."""
    for attempt in range(RESUMES + 1):
        buf = bytearray()
        try:
            with reg.open_blob(name, desc.digest, 0) as (_, chunks):
                for chunk in chunks:
                    buf += chunk
                    if len(buf) > max(desc.size, 0) or len(buf) > MAX_SMALL:
                        break
            break
        except Interrupted:
            if attempt == RESUMES:
                raise
    if len(buf) != desc.size or hashlib.sha256(buf).hexdigest() != desc.hex:
        raise RegistryError(f"{reg.location} {name}: blob {desc.digest[:19]}… does not match its digest; "
                            "the registry content is corrupt or was tampered with")
    return bytes(buf)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Directory registry (OCI image layout)

class DirRegistry:
    """A registry that is a plain directory: oci-layout, index.json, blobs/sha256/<hex>."""

    location: str

    def __init__(self, root: Path):
        # Absolute, so the install record's registry still works from another working directory.
        self.root = Path(root).expanduser().absolute()
        self.location = str(self.root)

    def close(self) -> None:
        pass

    # -- layout
    def _require(self) -> None:
        if not (self.root / "index.json").is_file():
            raise RegistryError(f"{self.root}: not a hublab registry (no index.json); publish a package to it "
                                "first or fix --registry")

    def init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            _write_atomic(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        if not (self.root / "index.json").exists():
            _write_atomic(self.root / "index.json", self._index_bytes([]))

    @contextlib.contextmanager
    def _locked(self):
        self.init()
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _index_bytes(manifests: list[dict]) -> bytes:
        doc = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    def _index(self) -> list[dict]:
        self._require()
        try:
            doc = json.loads((self.root / "index.json").read_bytes())
            manifests = doc["manifests"]
            assert isinstance(manifests, list)
        except (ValueError, KeyError, AssertionError, OSError):
            raise RegistryError(f"{self.root / 'index.json'}: not an OCI index; restore it from a backup or "
                                "publish again into a new directory") from None
        return [m for m in manifests if isinstance(m, dict)]

    def blob_path(self, digest: str) -> Path:
        """Where blob `digest` lives in the layout (checked: a link may not lead out of the registry)."""
        if not _DIGEST_RE.fullmatch(digest):
            raise RegistryError(f"{self.root}: bad digest {digest!r}")
        path = self.root / "blobs" / "sha256" / digest[7:]
        if path.is_symlink():
            real, root = os.path.realpath(path), os.path.realpath(self.root)
            if os.path.commonpath([real, root]) != root:
                raise RegistryError(f"{path}: blob is a symlink leading out of the registry ({real}); "
                                    "refusing to read it")
        return path

    # -- reading
    def get_manifest(self, name: str, tag: str) -> bytes:
        ref = f"{name}:{tag}"
        for m in self._index():
            if (m.get("annotations") or {}).get(ANN_REF) == ref:
                desc = Descriptor.from_json(m, f"{self.root}/index.json")
                path = self.blob_path(desc.digest)
                try:
                    raw = path.read_bytes() if desc.size <= MAX_SMALL else b""
                except FileNotFoundError:
                    raise RegistryError(f"{path}: manifest blob of {ref} is missing; publish {ref} again") from None
                if hashlib.sha256(raw).hexdigest() != desc.hex:
                    raise RegistryError(f"{self.root} {ref}: manifest does not match its digest; the registry "
                                        "content is corrupt or was tampered with")
                return raw
        raise NotFound(f"{ref} not found in registry {self.root}; see what it has with hublab pkg search")

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: str, offset: int):
        path = self.blob_path(digest)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise RegistryError(f"{path}: blob of {name} is missing from the registry; publish {name} again") from None
        with f:
            f.seek(offset)
            yield offset, iter(lambda: f.read(CHUNK), b"")

    def has_blob(self, name: str, digest: str, size: int) -> bool:
        p = self.blob_path(digest)
        return p.is_file() and p.stat().st_size == size

    def names(self) -> list[str]:
        refs = [(m.get("annotations") or {}).get(ANN_REF, "") for m in self._index()]
        return sorted({r.partition(":")[0] for r in refs if ":" in r})

    def tags(self, name: str) -> list[str]:
        refs = [(m.get("annotations") or {}).get(ANN_REF, "") for m in self._index()]
        return sorted(r.partition(":")[2] for r in refs if r.partition(":")[0] == name)

    # -- writing
    def push_blob(self, name: str, desc: Descriptor, src: Path, progress: Progress | None = None,
                  label: str = "") -> bool:
        """Copy `src` in as blob `desc` (checked while copying); False when it was already there."""
        self.init()
        dest = self.blob_path(desc.digest)
        if dest.is_file() and dest.stat().st_size == desc.size and sha256_file(dest) == desc.hex:
            return False
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        h, done = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while block := f.read(CHUNK):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if progress:
                        progress(label or desc.digest[:19], done, desc.size)
                out.flush()
                os.fsync(out.fileno())
            if done != desc.size or h.hexdigest() != desc.hex:
                raise RegistryError(f"{src}: changed since the package was built (sha256 or size differs); "
                                    "run hublab pkg build again")
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(dest.parent)
        return True

    def push_manifest(self, name: str, tags: list[str], raw: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        with self._locked():
            dest = self.blob_path(digest)
            if not dest.exists():
                _write_atomic(dest, raw)
            refs = {f"{name}:{t}" for t in tags}
            manifests = [m for m in self._index() if (m.get("annotations") or {}).get(ANN_REF) not in refs]
            for t in tags:
                manifests.append({"mediaType": MEDIA_MANIFEST, "digest": digest, "size": len(raw),
                                  "artifactType": ARTIFACT_TYPE, "annotations": {ANN_REF: f"{name}:{t}"}})
            _write_atomic(self.root / "index.json", self._index_bytes(manifests))
        return digest


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------------
# OCI distribution registry over HTTP(S)

def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class OCIRegistry:
    """Client for the OCI distribution API: http(s)://host[:port][/namespace]."""

    location: str

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None, timeout: float | None = None):
        import httpx

        if timeout is None:
            timeout = registry_timeout()
        try:
            parts = urlsplit(url if "://" in url else "https://" + url)
        except ValueError:
            raise RegistryError(f"{quote(url)} is not a registry URL; use http(s)://host[:port][/namespace] or a "
                                "directory") from None
        scheme = "https" if parts.scheme == "oci" else parts.scheme
        try:
            parts.port  # noqa: B018 - a bad port raises here
        except ValueError:
            parts = parts._replace(netloc="")
        if scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError(f"{quote(url)} is not a registry URL; use http(s)://host[:port][/namespace] or a "
                                "directory")
        if parts.username or parts.password:
            raise RegistryError(f"{url}: do not put credentials in the URL; set HUBLAB_REGISTRY_USERNAME and "
                                "HUBLAB_REGISTRY_PASSWORD")
        self.base = f"{scheme}://{parts.netloc}"
        self.namespace = parts.path.strip("/")
        self.location = self.base + ("/" + self.namespace if self.namespace else "")
        self.username = username if username is not None else os.environ.get("HUBLAB_REGISTRY_USERNAME") or None
        self.password = password if password is not None else os.environ.get("HUBLAB_REGISTRY_PASSWORD") or ""
        preset = token if token is not None else os.environ.get("HUBLAB_REGISTRY_TOKEN")
        self._basic: str | None = None
        self._tokens: dict[str, str] = {}
        self._preset = f"Bearer {preset}" if preset else None
        self.timeout = timeout
        # httpx drops Authorization when a redirect leaves the origin, and stops after max_redirects
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True, max_redirects=10,
                                    headers={"User-Agent": "hublab-pkg"})
        self._httpx = httpx
        self._auth_hosts = {h.strip().lower() for h in os.environ.get("HUBLAB_REGISTRY_AUTH_HOSTS", "").split(",")
                            if h.strip()}

    def _own(self, url: str) -> bool:
        """Whether `url` is on the registry's own origin (scheme, host and port): the only place our
        credentials and tokens go."""
        return _origin(url) == _origin(self.base)

    def close(self) -> None:
        self._client.close()

    def repo(self, name: str) -> str:
        return f"{self.namespace}/{name}" if self.namespace else name

    # -- auth and transport
    def _auth(self, scope: str) -> str | None:
        return self._tokens.get(scope) or self._basic or self._preset

    def _login(self, resp, scope: str) -> None:
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        creds = (self.username, self.password) if self.username else None
        if scheme == "basic":
            if not creds:
                raise RegistryError(f"{self.location}: registry needs a login; set HUBLAB_REGISTRY_USERNAME and "
                                    "HUBLAB_REGISTRY_PASSWORD")
            self._basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return
        if scheme == "bearer" and params.get("realm"):
            realm = params["realm"]
            realm_parts = urlsplit(realm)
            if realm_parts.scheme not in ("http", "https") or not realm_parts.hostname:
                raise RegistryError(f"{self.location}: token realm {quote(realm)} is not an http(s) URL; "
                                    "is this a registry?")
            if urlsplit(self.base).scheme == "https" and realm_parts.scheme != "https":
                raise RegistryError(f"{self.location}: token realm {quote(realm)} is plain http for an https "
                                    "registry; refusing to log in over it")
            # The user's password goes to the registry's own host only, or to a host they listed
            # (the same host on another port is the registry's own token service, as docker deploys it)
            host = (realm_parts.hostname or "").lower()
            trusted = host == (urlsplit(self.base).hostname or "").lower() or host in self._auth_hosts
            query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
            try:
                r = self._client.get(realm, params={k: v for k, v in query.items() if v},
                                     auth=creds if trusted else None, follow_redirects=False)
                body_raw = r.content[:MAX_SMALL]
            except self._httpx.HTTPError as exc:
                raise RegistryError(f"{quote(realm)}: token server unreachable ({exc.__class__.__name__}); "
                                    "check the registry") from None
            if r.status_code in (401, 403):
                if creds and not trusted:
                    raise RegistryError(f"{self.location}: its token server {realm_parts.hostname} is another host; "
                                        "hublab sends your credentials only to the registry itself (list the host "
                                        "in HUBLAB_REGISTRY_AUTH_HOSTS to allow it)")
                raise RegistryError(f"{self.location}: login refused by {realm[:200]} (HTTP {r.status_code}); "
                                    "check HUBLAB_REGISTRY_USERNAME and HUBLAB_REGISTRY_PASSWORD")
            try:
                body = json.loads(body_raw)
                tok = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
                tok = tok if isinstance(tok, str) and 0 < len(tok) < 16384 and tok.isprintable() else None
            except (ValueError, RecursionError):
                tok = None
            if r.status_code != 200 or not tok:
                raise RegistryError(f"{quote(realm)}: no token in the answer (HTTP {r.status_code}); "
                                    "is this a registry token server?")
            self._tokens[scope] = f"Bearer {tok}"
            return
        raise RegistryError(f"{self.location}: registry asks for {scheme or 'an unknown'} authentication, which "
                            "hublab does not speak; use Basic or Bearer token auth")

    def _send(self, method: str, url: str, scope: str, *, headers: dict | None = None, content=None,
              stream: bool = False, retry: bool = True):
        headers = dict(headers or {})
        headers.pop("Authorization", None)
        auth = self._auth(scope) if self._own(url) else None  # never to another origin
        if auth:
            headers["Authorization"] = auth
        try:
            req = self._client.build_request(method, url, headers=headers, content=content)
            resp = self._client.send(req, stream=stream)
        except self._httpx.HTTPError as exc:
            raise RegistryError(f"{self.location}: cannot reach the registry ({exc.__class__.__name__}: {exc}); "
                                "check the URL and that the registry is running") from None
        if resp.status_code == 401 and retry and not callable(getattr(content, "__next__", None)):
            resp.close()
            self._login(resp, scope)
            return self._send(method, url, scope, headers=headers, content=content, stream=stream, retry=False)
        if resp.status_code == 401:
            resp.close()
            raise RegistryError(f"{self.location}: login refused (HTTP 401); check HUBLAB_REGISTRY_USERNAME and "
                                "HUBLAB_REGISTRY_PASSWORD")
        if resp.status_code == 403:
            resp.close()
            raise RegistryError(f"{self.location}: access denied (HTTP 403) for {method} {urlsplit(url).path}; "
                                "the account lacks permission")
        return resp

    def _fail(self, resp, what: str) -> RegistryError:
        try:
            resp.read()
            detail = "; ".join(str(e.get("message", "")) for e in resp.json().get("errors", []))
        except Exception:  # noqa: BLE001 - the body is only used to enrich the message
            detail = ""
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        shown = f": {detail}" if detail else ""
        return RegistryError(f"{self.location}: {what} failed (HTTP {resp.status_code}{shown})")

    def _scope(self, name: str, push: bool = False) -> str:
        return f"repository:{self.repo(name)}:{'pull,push' if push else 'pull'}"

    # -- reading
    def get_manifest(self, name: str, tag: str) -> bytes:
        url = f"{self.base}/v2/{self.repo(name)}/manifests/{tag}"
        resp = self._send("GET", url, self._scope(name), headers={"Accept": MEDIA_MANIFEST}, stream=True)
        try:
            if resp.status_code == 404:
                raise NotFound(f"{name}:{tag} not found in registry {self.location}; see what it has with "
                               "hublab pkg search")
            if resp.status_code != 200:
                raise self._fail(resp, f"reading manifest {name}:{tag}")
            body = bytearray()
            deadline = time.monotonic() + self.timeout
            try:
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_SMALL:
                        raise RegistryError(f"{self.location} {name}:{tag}: manifest larger than {MAX_SMALL} bytes; "
                                            "not a hublab package")
                    if time.monotonic() > deadline:
                        raise RegistryError(f"{self.location} {name}:{tag}: the manifest did not arrive within "
                                            f"{self.timeout:g} s; try again later")
            except self._httpx.HTTPError as exc:
                raise RegistryError(f"{self.location} {name}:{tag}: reading the manifest failed "
                                    f"({exc.__class__.__name__}); try again") from None
        finally:
            resp.close()
        return bytes(body)

    @contextlib.contextmanager
    def open_blob(self, name: str, digest: str, offset: int):
        url = f"{self.base}/v2/{self.repo(name)}/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._send("GET", url, self._scope(name), headers=headers, stream=True)
        try:
            if resp.status_code == 416 and offset:
                resp.close()
                resp = self._send("GET", url, self._scope(name), stream=True)
            if resp.status_code == 206:
                m = re.match(r"bytes (\d{1,18})-", resp.headers.get("Content-Range", ""))
                start = int(m.group(1)) if m else -1
                if start != offset:
                    raise RegistryError(f"{self.location}: answered Range bytes={offset}- with "
                                        f"{quote(resp.headers.get('Content-Range'))}; cannot resume")
            elif resp.status_code == 200:
                start = 0
            elif resp.status_code == 404:
                raise RegistryError(f"{self.location} {name}: blob {digest[:19]}… is missing; publish {name} again")
            else:
                raise self._fail(resp, f"downloading blob {digest[:19]}…")
            yield start, self._watched(resp)
        except self._httpx.HTTPError as exc:
            raise Interrupted(f"{self.location}: download interrupted ({exc.__class__.__name__}); run the "
                              "command again to resume") from None
        finally:
            resp.close()

    def _watched(self, resp) -> Iterator[bytes]:
        """The body as it arrives (a dripping server yields its drips: httpx's chunk_size would wait for a
        whole chunk), abandoned when a timeout window brings less than MIN_RATE bytes a second."""
        window_start, window_bytes = time.monotonic(), 0
        for chunk in resp.iter_bytes():
            yield chunk
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= self.timeout:
                if window_bytes < MIN_RATE * self.timeout:
                    raise Interrupted(f"{self.location}: download slower than {MIN_RATE} bytes/s for "
                                      f"{self.timeout:g} s; run the command again to resume")
                window_start, window_bytes = now, 0

    def has_blob(self, name: str, digest: str, size: int) -> bool:
        resp = self._send("HEAD", f"{self.base}/v2/{self.repo(name)}/blobs/{digest}", self._scope(name, True))
        resp.close()
        return resp.status_code == 200

    def _paged(self, url: str, scope: str, key: str) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        while url and url not in seen and len(seen) < 1000:  # a Link loop or an endless catalog ends here
            seen.add(url)
            resp = self._send("GET", url, scope)
            if resp.status_code == 404:
                return out
            if resp.status_code != 200:
                raise self._fail(resp, f"listing {key}")
            try:
                items = resp.json().get(key) or []
            except (ValueError, AttributeError, RecursionError):
                items = None
            if not isinstance(items, list):
                raise RegistryError(f"{self.location}: listing {key} did not answer a JSON list; is this a registry?")
            out += [i for i in items if isinstance(i, str)]
            link = re.search(r'<([^>]+)>;\s*rel="?next"?', resp.headers.get("Link", ""))
            url = urljoin(self.base, link.group(1)) if link else ""
            if url and not self._own(url):
                raise RegistryError(f"{self.location}: its next page of {key} is on another host ({quote(url)}); "
                                    "refusing to follow it")
        return out

    def names(self) -> list[str]:
        repos = self._paged(f"{self.base}/v2/_catalog?n=1000", "registry:catalog:*", "repositories")
        prefix = self.namespace + "/" if self.namespace else ""
        names = [r[len(prefix):] for r in repos if r.startswith(prefix)]
        return sorted(n for n in names if _NAME_RE.fullmatch(n))

    def tags(self, name: str) -> list[str]:
        return sorted(self._paged(f"{self.base}/v2/{self.repo(name)}/tags/list?n=1000", self._scope(name), "tags"))

    # -- writing
    def push_blob(self, name: str, desc: Descriptor, src: Path, progress: Progress | None = None,
                  label: str = "") -> bool:
        if self.has_blob(name, desc.digest, desc.size):
            return False
        scope = self._scope(name, push=True)
        resp = self._send("POST", f"{self.base}/v2/{self.repo(name)}/blobs/uploads/", scope)
        resp.close()
        if resp.status_code != 202 or "Location" not in resp.headers:
            raise self._fail(resp, f"starting upload of {label or desc.digest[:19]}")
        location = urljoin(self.base, resp.headers["Location"])
        if not self._own(location):
            raise RegistryError(f"{self.location}: upload location {quote(location)} is on another host; refusing to "
                                "send the package there")
        put_url = f"{location}{'&' if '?' in location else '?'}digest={desc.digest}"

        def body() -> Iterator[bytes]:
            done = 0
            with open(src, "rb") as f:
                while block := f.read(CHUNK):
                    done += len(block)
                    if progress:
                        progress(label or desc.digest[:19], done, desc.size)
                    yield block

        resp = self._send("PUT", put_url, scope, content=body(),
                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)})
        resp.close()
        if resp.status_code == 400:
            raise RegistryError(f"{src}: the registry rejected the upload as not matching {desc.digest[:19]}…; "
                                "the file changed since hublab pkg build: build again")
        if resp.status_code not in (201, 204):
            raise self._fail(resp, f"uploading {label or desc.digest[:19]}")
        return True

    def push_manifest(self, name: str, tags: list[str], raw: bytes) -> str:
        for tag in tags:
            resp = self._send("PUT", f"{self.base}/v2/{self.repo(name)}/manifests/{tag}",
                              self._scope(name, push=True), content=raw, headers={"Content-Type": MEDIA_MANIFEST})
            resp.close()
            if resp.status_code not in (200, 201):
                raise self._fail(resp, f"publishing {name}:{tag}")
        return "sha256:" + hashlib.sha256(raw).hexdigest()


def _origin(url: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return ("", url, None)
    return (parts.scheme, (parts.hostname or "").lower(), port)


def registry_timeout() -> float:
    """$HUBLAB_REGISTRY_TIMEOUT seconds (default 30): the longest a registry may stall or drip."""
    raw = os.environ.get("HUBLAB_REGISTRY_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise RegistryError(f"HUBLAB_REGISTRY_TIMEOUT={quote(raw)} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise RegistryError(f"HUBLAB_REGISTRY_TIMEOUT={quote(raw)} must be between 0 and 3600 seconds")
    return value


def open_registry(location: str | Path) -> Registry:
    """A directory path -> DirRegistry; http://, https:// or oci:// -> OCIRegistry."""
    loc = str(location)
    if re.match(r"^(https?|oci)://", loc):
        return OCIRegistry(loc)
    return DirRegistry(Path(loc))


def default_registry_dir() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "hublab" / "registry"


__all__ = ["DirRegistry", "OCIRegistry", "Registry", "Descriptor", "Resolved", "RegistryError", "NotFound",
           "open_registry", "resolve", "read_blob", "oci_manifest", "parse_ref", "default_registry_dir"]
