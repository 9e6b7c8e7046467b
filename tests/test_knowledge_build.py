"""`hublab knowledge build`: documentation (HTML, man, Markdown) -> a signed knowledge package the runtime
retrieves passages from and cites, with the repo's real router encoder (models/router)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from ggufs import write_model_toml

from hublab.cli import main
from hublab.runtime.routing import docs as D
from hublab.runtime.routing import knowledge as K

REPO = Path(__file__).resolve().parents[1]
ROUTER = REPO / "models" / "router"

HTML = """<!DOCTYPE html><html><head><title>os.path — Common pathname manipulations — Python docs</title>
<script>var x = "no script text";</script></head><body>
<div class="related" role="navigation"><a href="index.html">index</a> | <a href="x.html">next</a></div>
<div class="sphinxsidebar">Table of Contents: navigation words that must not be indexed</div>
<section id="module-os.path"><h1>os.path — Common pathname manipulations<a class="headerlink" href="#">¶</a></h1>
<p>This module implements some useful functions on pathnames. To read or write files see open(), and for accessing
the filesystem see the os module. The path parameters can be passed as strings or bytes.</p>
<dl class="py function"><dt class="sig sig-object py" id="os.path.join">os.path.join(path, *paths)</dt>
<dd><p>Join one or more path segments intelligently. The return value is the concatenation of path and all members
of *paths, with exactly one directory separator following each non-empty part except the last.</p></dd></dl>
<dl class="py function"><dt class="sig sig-object py" id="os.path.exists">os.path.exists(path)</dt>
<dd><p>Return True if path refers to an existing path or an open file descriptor. Returns False for broken
symbolic links and on some platforms when permission is not granted.</p></dd></dl>
</section><footer>© Copyright footer text</footer></body></html>
"""

MAN = r""".\" a comment that is not text
.TH CHMOD 1 "2024" "coreutils"
.SH NAME
chmod \- change file mode bits
.SH SYNOPSIS
.B chmod
[\fIOPTION\fR]... \fIMODE\fR[\fI,MODE\fR]... \fIFILE\fR...
.SH DESCRIPTION
This manual page documents the GNU version of
.BR chmod .
.B chmod
changes the file mode bits of each given file according to \fImode\fP, which can be either a symbolic
representation of changes to make, or an octal number representing the bit pattern for the new mode bits.
.TP
\fB\-R\fR, \fB\-\-recursive\fR
change files and directories recursively
"""

MARKDOWN = """# Greenhouse handbook

Some words before the first section about this handbook and who wrote it for the team.

## Watering tomatoes

Tomatoes in the greenhouse want deep watering twice a week in summer, early in the morning, at the roots and
never on the leaves, so the plants do not get blight. Use [rain water](http://x) from the `butt` when there is some.

```
water --zone tomatoes --litres 4
```
"""


@pytest.fixture
def doc_tree(tmp_path):
    root = tmp_path / "docs"
    (root / "html" / "_static").mkdir(parents=True)
    (root / "html" / "os.path.html").write_text(HTML)
    (root / "html" / "_static" / "skipped.html").write_text("<p>static</p>")
    (root / "html" / "genindex.html").write_text("<p>index page words words</p>")
    (root / "man" / "man1").mkdir(parents=True)
    (root / "man" / "man1" / "chmod.1.gz").write_bytes(gzip.compress(MAN.encode()))
    (root / "notes").mkdir()
    (root / "notes" / "greenhouse.md").write_text(MARKDOWN)
    (root / "notes" / "logo.png").write_bytes(b"\x89PNG not docs")
    return root


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A hublab home whose models dir has a python and a general expert (TOMLs only: building needs no GGUF)."""
    h = tmp_path / "home"
    models = h / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "base.toml", "base", gguf_path=tmp_path / "none.gguf")
    write_model_toml(models / "experts" / "python.toml", "python", base="base")
    write_model_toml(models / "experts" / "general.toml", "general", base="base")
    (h / "system.toml").write_text(f'[runtime]\nmodels_dir = "{models}"\n[moe]\nrouter = "{ROUTER}"\n')
    monkeypatch.setenv("HUBLAB_HOME", str(h))
    monkeypatch.delenv("HUBLAB_CONFIG", raising=False)
    return h


def test_readers_keep_text_and_name_the_source(doc_tree):
    html = D.read_html(doc_tree / "html" / "os.path.html", "python docs")
    by = {s.source: " ".join(s.paragraphs) for s in html}
    assert "python docs: os.path" in by and "python docs: os.path.join" in by
    assert "Join one or more path segments" in by["python docs: os.path.join"]
    text = " ".join(by.values())
    assert "navigation words" not in text and "no script text" not in text and "footer" not in text
    assert "next" not in text.split()

    man = D.read_man(doc_tree / "man" / "man1" / "chmod.1.gz", "man")
    by = {s.source: " ".join(s.paragraphs) for s in man}
    assert by["man chmod(1): Name"] == "chmod - change file mode bits"
    desc = by["man chmod(1): Description"]
    assert "GNU version of chmod." in desc and "according to mode, which" in desc and "-R, --recursive" in desc
    assert "\\f" not in desc and "comment" not in desc

    (doc_tree / "man" / "man8").mkdir()
    (doc_tree / "man" / "man8" / "apt-get.8").write_text('.TH APT\\-GET 8\n.SH NAME\napt-get \\- APT package '
                                                         'handling utility\n')
    assert D.read_man(doc_tree / "man" / "man8" / "apt-get.8", "man")[0].source == "man apt-get(8): Name"

    md = D.read_markdown(doc_tree / "notes" / "greenhouse.md", "notes")
    by = {s.source: "\n".join(s.paragraphs) for s in md}
    assert "rain water from the `butt`" in by["notes: Greenhouse handbook: Watering tomatoes"]
    assert "water --zone tomatoes" in by["notes: Greenhouse handbook: Watering tomatoes"]


def test_passages_are_cut_near_the_size_at_sentence_ends():
    sec = D.Section("s", [" ".join(f"Sentence {i} has exactly six words." for i in range(40))])
    parts = D.split_passages(sec, words=60)
    assert len(parts) == 4 and all(50 <= len(p.split()) <= 60 for p in parts)
    assert all(p.endswith(".") for p in parts)
    assert D.split_passages(D.Section("s", ["too short"]), words=60) == []


def test_build_writes_a_signed_package_the_runtime_finds(doc_tree, home, tmp_path):
    from hublab.runtime.pkg.author import keygen

    keygen(home / "signing.key")
    out = tmp_path / "pkg"
    res = D.build([doc_tree], "python", out, words=80, router_dir=ROUTER, key=home / "signing.key")
    assert res.files == 3 and res.passages >= 4 and res.signed_by
    records = K.read_pack(out / "python-docs.jsonl")
    assert all(K.is_passage(r) for r in records)
    # the label comes from the folder given (docs/), the rest from the page, heading or anchor
    assert {"docs: os.path.join", "docs chmod(1): Description", "docs: Greenhouse handbook: Watering tomatoes"} \
        <= {r["source"] for r in records}
    vectors = np.load(K.sidecar(out / "python-docs.jsonl", K.pack_key(out / "python-docs.jsonl", _encoder_id())))
    assert vectors.shape == (len(records), 384) and vectors.dtype == np.float16
    assert {p.name for p in out.iterdir()} >= {"package.toml", "package.sig", "knowledge.toml", "python-docs.jsonl"}
    packs, errors = K.find_doc_packs([tmp_path])
    assert errors == [] and [p.domain for p in packs] == ["python"] and packs[0].path == (out / "python-docs.jsonl")


def _encoder_id() -> str:
    from hublab.runtime.pkg.manifest import sha256_file

    return sha256_file(ROUTER / "model.onnx")


def test_the_cli_builds_into_the_models_dir(doc_tree, home, capsys):
    assert main(["knowledge", "build", "--from", str(doc_tree / "notes"), "--from", str(doc_tree / "html"),
                 "--domain", "general", "--router", str(ROUTER), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    target = home / "models" / "knowledge" / "general-docs"
    assert res["directory"] == str(target) and res["files"] == 2
    sources = {r["source"] for r in K.read_pack(target / "general-docs.jsonl")}
    assert "notes: Greenhouse handbook: Watering tomatoes" in sources and "html: os.path.join" in sources
    # rebuilt in place with other settings: one package, no leftovers beside it
    assert main(["knowledge", "build", "--from", str(doc_tree / "notes"), "--domain", "general", "--words", "40",
                 "--router", str(ROUTER)]) == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["general-docs"]
    assert "words = 40" in (target / "knowledge.toml").read_text()


@pytest.mark.parametrize("args, says", [
    (["--from", "{tmp}/nowhere", "--domain", "python"], "{tmp}/nowhere: not found; give --from an existing"),
    (["--from", "{tmp}/docs/notes/logo.png", "--domain", "python"], "logo.png: not a documentation file"),
    (["--from", "{tmp}/empty", "--domain", "python"], "no readable documentation"),
    (["--from", "{tmp}/docs", "--domain", "cooking"], "--domain 'cooking': no expert has this domain; use one of "
                                                      "general, python"),
    (["--from", "{tmp}/docs", "--domain", "python", "--words", "5"], "--words 5: out of range"),
    (["--from", "{tmp}/docs", "--domain", "python", "--out", "{tmp}/docs"], "exists and is not a knowledge package"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(doc_tree, home, tmp_path, capsys, args, says):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.md").write_text("\n\n")
    before = sorted(p for p in tmp_path.rglob("*"))
    code = main(["knowledge", "build", *[a.format(tmp=tmp_path) for a in args], "--router", str(ROUTER)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says.format(tmp=tmp_path) in err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_a_torn_build_leaves_nothing(doc_tree, home, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(K, "embed_pack", boom)
    with pytest.raises(OSError):
        D.build([doc_tree], "python", tmp_path / "out", router_dir=ROUTER)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.fixture
def runtime(tmp_path, tiny_gguf, doc_tree, monkeypatch):
    """A tiny real llama base with a python and a general expert, the repo's router, and the doc tree built into
    a knowledge package for python under the models dir."""
    from hublab.runtime.engine.runtime import Runtime

    h = tmp_path / "rt-home"
    models = h / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "tiny.toml", "tiny", gguf_path=tiny_gguf, context_size=1024)
    write_model_toml(models / "experts" / "python.toml", "python", base="tiny", max_tokens=6)
    write_model_toml(models / "experts" / "general.toml", "general", base="tiny", max_tokens=6)
    (h / "system.toml").write_text(f'[runtime]\nmodels_dir = "{models}"\n[moe]\nrouter = "{ROUTER}"\n'
                                   'routing = "single"\n')
    monkeypatch.setenv("HUBLAB_HOME", str(h))
    D.build([doc_tree / "html", doc_tree / "man"], "python", models / "knowledge" / "python-docs", words=60,
            router_dir=ROUTER, sign=False)
    with Runtime(profile="host", threads=1, keep_alive=-1) as rt:
        yield rt


def test_the_closest_passage_is_shown_and_the_answer_cites_it(runtime):
    from hublab.runtime.routing.context import ExpertContext

    ctx = ExpertContext(runtime)
    chat, n, sources, favour = ctx.lookup(runtime.config("python"), "How do I join path segments together?")
    assert n == 1 and sources == ["html: os.path.join"]
    assert len(favour) == 1 and "Join one or more path segments" in favour[0]  # the passage, for the sampler
    asked = chat[-1]["content"]
    assert chat[-1]["role"] == "user" and asked.startswith("From html: os.path.join:\n")
    assert asked.endswith("\n\nUsing that, answer: How do I join path segments together?")
    assert "Join one or more path segments" in asked
    assert ctx.lookup(runtime.config("python"), "change the mode bits of a file")[2] == ["man chmod(1): Description"]
    # a question close to no passage gets none; an expert of another domain is not given python's docs
    assert ctx.lookup(runtime.config("python"), "a recipe for lemon cake with icing")[1:3] == (0, [])
    assert ctx.lookup(runtime.config("general"), "How do I join path segments together?")[1:3] == (0, [])

    pieces = list(gen := ctx.stream("python", "How do I join path segments together?"))
    assert pieces[-1] == " [html: os.path.join]" and "".join(pieces).strip() == gen.result.text.strip()
    assert gen.result.text.endswith("[html: os.path.join]") and gen.result.sources == ["html: os.path.join"]
    assert gen.result.knowledge == 1
    # a constrained answer (a JSON document) is left whole
    gen = ctx.stream("python", "How do I join path segments together?", grammar='root ::= "{}"')
    assert "".join(gen) == "{}" and gen.result.sources == []


def test_the_routed_answer_cites_the_passage(runtime):
    from hublab.runtime.routing.ensemble import Ensemble

    res = Ensemble(runtime).ask("How do I join path segments together in python with os.path?", routing="single")
    assert res.chosen == "python" and res.answer.endswith("[html: os.path.join]")


@pytest.mark.parametrize("body, says", [
    ('[knowledge]\ndomain = "python"\npack = "p.jsonl"\npassages = 9\n', "passages"),
    ('[knowledge]\ndomain = "python"\npack = "../p.jsonl"\n', "is not a file name"),
    ('[knowledge]\npack = "p.jsonl"\n', "needs [knowledge] domain and pack"),
    ('[knowledge]\ndomain = "python"\npack = "p.jsonl"\nminimum = 0.5\n', "unknown key"),
])
def test_a_broken_knowledge_toml_is_one_line_naming_the_file(tmp_path, body, says):
    from hublab.runtime.routing.knowledge import find_doc_packs

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "knowledge.toml").write_text(body)
    found, errors = find_doc_packs([tmp_path])
    assert found == [] and len(errors) == 1 and "\n" not in errors[0]
    assert str(tmp_path / "pkg" / "knowledge.toml") in errors[0] and says in errors[0], errors

