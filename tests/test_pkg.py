"""Model packages end to end: build -> publish (directory registry and a real OCI registry) -> install
-> run an expert from it; variants per board, fit refusal before download, resume, tamper, traversal,
signatures, update, remove, CLI."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from hublab.cli import main
from hublab.runtime import pkg
from hublab.runtime.config import scan_models
from hublab.runtime.errors import HublabError
from hublab.runtime.pkg.manifest import parse_manifest, schema_errors, _schema
from hublab.runtime.engine.profiles import active_profile
from hublab.runtime.pkg.registry import DirRegistry, open_registry, resolve
from hublab.runtime.pkg.signing import Signature

from test_pkg_support import (REGISTRY_PASSWORD, REGISTRY_USER, auth_registry, base_package,  # noqa: F401
                              expert_package, manifest_text, oci_registry, push_raw, snapshot, ws)

PROMPT = "the python model"


def ns(ws) -> str:
    """A registry namespace of this test's own (OCI names are lower case)."""
    return re.sub(r"[^a-z0-9]+", "-", ws.root.name.lower()).strip("-")


@pytest.fixture
def built(ws, tmp_path):
    """A signed base package (3 variants) and a signed expert package on it, built."""
    base = base_package(tmp_path / "src" / "tiny")
    b = pkg.build(base, key=ws.key)
    expert = expert_package(tmp_path / "src" / "alpha", base / "q8_0" / "tiny.gguf")
    e = pkg.build(expert, key=ws.key)
    return {"base": base, "expert": expert, "base_result": b, "expert_result": e}


def test_build_fills_in_files_variants_and_signature(ws, built):
    b = built["base_result"]
    raw = (built["base"] / "package.toml").read_bytes()
    m = parse_manifest(raw, "package.toml")
    assert (b.name, b.version, b.category, b.variants) == ("tiny", "1.0", "base", ["q2_k", "q4_k_m", "q8_0"])
    assert b.digest == "sha256:" + hashlib.sha256(raw).hexdigest() and b.signed_by == ws.public_key
    assert m.models == ["tiny"] and m.experts == []
    for f in m.files:
        data = (built["base"] / f.path).read_bytes()
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
        assert f.variant == f.path.split("/")[0]
        assert f.role == ("model" if f.path.endswith(".gguf") else "config")
    # The schema in packaging/ accepts what build writes; the expert's adapter is recognised as one.
    from hublab.runtime.config import tomllib
    assert schema_errors(tomllib.loads(raw.decode()), _schema()) == []
    e = parse_manifest((built["expert"] / "package.toml").read_bytes(), "x")
    assert e.experts == ["alpha"] and {f.role for f in e.files} == {"adapter", "config"}
    sig = Signature.from_json((built["base"] / "package.sig").read_text(), "sig")
    assert sig.digest == b.digest and sig.key == ws.public_key
    # Rebuilding an unchanged directory gives the same digest (the manifest is canonical).
    assert pkg.build(built["base"], key=ws.key).digest == b.digest


def _runtime_text(models_dir: Path, name: str) -> str:
    from hublab.runtime.engine.runtime import Runtime

    with Runtime(models_dir=models_dir, profile="host", threads=1) as rt:
        assert not rt.catalog.errors, rt.catalog.errors
        return rt.generate(name, PROMPT, raw=True, max_tokens=8).text


@pytest.mark.parametrize("kind", ["dir", "oci"])
def test_publish_install_and_run_an_expert(ws, built, kind, request):
    registry = str(ws.registry) if kind == "dir" else request.getfixturevalue("oci_registry") + "/" + ns(ws)
    for src in (built["base"], built["expert"]):
        r = pkg.publish(src, registry)
        assert r.tags == ["1.0", "latest"] and r.uploaded_blobs >= 3 and r.signed_by == ws.public_key
    assert pkg.publish(built["base"], registry).uploaded_blobs == 0  # content-addressed: nothing new
    found = {p["name"]: p for p in pkg.search("", registry)}
    assert set(found) == {"tiny", "alpha-expert"} and found["alpha-expert"]["experts"] == ["alpha"]
    assert [p["name"] for p in pkg.search("ALPHA", registry)] == ["alpha-expert"]

    rb = pkg.install("tiny", registry, profile="host")
    re_ = pkg.install("alpha-expert:1.0", registry, profile="host")
    assert (rb.status, rb.variant, rb.signed_by) == ("installed", "q8_0", ws.public_key)
    assert rb.downloaded == rb.size > 0 and rb.files == 2
    assert Path(re_.root) == ws.models / "experts" / "alpha-expert"
    assert (ws.models / "packages" / "tiny" / "q8_0" / "tiny.gguf").is_file()
    assert not (ws.models / "packages" / "tiny" / "q2_k").exists()  # only the chosen variant
    v = pkg.verify()
    assert v.ok and {p.name for p in v.packages} == {"tiny", "alpha-expert"}
    assert [p.name for p in pkg.list_packages()] == ["alpha-expert", "tiny"]
    # The runtime finds the installed models and the expert answers exactly as from the source files.
    installed = _runtime_text(ws.models, "alpha")
    source = ws.root / "source-models"
    (source / "x").mkdir(parents=True)
    for f in ("alpha.gguf", "alpha.toml"):
        (source / "x" / f).write_bytes((built["expert"] / f).read_bytes())
    for f in ("tiny.gguf", "tiny.toml"):
        (source / f).write_bytes((built["base"] / "q8_0" / f).read_bytes())
    assert installed == _runtime_text(source, "alpha") and installed.strip()
    # Installing again is a no-op that says so.
    assert pkg.install("tiny", registry, profile="host").status == "unchanged"


def test_copy_between_registries_keeps_signature(ws, built, oci_registry):
    pkg.publish(built["base"], str(ws.registry))
    remote = oci_registry + "/" + ns(ws)
    r = pkg.publish("tiny:1.0", remote, from_registry=str(ws.registry))
    assert r.signed_by == ws.public_key and r.tags == ["1.0"]
    a, b = resolve(open_registry(str(ws.registry)), "tiny", "1.0"), resolve(open_registry(remote), "tiny", "1.0")
    assert a.manifest_digest == b.manifest_digest  # byte-identical artifact
    assert pkg.install("tiny:1.0", remote, profile="pi4-4gb").signed_by == ws.public_key


def test_variant_selection_per_profile(ws, built):
    pkg.publish(built["base"], str(ws.registry))
    info = pkg.show("tiny", str(ws.registry), profile="pi-zero-2w")
    assert [v["variant"] for v in info["variants"]][0] == "q4_k_m"
    picks = {}
    for name in ("pi-zero-2w", "pi4-4gb", "pi5-8gb", "pi5-16gb", "host"):
        picks[name] = pkg.install("tiny", str(ws.registry), profile=name).variant
    # Each board's preferred_quants order decides among the variants that fit.
    assert picks == {"pi-zero-2w": "q4_k_m", "pi4-4gb": "q4_k_m", "pi5-8gb": "q8_0", "pi5-16gb": "q8_0",
                     "host": "q8_0"}
    # A board too small for Q4 gets the Q2_K variant.
    sizes = {v["variant"]: v["memory"] for v in info["variants"]}
    small = dataclasses.replace(active_profile("pi-zero-2w"), max_model_size=sizes["q2_k"] + 1,
                                model_budget=sizes["q4_k_m"] - 1)
    r = pkg.install("tiny", str(ws.registry), profile=small)
    assert (r.variant, r.status, r.previous) == ("q2_k", "updated", "1.0")
    assert pkg.install("tiny", str(ws.registry), profile="host", variant="Q4_K_M").variant == "q4_k_m"
    assert pkg.verify().ok


def test_fit_refusal_happens_before_any_download(ws, built, oci_registry):
    remote = oci_registry + "/" + ns(ws)
    pkg.publish(built["base"], remote)
    pkg.publish(built["base"], str(ws.registry))
    # Take the file blobs away: a refusal that still reads the manifest only cannot notice.
    reg = DirRegistry(ws.registry)
    res = resolve(reg, "tiny", "1.0")
    for d in res.layers.values():
        reg.blob_path(d.digest).unlink(missing_ok=True)
    tiny_board = dataclasses.replace(active_profile("pi-zero-2w"), name="tiny-board", max_model_size=4096,
                                     model_budget=8192)
    for registry in (str(ws.registry), remote):
        before = snapshot(ws.models)
        with pytest.raises(HublabError) as e:
            pkg.install("tiny", registry, profile=tiny_board)
        msg = str(e.value)
        assert "does not fit board profile tiny-board" in msg and "nothing was downloaded" in msg
        assert "\n" not in msg and snapshot(ws.models) == before
        blobs = ws.models / ".hublab" / "blobs"
        assert not blobs.exists() or not any(blobs.iterdir())


def test_resume_interrupted_download_with_http_range(ws, built, oci_registry):
    remote = oci_registry + "/" + ns(ws)
    pkg.publish(built["base"], remote)
    res = resolve(open_registry(remote), "tiny", "1.0")
    big = res.layers["q8_0/tiny.gguf"]
    data = (built["base"] / "q8_0" / "tiny.gguf").read_bytes()
    cache = ws.models / ".hublab" / "blobs"
    cache.mkdir(parents=True)
    half = big.size // 2
    (cache / f"sha256-{big.hex}.partial").write_bytes(data[:half])  # what a killed download leaves
    r = pkg.install("tiny", remote, profile="host")
    toml_size = res.layers["q8_0/tiny.toml"].size
    assert r.reused == half and r.downloaded == big.size - half + toml_size
    assert pkg.verify().ok and not list(cache.glob("*.partial"))
    # A partial file with wrong bytes is detected by the digest and fetched again from scratch.
    pkg.remove("tiny")
    (cache / f"sha256-{big.hex}.partial").write_bytes(b"\xff" * half)
    r = pkg.install("tiny", remote, profile="host")
    assert r.downloaded == big.size + toml_size and pkg.verify().ok


def test_progress_reports_size_and_rate(ws, built, capsys):
    import io

    from hublab.runtime.pkg.cli import ProgressBar

    pkg.publish(built["base"], str(ws.registry))
    out = io.StringIO()
    pkg.install("tiny", str(ws.registry), profile="host", progress=ProgressBar(out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/2] q8_0/tiny.gguf")
    assert re.search(r"100\.0%  1\.\d MiB / 1\.\d MiB  [\d.]+ [KMG]iB/s$", lines[0]), lines[0]


def _tamper_blob(registry: Path, name: str, path: str) -> None:
    reg = DirRegistry(registry)
    blob = reg.blob_path(resolve(reg, name, "latest").layers[path].digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def test_tampered_blob_is_rejected_and_nothing_changes(ws, built):
    pkg.publish(built["base"], str(ws.registry))
    pkg.install("tiny", str(ws.registry), profile="host")
    # 1.1 is published with a corrupted GGUF: the update must fail and keep 1.0 working.
    b = pkg.build(base_package(ws.root / "src11", version="1.1", seed=5), key=ws.key)
    pkg.publish(b.directory, str(ws.registry))
    _tamper_blob(ws.registry, "tiny", "q8_0/tiny.gguf")
    before = snapshot(ws.models)
    with pytest.raises(HublabError, match="does not match its sha256") as e:
        pkg.install("tiny", str(ws.registry), profile="host")
    assert "\n" not in str(e.value)
    assert snapshot(ws.models) == before and pkg.verify().ok
    assert pkg.list_packages()[0].version == "1.0"
    assert not list((ws.models / ".hublab" / "blobs").glob("*.partial"))
    results = pkg.update()
    assert results[0].status == "failed" and "sha256" in results[0].detail


def test_signature_cases(ws, built, tmp_path):
    reg = str(ws.registry)
    files = {"notes.txt": b"hello"}
    raw = manifest_text("signed", files)
    other = tmp_path / "other.key"
    pkg.keygen(other)
    push_raw(reg, "signed", ["latest"], raw, files, sign_with=ws.key)
    push_raw(reg, "unsigned", ["latest"], manifest_text("unsigned", files), files)
    push_raw(reg, "stranger", ["latest"], manifest_text("stranger", files), files, sign_with=other)
    assert pkg.install("signed", reg).signed_by == ws.public_key
    before = snapshot(ws.models)
    with pytest.raises(HublabError, match="not signed.*--allow-unsigned"):
        pkg.install("unsigned", reg)
    with pytest.raises(HublabError, match="not trusted"):
        pkg.install("stranger", reg)
    assert snapshot(ws.models) == before
    assert pkg.install("unsigned", reg, allow_unsigned=True).signed_by == ""
    assert pkg.install("stranger", reg, allow_unsigned=True).signed_by == ""
    # A changed manifest under the old signature, and a forged signature, are refused even with
    # --allow-unsigned: that is tampering, not a missing key.
    from hublab.runtime.pkg.manifest import digest_bytes
    from hublab.runtime.pkg.signing import sign_digest

    original = manifest_text("forged", files)
    sig = sign_digest(ws.key, digest_bytes(original))
    forged = manifest_text("forged", files, extra='description = "changed after signing"')
    push_raw(reg, "forged", ["latest"], forged, files)
    _set_signature(ws.registry, "forged", sig.to_json())
    # A signature that claims the right digest but whose bytes sign something else.
    badsig = manifest_text("badsig", files)
    push_raw(reg, "badsig", ["latest"], badsig, files)
    _set_signature(ws.registry, "badsig", dataclasses.replace(sig, digest=digest_bytes(badsig)).to_json())
    before = snapshot(ws.models)
    with pytest.raises(HublabError, match="changed after signing"):
        pkg.install("forged", reg, allow_unsigned=True)
    with pytest.raises(HublabError, match="bad signature"):
        pkg.install("badsig", reg, allow_unsigned=True)
    assert snapshot(ws.models) == before


def _set_signature(registry: Path, name: str, sig_json: str) -> None:
    """Rewrite a dir-registry entry's signature annotation (what an attacker with write access can do)."""
    from hublab.runtime.pkg.registry import ANN_SIGNATURE

    reg = DirRegistry(registry)
    res = resolve(reg, name, "latest")
    doc = json.loads(res.oci_raw)
    doc["annotations"][ANN_SIGNATURE] = sig_json
    reg.push_manifest(name, ["latest"], json.dumps(doc).encode())


@pytest.mark.parametrize("evil", ["../escape.toml", "/tmp/abs.toml", "a/../../escape.toml", "a\\..\\b.toml",
                                  ".hublab/staging/x"])
def test_path_traversal_is_rejected(ws, evil):
    reg = str(ws.registry)
    files = {"ok.toml": b"# fine\n"}
    # Forged in package.toml only (layer titles stay harmless) and, separately, in the layer titles too.
    push_raw(reg, "trav", ["latest"], manifest_text("trav", files, paths={"ok.toml": evil}), files, sign_with=ws.key)
    push_raw(reg, "trav2", ["latest"], manifest_text("trav2", {evil: b"x"}), {evil: b"x"}, sign_with=ws.key)
    before = snapshot(ws.models)
    for name in ("trav", "trav2"):
        with pytest.raises(HublabError) as e:
            pkg.install(name, reg)
        assert "\n" not in str(e.value) and ("inside the package" in str(e.value) or "not allowed" in str(e.value))
    assert snapshot(ws.models) == before
    assert not (ws.root / "escape.toml").exists() and not Path("/tmp/abs.toml").exists()


def test_symlinks_escaping_are_rejected(ws, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "package.toml").write_text('[package]\nname = "links"\nversion = "1"\ncategory = "bundle"\n')
    (src / "inside.txt").write_text("inside")
    (src / "ok-link.txt").symlink_to("inside.txt")
    assert pkg.build(src, key=ws.key).files == 2  # a link that stays inside is packaged as its content
    (src / "evil.txt").symlink_to("/etc/hostname")
    with pytest.raises(HublabError, match="symlink points outside the package"):
        pkg.build(src, key=ws.key)
    (src / "evil.txt").unlink()
    pkg.build(src, key=ws.key)
    pkg.publish(src, str(ws.registry))
    # A registry blob replaced by a symlink to a file outside the registry is not read.
    reg = DirRegistry(ws.registry)
    blob = reg.blob_path(resolve(reg, "links", "latest").layers["inside.txt"].digest)
    blob.unlink()
    blob.symlink_to("/etc/hostname")
    with pytest.raises(HublabError, match="symlink leading out of the registry"):
        pkg.install("links", str(ws.registry))
    assert snapshot(ws.models) == {}


@pytest.mark.parametrize("extra,field", [
    ('version = "1.0"\nvolume = 11', "package.volume: unknown key"),
    ('', "package.version: missing"),
])
def test_schema_violations_are_one_line_errors(ws, extra, field, capsys):
    files = {"a.txt": b"a"}
    raw = b'[package]\nname = "bad"\ncategory = "base"\n' + extra.encode() + b"\n" + \
        manifest_text("bad", files).split(b'category = "base"\n', 1)[1]
    push_raw(str(ws.registry), "bad", ["latest"], raw, files, sign_with=ws.key)
    rc = main(["pkg", "install", "bad", "--registry", str(ws.registry)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("hublab: error: ") and field in err
    assert "package.schema.json" in err and snapshot(ws.models) == {}


def test_bad_sha_and_size_in_manifest(ws):
    files = {"a.txt": b"abc"}
    raw = manifest_text("shabad", files).replace(b'size = 3', b'size = -1')
    push_raw(str(ws.registry), "shabad", ["latest"], raw, files, sign_with=ws.key)
    with pytest.raises(HublabError, match=r"files\[0\].size: -1 is below 0"):
        pkg.install("shabad", str(ws.registry))


def test_requires_newer_hublab_is_refused(ws, built):
    text = (built["base"] / "package.toml").read_text().replace('requires = ">=0.1"', 'requires = ">=99"')
    (built["base"] / "package.toml").write_text(text)
    pkg.build(built["base"], key=ws.key)
    pkg.publish(built["base"], str(ws.registry))
    with pytest.raises(HublabError, match="needs hublab >=99"):
        pkg.install("tiny", str(ws.registry), profile="host")


def test_update_remove_and_conflicts(ws, built):
    reg = str(ws.registry)
    pkg.publish(built["base"], reg)
    pkg.install("tiny", reg, profile="host")
    assert pkg.update()[0].status == "up-to-date"
    b = pkg.build(base_package(ws.root / "src11", version="1.1", seed=7), key=ws.key)
    pkg.publish(b.directory, reg)
    [u] = pkg.update(["tiny"])
    assert (u.status, u.old_version, u.new_version) == ("updated", "1.0", "1.1")
    assert pkg.list_packages()[0].version == "1.1" and pkg.verify().ok
    # A second package may not provide a model name that is already installed.
    pkg.build(base_package(ws.root / "dup", name="tiny-dup", model="tiny"), key=ws.key)
    pkg.publish(ws.root / "dup", reg)
    with pytest.raises(HublabError, match="already provides"):
        pkg.install("tiny-dup", reg, profile="host")
    # ...nor one the user defined by hand in the models dir.
    (ws.models / "mine.toml").write_text('[model]\nname = "tiny2"\npath = "x.gguf"\n')
    pkg.build(base_package(ws.root / "dup2", name="tiny2", model="tiny2"), key=ws.key)
    pkg.publish(ws.root / "dup2", reg)
    with pytest.raises(HublabError, match="mine.toml already defines"):
        pkg.install("tiny2", reg, profile="host")
    r = pkg.remove("tiny")
    assert r["version"] == "1.1" and not (ws.models / "packages" / "tiny").exists()
    assert pkg.list_packages() == []
    with pytest.raises(HublabError, match="not installed"):
        pkg.remove("tiny")


def test_verify_finds_tampered_and_extra_files(ws, built):
    pkg.publish(built["base"], str(ws.registry))
    r = pkg.install("tiny", str(ws.registry), profile="host")
    gguf = Path(r.root) / "q8_0" / "tiny.gguf"
    data = bytearray(gguf.read_bytes())
    data[100] ^= 1
    gguf.write_bytes(bytes(data))
    (Path(r.root) / "q8_0" / "sneaky.toml").write_text("[model]\n")
    v = pkg.verify()
    assert not v.ok and sorted(v.packages[0].problems) == ["q8_0/sneaky.toml: not part of the package",
                                                          "q8_0/tiny.gguf: sha256 does not match"]
    assert main(["pkg", "verify"]) == 1
    # install repairs it (the broken copy is not "unchanged")
    (Path(r.root) / "q8_0" / "sneaky.toml").unlink()
    assert pkg.install("tiny", str(ws.registry), profile="host").status == "updated"
    assert pkg.verify().ok


def test_basic_auth_registry(ws, built, auth_registry, monkeypatch):
    remote = auth_registry + "/hub"
    with pytest.raises(HublabError, match="needs a login; set HUBLAB_REGISTRY_USERNAME"):
        pkg.publish(built["base"], remote)
    monkeypatch.setenv("HUBLAB_REGISTRY_USERNAME", REGISTRY_USER)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", "wrong")
    with pytest.raises(HublabError, match="login refused"):
        pkg.publish(built["base"], remote)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", REGISTRY_PASSWORD)
    pkg.publish(built["base"], remote)
    assert [p["name"] for p in pkg.search("tiny", remote)] == ["tiny"]
    assert pkg.install("tiny", remote, profile="pi4-4gb").variant == "q4_k_m" and pkg.verify().ok


def test_cli_round_trip(ws, built, capsys, tmp_path):
    reg = str(ws.registry)
    assert main(["pkg", "keygen", "--out", str(tmp_path / "k2"), "--trust"]) == 0
    out = capsys.readouterr().out
    assert "public key" in out and (tmp_path / "k2").stat().st_mode & 0o777 == 0o600
    assert main(["pkg", "build", str(built["base"]), "--key", str(tmp_path / "k2")]) == 0
    assert "built tiny 1.0 (base): 6 files" in capsys.readouterr().out
    assert main(["pkg", "publish", str(built["base"]), "--registry", reg]) == 0
    assert main(["pkg", "search", "tiny", "--registry", reg]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("tiny")
    assert main(["--profile", "pi4-4gb", "pkg", "install", "tiny", "--registry", reg]) == 0
    cap = capsys.readouterr()
    assert "installed tiny 1.0 [q4_k_m] for pi4-4gb in" in cap.out
    assert "100.0%" in cap.err and "/s" in cap.err
    assert main(["pkg", "show", "tiny", "--registry", reg, "--profile", "pi-zero-2w"]) == 0
    out = capsys.readouterr().out
    assert "variants on pi-zero-2w:" in out and "* q4_k_m" in out and "installed 1.0 [q4_k_m]" in out
    assert main(["pkg", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["variant"] == "q4_k_m"
    assert main(["pkg", "verify"]) == 0 and "tiny 1.0: ok" in capsys.readouterr().out
    assert main(["pkg", "remove", "tiny"]) == 0
    assert main(["pkg", "list"]) == 0 and "no packages installed" in capsys.readouterr().out
    assert main(["pkg", "install", "nope", "--registry", reg]) == 1
    assert capsys.readouterr().err.strip() == (f"hublab: error: nope:latest not found in registry {reg}; "
                                               "see what it has with hublab pkg search")


def test_scan_models_sees_installed_packages_only_once(ws, built):
    pkg.publish(built["base"], str(ws.registry))
    pkg.publish(built["expert"], str(ws.registry))
    pkg.install("tiny", str(ws.registry), profile="pi5-4gb")
    pkg.install("alpha-expert", str(ws.registry), profile="pi5-4gb")
    cat = scan_models(ws.models)
    assert not cat.errors and set(cat.models) == {"tiny", "alpha"} and set(cat.experts) == {"alpha"}
    assert cat.models["alpha"].adapter == ws.models / "experts" / "alpha-expert" / "alpha.gguf"
    assert os.path.samefile(cat.models["tiny"].path, ws.models / "packages" / "tiny" / "q4_k_m" / "tiny.gguf")


def test_router_package_installs_into_the_runtime_router_dir(ws, tmp_path):
    src = tmp_path / "router-src"
    src.mkdir()
    (src / "package.toml").write_text('[package]\nname = "demo-router"\nversion = "2"\ncategory = "router"\n')
    (src / "router.toml").write_text('[router]\nexperts = ["alpha"]\n')
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "model.onnx").write_bytes(b"\x08\x07" * 64)
    b = pkg.build(src, key=ws.key)
    m = parse_manifest((src / "package.toml").read_bytes(), "x")
    assert {f.path: f.role for f in m.files} == {"model.onnx": "router", "router.toml": "config",
                                                 "tokenizer.json": "tokenizer"}
    assert m.router == "demo-router" and b.category == "router"
    pkg.publish(src, str(ws.registry))
    r = pkg.install("demo-router", str(ws.registry))
    assert Path(r.root) == ws.models / "router" and (ws.models / "router" / "model.onnx").is_file()
    assert scan_models(ws.models).errors == []  # router.toml and the record are not model TOMLs
    # One router at a time: another router package must not overwrite it silently.
    (src / "package.toml").write_text((src / "package.toml").read_text().replace('"demo-router"', '"other-router"'))
    pkg.build(src, key=ws.key)
    pkg.publish(src, str(ws.registry))
    with pytest.raises(HublabError, match="holds package 'demo-router'; remove it first"):
        pkg.install("other-router", str(ws.registry))
    pkg.remove("demo-router")
    (ws.models / "router").mkdir()  # a hand-made router dir is not the package manager's to replace
    with pytest.raises(HublabError, match="exists and is not an installed package"):
        pkg.install("other-router", str(ws.registry))
