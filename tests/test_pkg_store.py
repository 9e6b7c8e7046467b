"""A store that heals: whatever a killed run, a stray file or a hand-made link left in the models dir,
every `pkg` command answers (one line, never a traceback), an install either goes through or is refused
before anything changes, and nothing already installed is lost. Also the file-name limits of the
package format (what file systems accept: 255 bytes per name)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hublab.cli import main
from hublab.runtime import pkg
from hublab.runtime.errors import HublabError
from hublab.runtime.pkg.manifest import PATH_MAX, _schema, safe_relpath
from hublab.runtime.pkg.registry import (ANN_TITLE, MEDIA_FILE, Descriptor, DirRegistry, oci_manifest,
                                     open_registry, resolve)
from hublab.runtime.pkg.signing import sign_digest

from test_pkg_support import (base_package, expert_package, manifest_text, oci_registry, push_raw,  # noqa: F401
                              snapshot, ws)


@pytest.fixture
def reg(ws):
    """A directory registry holding tiny 1.0 and 1.1 (one q8_0 variant) and the alpha expert on it."""
    for version, seed in (("1.0", 0), ("1.1", 3)):
        d = base_package(ws.root / f"src-{version}", version=version, quants=("q8_0",), seed=seed)
        pkg.build(d, key=ws.key)
        pkg.publish(d, str(ws.registry), tag=version)
    e = expert_package(ws.root / "src-alpha", ws.root / "src-1.0" / "q8_0" / "tiny.gguf")
    pkg.build(e, key=ws.key)
    pkg.publish(e, str(ws.registry))
    return str(ws.registry)


def fails_one_line(capsys, *argv: str) -> str:
    """Run `hublab ARGV` and return its error line (exit 1, one line, no traceback)."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("hublab: error: "), (rc, err)
    return err


def every_command_answers(capsys, reg: str) -> None:
    """No pkg command crashes on the store's state: each exits 0 or 1 with its own output."""
    for argv in (["pkg", "verify"], ["pkg", "list"], ["pkg", "show", "tiny", "--registry", reg],
                 ["pkg", "update", "--registry", reg], ["pkg", "verify", "--json"]):
        assert main(argv) in (0, 1), argv
        cap = capsys.readouterr()
        assert "Traceback" not in cap.err and cap.err.count("\n") <= 1, (argv, cap.err)


def staging(ws) -> list[str]:
    d = ws.models / ".hublab" / "staging"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# ---------------------------------------------------------------------------------------------------
# Something foreign where the install wants to put the package

@pytest.mark.parametrize("what", ["dangling symlink", "symlink to a directory", "file", "fifo"])
def test_something_in_the_way_of_a_package_root_is_refused(ws, reg, capsys, what):
    target = ws.models / "experts" / "alpha-expert"
    target.parent.mkdir(parents=True)
    elsewhere = ws.root / "elsewhere"
    if what == "dangling symlink":
        target.symlink_to(ws.root / "gone")
    elif what == "symlink to a directory":
        elsewhere.mkdir()
        (elsewhere / "keep.txt").write_text("mine")
        target.symlink_to(elsewhere)
    elif what == "file":
        target.write_text("mine")
    else:
        os.mkfifo(target)
    pkg.install("tiny:1.0", reg, profile="host")
    before = snapshot(ws.models)
    err = fails_one_line(capsys, "pkg", "install", "alpha-expert", "--registry", reg)
    assert f"{target}: is a" in err and "move it away" in err
    # Nothing changed, nothing left behind, and the store keeps working.
    assert snapshot(ws.models) == before and staging(ws) == []
    assert os.path.lexists(target) and (what != "symlink to a directory" or (elsewhere / "keep.txt").is_file())
    every_command_answers(capsys, reg)
    assert pkg.verify().ok and [p.name for p in pkg.list_packages()] == ["tiny"]
    # Once the path is cleared the install goes through.
    os.unlink(target)
    assert pkg.install("alpha-expert", reg).status == "installed" and pkg.verify().ok


@pytest.mark.parametrize("area", ["file", "dangling symlink"])
def test_area_directory_that_is_not_a_directory_is_refused(ws, reg, capsys, area):
    packages = ws.models / "packages"
    ws.models.mkdir()
    if area == "file":
        packages.write_text("not a dir")
    else:
        packages.symlink_to(ws.root / "gone")
    err = fails_one_line(capsys, "pkg", "install", "tiny:1.0", "--registry", reg, "--profile", "host")
    assert f"{packages}: is a" in err and "where hublab keeps packages" in err
    assert staging(ws) == [] and not any((ws.models / ".hublab" / "blobs").iterdir())
    every_command_answers(capsys, reg)


def test_models_dir_or_state_dir_that_is_a_file_is_refused(ws, reg, capsys):
    ws.root.joinpath("models").write_text("oops")
    err = fails_one_line(capsys, "pkg", "install", "tiny:1.0", "--registry", reg, "--profile", "host")
    assert f"{ws.models}: is a file" in err and "models_dir" in err
    every_command_answers(capsys, reg)
    ws.models.unlink()
    pkg.install("tiny:1.0", reg, profile="host")
    shutil.rmtree(ws.models / ".hublab")
    (ws.models / ".hublab").write_text("mine")
    err = fails_one_line(capsys, "pkg", "remove", "tiny")
    assert ".hublab: is a file" in err and "move it away" in err
    # verify still checks the packages, and names the problem
    v = pkg.verify()
    assert [p.ok for p in v.packages] == [True] and any(".hublab: is a file" in s for s in v.store_problems)
    every_command_answers(capsys, reg)
    assert (ws.models / ".hublab").read_text() == "mine"


def test_foreign_file_in_an_installed_package_blocks_an_update_and_is_kept(ws, reg, capsys):
    pkg.install("tiny:1.0", reg, profile="host")
    mine = ws.models / "packages" / "tiny" / "q8_0" / "notes.txt"
    mine.write_text("my notes")
    err = fails_one_line(capsys, "pkg", "install", "tiny:1.1", "--registry", reg, "--profile", "host")
    assert f"{mine}: is not part of package tiny" in err and "move it out first" in err
    assert mine.read_text() == "my notes" and pkg.list_packages()[0].version == "1.0"
    mine.unlink()
    assert pkg.install("tiny:1.1", reg, profile="host").status == "updated"


# ---------------------------------------------------------------------------------------------------
# The store's own paths (.hublab): healed, never followed

def test_store_paths_of_the_wrong_kind_are_healed(ws, reg, capsys):
    pkg.install("tiny:1.0", reg, profile="host")
    state = ws.models / ".hublab"
    outside = ws.root / "outside"
    outside.mkdir()
    shutil.rmtree(state / "staging")
    (state / "staging").write_text("x")
    shutil.rmtree(state / "blobs")
    (state / "blobs").symlink_to(outside)
    (state / "lock").unlink()
    (state / "lock").symlink_to(outside / "lock-target")  # a dangling link: must not be created
    v = pkg.verify()
    assert v.ok, v.to_dict()
    assert sorted(v.recovered) == ["replaced a file at .hublab/staging",
                                   f"replaced a symlink to {outside} at .hublab/blobs",
                                   f"replaced a symlink to {outside / 'lock-target'} (dangling) at .hublab/lock"]
    assert not (outside / "lock-target").exists() and list(outside.iterdir()) == []
    (state / "lock").unlink()
    (state / "lock").mkdir()
    assert pkg.install("tiny:1.1", reg, profile="host").status == "updated"
    assert (state / "lock").is_file() and pkg.verify().ok and list(outside.iterdir()) == []


def test_partial_downloads_of_the_wrong_kind_are_never_followed(ws, reg, capsys):
    res = resolve(open_registry(reg), "tiny", "1.0")
    gguf, toml = res.layers["q8_0/tiny.gguf"], res.layers["q8_0/tiny.toml"]
    blobs = ws.models / ".hublab" / "blobs"
    blobs.mkdir(parents=True)
    victim = ws.root / "victim.txt"
    victim.write_text("do not touch")
    (blobs / f"sha256-{gguf.hex}.partial").symlink_to(victim)            # resume would write through it
    (blobs / f"sha256-{toml.hex}").mkdir()                               # a finished blob that is a dir
    (blobs / f"sha256-{toml.hex}.partial").mkdir()
    r = pkg.install("tiny:1.0", reg, profile="host")
    assert r.reused == 0 and r.downloaded == r.size and pkg.verify().ok
    assert victim.read_text() == "do not touch"
    # A cached blob that is a symlink to the right bytes is not moved into the package as a link.
    pkg.remove("tiny")
    copy = ws.root / "copy.gguf"
    copy.write_bytes((ws.root / "src-1.0" / "q8_0" / "tiny.gguf").read_bytes())
    (blobs / f"sha256-{gguf.hex}").symlink_to(copy)
    r = pkg.install("tiny:1.0", reg, profile="host")
    assert pkg.verify().ok and not (ws.models / "packages" / "tiny" / "q8_0" / "tiny.gguf").is_symlink()
    assert copy.is_file()


# ---------------------------------------------------------------------------------------------------
# Leftover staging: recovered, or kept and reported, never a crash

def test_the_reported_brick_dangling_root_with_a_leftover_new_tree(ws, reg, capsys):
    """The issue's case: an interrupted install left staging/NAME.new while the root is a dangling link."""
    pkg.install("tiny:1.0", reg, profile="host")
    root = ws.models / "experts" / "alpha-expert"
    root.parent.mkdir()
    root.symlink_to(ws.root / "gone")
    # What the old commit left behind: a complete new tree in staging.
    new = ws.models / ".hublab" / "staging" / "alpha-expert.new"
    scratch = ws.root / "scratch"
    pkg.install("alpha-expert", reg, models_dir=scratch)
    shutil.copytree(scratch / "experts" / "alpha-expert", new)
    assert main(["pkg", "verify"]) == 0
    out = capsys.readouterr().out
    assert f"recovered: alpha-expert: dropped unfinished install of 1.0 ({root} is a symlink" in out
    assert staging(ws) == [] and [p.name for p in pkg.verify().packages] == ["tiny"]
    shutil.copytree(scratch / "experts" / "alpha-expert", new)
    every_command_answers(capsys, reg)
    assert "is a symlink" in fails_one_line(capsys, "pkg", "install", "alpha-expert", "--registry", reg)
    assert [p.name for p in pkg.list_packages()] == ["tiny"]


def test_leftover_entries_of_every_kind_are_cleared(ws, reg, capsys):
    pkg.install("tiny:1.0", reg, profile="host")
    st = ws.models / ".hublab" / "staging"
    keep = ws.root / "keep"
    keep.mkdir()
    (keep / "data.bin").write_text("mine")
    (st / "tiny.tmp-0badc0de").mkdir()
    (st / "tiny.tmp-0badc0de" / "half.gguf").write_bytes(b"GGUF")
    (st / "tiny.del-0badc0de").write_text("a file, not a tree")
    (st / "stray.txt").write_text("?")
    (st / "alpha-expert.new").write_text("a file where a tree belongs")
    (st / "other.new").symlink_to(keep)  # removed as a link; the directory it points at stays
    evil = st / "evil.new"
    evil.mkdir()
    (evil / "package.toml").write_text('[package]\nname = "../../../escape"\nversion = "1"\ncategory = "base"\n'
                                       '[install]\ndigest = "sha256:00"\n')
    v = pkg.verify()
    assert v.ok and staging(ws) == [], v.to_dict()
    assert len(v.recovered) == 6 and (keep / "data.bin").read_text() == "mine"
    assert not (ws.root / "escape").exists() and not (ws.models.parent / "escape").exists()
    every_command_answers(capsys, reg)


def test_an_old_tree_that_cannot_be_put_back_is_kept_not_lost(ws, reg, capsys):
    """A two-rename update killed half way leaves only staging/NAME.old; the root is then taken by
    something else. The previous version is kept and reported, and put back once the path is free."""
    pkg.install("tiny:1.0", reg, profile="host")
    root = ws.models / "packages" / "tiny"
    old = ws.models / ".hublab" / "staging" / "tiny.old"
    os.rename(root, old)
    root.symlink_to(ws.root / "gone")
    v = pkg.verify()
    assert not v.ok and old.is_dir()
    assert any(f"{root}: is a symlink" in p and "cannot be put back" in p for p in v.store_problems), v.store_problems
    assert main(["pkg", "verify"]) == 1 and "cannot be put back" in capsys.readouterr().out
    err = fails_one_line(capsys, "pkg", "install", "tiny:1.1", "--registry", reg, "--profile", "host")
    assert "is a symlink" in err
    every_command_answers(capsys, reg)
    assert old.is_dir()
    root.unlink()
    v = pkg.verify()
    assert v.ok and v.recovered == ["tiny: restored previous version 1.0"] and staging(ws) == []
    assert pkg.install("tiny:1.1", reg, profile="host").status == "updated"


def test_an_interrupted_update_of_a_package_named_like_a_temp_tree_is_finished(ws):
    """Package names may hold '.tmp-' or '.del-': recovery goes by the suffix, not by a substring."""
    files = {"a.txt": b"one"}
    push_raw(str(ws.registry), "x.tmp-y", ["latest"], manifest_text("x.tmp-y", files), files, sign_with=ws.key)
    r = pkg.install("x.tmp-y", str(ws.registry))
    old = ws.models / ".hublab" / "staging" / "x.tmp-y.old"
    os.rename(r.root, old)  # a two-rename update killed between its renames, new tree lost
    v = pkg.verify()
    assert v.ok and v.recovered == ["x.tmp-y: restored previous version 1.0"], v.to_dict()
    assert (Path(r.root) / "a.txt").read_bytes() == b"one"


def test_an_install_record_with_a_path_escaping_name_is_not_trusted(ws, reg):
    pkg.install("tiny:1.0", reg, profile="host")
    record = ws.models / "packages" / "tiny" / "package.toml"
    record.write_text(record.read_text().replace('name = "tiny"', 'name = "../../evil"', 1))
    v = pkg.verify()
    assert not v.ok and "not a readable install record" in v.store_problems[0]
    assert pkg.list_packages() == []


# ---------------------------------------------------------------------------------------------------
# Names: what file systems accept

def _push_named(ws, name: str, path: str, title: str | None = None) -> None:
    """Publish a one-file package whose file is called `path` (its layer titled `title`)."""
    data = b"payload"
    raw = manifest_text(name, {path: data})
    push_raw(str(ws.registry), name, ["latest"], raw, {path: data}, sign_with=ws.key) if title is None else \
        _push_titled(ws, name, raw, data, title)


def _push_titled(ws, name: str, raw: bytes, data: bytes, title: str) -> None:
    from hublab.runtime.pkg.manifest import digest_bytes

    reg = DirRegistry(ws.registry)
    reg.init()
    for blob in (data, raw):
        p = ws.root / "blob"
        p.write_bytes(blob)
        reg.push_blob(name, Descriptor(MEDIA_FILE, digest_bytes(blob), len(blob)), p)
    layer = Descriptor(MEDIA_FILE, digest_bytes(data), len(data), {ANN_TITLE: title})
    sig = sign_digest(ws.key, digest_bytes(raw)).to_json()
    reg.push_manifest(name, ["latest"], oci_manifest(raw, [layer], {"dev.hublab.package.signature": sig}))


def test_long_unicode_file_name_is_a_one_line_error(ws, capsys):
    name = "ü" * 200  # 400 bytes in UTF-8: over NAME_MAX
    _push_named(ws, "longname", f"docs/{name}.txt")
    err = fails_one_line(capsys, "pkg", "install", "longname", "--registry", str(ws.registry))
    assert "longname:latest: layer sha256:" in err and "404 bytes in UTF-8" in err
    assert "255 per name: shorten it" in err
    # package.toml alone says the same about its own field
    from hublab.runtime.pkg.manifest import parse_manifest
    with pytest.raises(HublabError, match=r"x: files\[0\].path: name .* is 404 bytes in UTF-8"):
        parse_manifest(manifest_text("longname", {f"docs/{name}.txt": b"payload"}), "x")
    assert len(err) < 400 and snapshot(ws.models) == {} and staging(ws) == []
    # The limit is the file system's: a name of exactly 255 bytes installs.
    ok = "é" * 125 + "12345"
    assert len(ok.encode()) == 255
    _push_named(ws, "edgename", f"docs/{ok}")
    r = pkg.install("edgename", str(ws.registry))
    assert (Path(r.root) / "docs" / ok).read_bytes() == b"payload" and pkg.verify().ok


def test_name_limits_in_the_manifest_and_in_layer_titles(ws, capsys):
    with pytest.raises(HublabError, match="256 bytes in UTF-8"):
        safe_relpath("a" * 256)
    deep = "/".join(["d" * 200] * 6)
    assert len(deep.encode()) > PATH_MAX
    with pytest.raises(HublabError, match=f"over the {PATH_MAX}-byte limit"):
        safe_relpath(deep)
    # Only the layer title is too long (package.toml is fine): refused when the manifest is read.
    _push_named(ws, "longtitle", "ok.txt", title="x" * 300)
    err = fails_one_line(capsys, "pkg", "install", "longtitle", "--registry", str(ws.registry))
    assert "300 bytes in UTF-8" in err
    # A lone surrogate (valid JSON, not valid Unicode) in a layer title.
    _push_named(ws, "surrogate", "ok.txt", title="bad\ud800.txt")
    err = fails_one_line(capsys, "pkg", "install", "surrogate", "--registry", str(ws.registry))
    assert "not valid Unicode" in err
    assert snapshot(ws.models) == {}
    # The schema says what the code checks.
    path_schema = _schema()["properties"]["files"]["items"]["properties"]["path"]
    assert path_schema["maxLength"] == PATH_MAX and "255 bytes" in path_schema["description"]
    assert json.dumps(_schema())  # still valid JSON


# ---------------------------------------------------------------------------------------------------
# Any store state at all

STORE_PATHS = [".hublab", ".hublab/staging", ".hublab/blobs", ".hublab/lock", ".hublab/staging/tiny.new",
               ".hublab/staging/tiny.old", ".hublab/staging/tiny.tmp-00000000", ".hublab/staging/junk",
               ".hublab/blobs/sha256-{gguf}", ".hublab/blobs/sha256-{gguf}.partial", "packages", "experts",
               "router", "experts/alpha-expert", "packages/tiny", "packages/tiny/package.toml", "packages/tiny/q8_0",
               "packages/tiny/q8_0/tiny.gguf", "packages/tiny/extra", "router/package.toml"]
KINDS = ["file", "dir", "dangling symlink", "symlink to a dir", "symlink to a file", "fifo"]


def _put(path: Path, kind: str, outside: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file":
        path.write_bytes(b"junk")
    elif kind == "dir":
        path.mkdir()
        (path / "package.toml").write_text("junk = [")
    elif kind == "dangling symlink":
        path.symlink_to(outside / "gone")
    elif kind == "symlink to a dir":
        path.symlink_to(outside)
    elif kind == "symlink to a file":
        path.symlink_to(outside / "file.txt")
    else:
        os.mkfifo(path)


def test_every_command_answers_on_any_store_state(ws, reg, capsys):
    """Each store path replaced by each kind of thing: every pkg verb exits 0 or 1 with at most one error
    line, nothing outside the models dir is touched, and a package the change did not hit stays whole."""
    template = ws.root / "template"
    pkg.install("tiny:1.0", reg, models_dir=template, profile="host")
    gguf = resolve(open_registry(reg), "tiny", "1.0").layers["q8_0/tiny.gguf"].hex
    outside = ws.root / "outside"
    outside.mkdir()
    (outside / "file.txt").write_text("outside")
    failures, states = [], 0
    for rel in STORE_PATHS:
        for kind in KINDS:
            states += 1
            shutil.rmtree(ws.models, ignore_errors=True)
            shutil.copytree(template, ws.models, symlinks=True)
            _put(ws.models / rel.format(gguf=gguf), kind, outside)
            for argv in (["verify"], ["list"], ["show", "tiny", "--registry", reg],
                         ["install", "alpha-expert", "--registry", reg], ["update", "--registry", reg],
                         ["install", "tiny:1.1", "--registry", reg, "--profile", "host"],
                         ["remove", "alpha-expert"], ["verify"]):
                try:
                    rc = main(["pkg", *argv, "--json"])  # --json: no progress bars on stderr
                except BaseException as exc:  # noqa: BLE001 - any escape is the failure we look for
                    failures.append(f"{rel} as {kind}: pkg {argv[0]} raised {exc.__class__.__name__}: {exc}")
                    break
                err = capsys.readouterr().err
                if rc not in (0, 1) or err.count("\n") > 1 or "Traceback" in err:
                    failures.append(f"{rel} as {kind}: pkg {argv[0]} rc={rc} {err!r}")
            # An area directory linked elsewhere (on the same file system) is the user's choice of place.
            chosen = rel in ("packages", "experts") and kind == "symlink to a dir"
            if sorted(p.name for p in outside.iterdir()) != ["file.txt"] or \
                    (outside / "file.txt").read_text() != "outside":
                if not chosen:
                    failures.append(f"{rel} as {kind}: wrote outside the models dir")
                shutil.rmtree(outside)
                outside.mkdir()
                (outside / "file.txt").write_text("outside")
            if not rel.startswith("packages"):
                versions = {r.name: r.version for r in pkg.list_packages()}
                if versions.get("tiny") not in ("1.0", "1.1"):
                    failures.append(f"{rel} as {kind}: tiny lost ({versions})")
    assert not failures, "\n".join(failures)
    assert states == len(STORE_PATHS) * len(KINDS)
