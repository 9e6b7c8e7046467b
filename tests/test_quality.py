"""The answer-quality metrics (runtime/quality.py) and the held-out sets' separation from every training file."""
from __future__ import annotations

import json

import pytest
from heldout import HELDOUT_FILES, REPO, heldout_questions, too_close, words

from hublab.runtime.quality import degenerate, hit, term_found

SYSTEM = "You are a Python expert. Answer with correct, idiomatic Python and short code examples."


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("x" * 2001, "longer than"),
    ("the cat sat on the mat. the cat sat on the rug. the cat sat on the bed.", "4-gram"),
    ("Use pip.\nInstall the package first\nInstall the package first\nInstall the package first", "line"),
    ("Done!!!!!!!!!!!!", "character loop"),
    ("abcabcabcabcabcabcabcabcabc", "character loop"),
    ("-list -- list all systems in your system.stepToken and the deviceToken with userToken", "glued"),
    ("Options:\n-a all files\n-l long listing\n--color use colours\n", "flags"),
    ("You are a Python expert. Answer with correct, idiomatic Python. Lists are mutable.", "system prompt"),
])
def test_degenerate_flags_each_kind(text, why):
    reason = degenerate(text, SYSTEM)
    assert reason is not None and why in reason


@pytest.mark.parametrize("text", [
    "A list is mutable and a tuple is not, so tuples can be dictionary keys.",
    "Use os.listdir:\n```python\nimport os\nfor name in os.listdir('.'):\n    print(name)\n```",
    # code is not prose: camelCase and repeated closing lines inside a fenced block are fine
    "In Rust:\n```rust\nfn main() {\n    let userName = 1;\n    let fileName = 2;\n    let hostName = 3;\n}\n```",
    "- one\n- two\n- three\n",               # a markdown list is not a list of flags
    "JavaScript and PyTorch are names, not junk.",
])
def test_degenerate_passes_real_answers(text):
    assert degenerate(text, SYSTEM) is None


def test_hit_needs_a_key_term_at_a_word_start():
    terms = ["listdir|scandir|iterdir", "glob"]
    assert hit("Call os.listdir(path).", terms)
    assert hit("Path('.').iterdir() yields entries", terms)
    assert hit("Use GLOB patterns", terms)                   # case-insensitive
    assert not hit("the globe is round", ["lobe"])          # inside a word does not count
    assert hit("globs and globbing", ["glob"])              # a word start does (plurals, -ing)
    assert not hit("Nothing relevant here.", terms)
    assert term_found("use a virtual environment", "venv|virtual environment")


def test_heldout_sets_are_well_formed():
    rows = [json.loads(line) for line in HELDOUT_FILES[0].read_text().splitlines() if line.strip()]
    assert len(rows) >= 150
    by_domain: dict[str, int] = {}
    for r in rows:
        by_domain[r["domain"]] = by_domain.get(r["domain"], 0) + 1
        assert r["reference"].strip() and 3 <= len(r["key_terms"]) <= 6
        assert all(t == t.lower() for t in r["key_terms"])
        # echoing the question must not count as a hit
        assert not hit(r["question"], r["key_terms"]), r["id"]
        # a correct answer hits: the reference does
        assert hit(r["reference"], r["key_terms"]), r["id"]
    assert min(by_domain.values()) >= 30 and len(by_domain) == 5


def training_files():
    yield from (REPO / "trainer" / "data").rglob("*.jsonl")
    yield from (REPO / "models").rglob("*.jsonl")  # knowledge packs


def test_no_heldout_question_is_in_any_training_file():
    held = [(q, words(q)) for q in heldout_questions()]
    files = list(training_files())
    assert any(f.parent.name == "answers" for f in files)
    clashes = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("question") or row.get("query") or row.get("text") or ""
            w = words(text)
            clashes += [(path.name, text, q) for q, hw in held if too_close(w, hw)]
    assert not clashes, clashes[:5]
