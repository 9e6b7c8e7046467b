"""`pkg publish` publishes exactly what `pkg build` hashed: a file edited since, missing or added is
refused with one line, even where the registry already holds the built bytes and would never read the
file, and the registry is left as it was."""
from __future__ import annotations

import hashlib
import re

import pytest

from hublab.cli import main
from hublab.runtime import pkg
from hublab.runtime.pkg.registry import open_registry, resolve

from test_pkg_support import base_package, oci_registry, ws  # noqa: F401


def _flip(path, at: int = -10) -> None:
    """Change one byte of the tensor data in place: same size, other sha256."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _state(registry: str, name: str, tag: str) -> tuple[str, str]:
    res = resolve(open_registry(registry), name, tag)
    return res.manifest_digest, res.package_digest


@pytest.mark.parametrize("kind", ["dir", "oci"])
def test_publish_refuses_a_file_edited_after_build(ws, kind, request, capsys):
    registry = (str(ws.registry) if kind == "dir" else
                request.getfixturevalue("oci_registry") + "/" + re.sub(r"[^a-z0-9]+", "-", ws.root.name.lower()))
    src = base_package(ws.root / "src", quants=("q8_0",))
    pkg.build(src, key=ws.key)
    pkg.publish(src, registry)  # the built bytes are now registry blobs
    before = _state(registry, "tiny", "1.0")
    gguf = src / "q8_0" / "tiny.gguf"
    old_hash = hashlib.sha256(gguf.read_bytes()).hexdigest()
    _flip(gguf)
    for tag in ([], ["--tag", "2.0"]):
        rc = main(["pkg", "publish", str(src), "--registry", registry, *tag])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{gguf}: content changed since hublab pkg build" in err and f"hublab pkg build {src}" in err
    assert _state(registry, "tiny", "1.0") == before and "2.0" not in open_registry(registry).tags("tiny")
    # A file whose old bytes were never uploaded is refused the same way, before any upload.
    _flip(gguf)  # back to the built bytes
    toml = src / "q8_0" / "tiny.toml"
    toml.write_text(toml.read_text() + "# edited\n")
    with pytest.raises(pkg.PackageError, match="size changed since hublab pkg build"):
        pkg.publish(src, registry, tag="3.0")
    # Rebuilding makes it publishable; the registry then serves the new bytes.
    _flip(gguf)
    b = pkg.build(src, key=ws.key)
    r = pkg.publish(src, registry, tag="2.0")
    assert r.package_digest == b.digest and r.uploaded_blobs == 3  # package.toml, the gguf, the toml
    res = resolve(open_registry(registry), "tiny", "2.0")
    assert res.layers["q8_0/tiny.gguf"].hex == hashlib.sha256(gguf.read_bytes()).hexdigest() != old_hash


def test_publish_refuses_missing_and_unlisted_files(ws, capsys):
    src = base_package(ws.root / "src", quants=("q8_0",))
    pkg.build(src, key=ws.key)
    (src / "q8_0" / "extra.bin").write_bytes(b"x")
    with pytest.raises(pkg.PackageError, match="extra.bin: not listed in package.toml"):
        pkg.publish(src, str(ws.registry))
    (src / "q8_0" / "extra.bin").unlink()
    (src / "q8_0" / "tiny.toml").unlink()
    with pytest.raises(pkg.PackageError, match="tiny.toml: listed in package.toml but missing"):
        pkg.publish(src, str(ws.registry))
    assert not (ws.registry / "index.json").exists()
