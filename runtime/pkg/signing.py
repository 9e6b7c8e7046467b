"""ed25519 signatures over a package manifest's digest.

Library: `cryptography` (PyCA). It is maintained by the same team as PyNaCl, ships wheels for aarch64
and armv7 (what a Pi runs), and is already the library most Python stacks carry.

A signing key file holds the 32-byte private seed as hex (mode 0600). A public key is 64 hex
characters; trusted ones are listed in system.toml `[trust] keys`. A signature is a small JSON object
stored as `package.sig` next to a built package.toml and as an annotation on the published OCI
manifest: {"algorithm": "ed25519", "key": <hex public key>, "digest": "sha256:...", "signature": <hex>}.
The signed message is the digest string itself ("sha256:<hex>" as ASCII).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HublabError

ALGORITHM = "ed25519"


class SignatureError(HublabError):
    """A signature is missing, malformed, forged or from a key that is not trusted."""


@dataclass(frozen=True)
class Signature:
    key: str
    digest: str
    signature: str
    algorithm: str = ALGORITHM

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> "Signature":
        try:
            d = json.loads(text)
            sig = cls(key=d["key"], digest=d["digest"], signature=d["signature"], algorithm=d.get("algorithm", ""))
        except (ValueError, KeyError, TypeError):
            raise SignatureError(f"{source}: signature is not valid JSON with key, digest and signature; "
                                 "re-sign the package with hublab pkg build --key") from None
        if sig.algorithm != ALGORITHM or not _is_hex(sig.key, 64) or not _is_hex(sig.signature, 128):
            raise SignatureError(f"{source}: signature is not an ed25519 signature in hex; re-sign the package")
        return sig


def _is_hex(s: object, n: int) -> bool:
    return isinstance(s, str) and re.fullmatch(f"[0-9a-f]{{{n}}}", s) is not None


def normalize_key(key: str, source: str = "trusted key") -> str:
    k = key.strip().lower()
    if k.startswith("ed25519:"):
        k = k[8:]
    if not _is_hex(k, 64):
        raise SignatureError(f"{source}: {key!r} is not an ed25519 public key (64 hex characters); "
                             "copy it from the output of hublab pkg keygen")
    return k


def default_key_path() -> Path:
    from ..config import default_system_path

    return default_system_path().parent / "signing.key"


def generate_key(path: Path, *, overwrite: bool = False) -> str:
    """Write a new private key to `path` (0600) and return its public key in hex."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    path = Path(path)
    if path.exists() and not overwrite:
        raise HublabError(f"{path}: a key already exists; pass --force to replace it (packages signed with it "
                          "will no longer match a new key)")
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(seed.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return _public_hex(key)


def _public_hex(key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read signing key ({exc.strerror}); "
                             "create one with hublab pkg keygen") from None
    if not _is_hex(text.lower(), 64):
        raise SignatureError(f"{path}: not a hublab signing key (64 hex characters); create one with hublab pkg keygen")
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))


def public_key(path: Path) -> str:
    return _public_hex(load_private_key(path))


def sign_digest(key_path: Path, digest: str) -> Signature:
    key = load_private_key(key_path)
    return Signature(key=_public_hex(key), digest=digest, signature=key.sign(digest.encode("ascii")).hex())


def verify(sig: Signature, digest: str, source: str) -> None:
    """Check that `sig` is a valid signature of `digest` by its own key (trust is checked separately)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if sig.digest != digest:
        raise SignatureError(f"{source}: the signature is for manifest {sig.digest[:19]}…, not this one "
                             f"({digest[:19]}…); the manifest was changed after signing")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(sig.key)).verify(bytes.fromhex(sig.signature),
                                                                          digest.encode("ascii"))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{source}: bad signature: it does not verify with key {sig.key[:16]}…; "
                             "the package was tampered with or signed wrongly, do not install it") from None


def check_trust(sig: Signature | None, digest: str, trusted: list[str], source: str,
                allow_unsigned: bool = False) -> str:
    """The trusted key that signed `digest`, or '' when allowed unsigned/untrusted; else SignatureError.

    A signature that does not verify is refused even with allow_unsigned: that is tampering, not a
    missing key.
    """
    if sig is None:
        if allow_unsigned:
            return ""
        raise SignatureError(f"{source}: package is not signed; sign it (hublab pkg build --key) or pass "
                             "--allow-unsigned to install it anyway")
    verify(sig, digest, source)
    keys = {normalize_key(k, "system.toml [trust] keys") for k in trusted}
    if sig.key in keys:
        return sig.key
    if allow_unsigned:
        return ""
    raise SignatureError(f"{source}: signed by key {sig.key} which is not trusted; add it to system.toml "
                         "[trust] keys if you trust its owner, or pass --allow-unsigned")
