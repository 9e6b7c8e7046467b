"""The answer-quality metrics (runtime/routing/quality.py), and what bench/quality.py makes of them on the sets.

The sets' separation from every training file is tests/test_heldout.py."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
from heldout import QUALITY_DEV, QUALITY_HELDOUT, REPO, read_jsonl

from hublab.runtime.routing.quality import degenerate, hit, recall, term_found, variants

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
    # lists of terms, not sentences: a run with no function words, a long comma list, many bare lines
    ("venv activate pip mutable hashable borrow lifetime tokio cargo gradient epoch systemctl chmod swap cron",
     "list of terms"),
    (", ".join(f"term{i}" for i in range(16)) + ".", "list of terms"),
    # a call's "()" is part of a word, not a parenthesis that makes the run prose
    ("venv activate pip mutable hashable len() borrow lifetime tokio cargo gradient epoch systemctl chmod swap",
     "list of terms"),
    ("\n".join(f"- term {i}" for i in range(16)), "list of terms"),
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
    # lists a real answer needs are not lists of terms
    "January, February, March, April, May, June, July, August, September, October, November, and December.",
    "Red, orange, yellow, green, blue, indigo, and violet, often remembered as ROYGBIV.",
    "Neil Armstrong, on July 20, 1969, during NASA's Apollo 11 mission. Buzz Aldrin followed him shortly after.",
    "Use tokio spawn (one task per connection) plus select timeouts plus graceful shutdown signals via ctrl_c",
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


def test_variants_under_three_characters_are_never_looked_for():
    """"&", "?", "8" or "df" start a word in almost any answer; "&str" is a code token worth finding."""
    assert variants("reference|&|?") == ["reference"] and variants("&str| 8 ") == ["&str"]
    assert not hit("I & you, 8 times?", ["&", "?", "8", "df"])
    assert hit("take a &str", ["&str"])


def test_recall_is_the_share_of_key_terms_held():
    terms = ["mutable|immutable", "hashable|dict key", "square brackets|parentheses"]
    assert recall("Tuples are immutable and hashable.", terms) == pytest.approx(2 / 3)
    assert recall("Nothing here.", terms) == 0.0
    assert recall("Lists are mutable.", ["mutable", "&"]) == 1.0   # a term with no variant long enough is not scored
    assert recall("anything", ["&", "?"]) is None


def bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [QUALITY_HELDOUT, QUALITY_DEV], ids=["heldout", "dev"])
def test_a_fixed_list_of_key_terms_scores_under_a_tenth(path):
    """The same answer to every question, made of the set's most common key terms, gets nothing: it is a list
    of terms (degenerate), and a degenerate answer scores 0 (an unflagged 39-term string once hit 0.633)."""
    bench = bench_quality()
    rows = read_jsonl(path)
    common = Counter(v.split()[0] for r in rows for t in bench.scored_terms(r) for v in variants(t)[:1])
    terms = [t for t, _ in common.most_common(39)]
    for answer in (" ".join(terms), ", ".join(terms) + ".", "\n".join(f"- {t}" for t in terms),
                   "Key terms: " + ", ".join(terms) + "."):
        answers = [{"id": r["id"], "domain": r["domain"], "answer": answer, "seconds": 0.0} for r in rows]
        result = bench.score(rows, answers, None, {})["overall"]
        assert result["hit"] < 0.10 and result["recall"] < 0.10 and result["degenerate"] == 1.0, answer[:60]


@pytest.mark.parametrize("path", [QUALITY_HELDOUT, QUALITY_DEV], ids=["heldout", "dev"])
def test_quality_sets_are_well_formed(path):
    rows = read_jsonl(path)
    assert len({r["id"] for r in rows}) == len(rows) >= 140
    domains = Counter(r["domain"] for r in rows)
    assert set(domains) >= {"python", "rust", "ai", "general", "system"} and min(domains.values()) >= 18
    bench = bench_quality()
    for r in rows:
        assert r["question"].strip() and r["reference"].strip() and 2 <= len(r["key_terms"]) <= 6, r["id"]
        # a correct answer hits: the reference does, on the terms that are scored
        terms = bench.scored_terms(r)
        assert hit(r["reference"], terms) or (path == QUALITY_DEV and not terms), r["id"]


def test_heldout_key_terms_follow_the_three_character_rule():
    """Every variant of every held-out key term is looked for (dev.jsonl predates the rule: PROVENANCE.md)."""
    short = [(r["id"], v) for r in read_jsonl(QUALITY_HELDOUT) for t in r["key_terms"] for v in t.split("|")
             if len(v.strip()) < 3]
    assert not short


def test_dev_clean_keeps_the_dev_items_no_training_file_comes_near():
    """`--set dev-clean`: every domain still there, and an item whose question a knowledge pack holds is left out."""
    from heldout import QuestionIndex, training_questions

    bench = bench_quality()
    rows = read_jsonl(QUALITY_DEV)
    kept = bench.clean(rows)
    assert 90 <= len(kept) < len(rows) and min(Counter(r["domain"] for r in kept).values()) >= 15
    index = QuestionIndex(training_questions())
    assert not any(index.clashes(r["question"]) for r in kept)
    pack = json.loads((REPO / "models" / "demo" / "python-knowledge.jsonl").read_text().splitlines()[0])
    assert bench.clean([{"question": pack["question"], "reference": "a new answer", "domain": "python"}]) == []


def test_fresh_starts_every_answer_from_an_empty_kv_cache(tiny_models_dir):
    """bench/quality.py --fresh: after forget_kv no answer reuses a prefix an earlier answer left, whichever expert
    left it (the live KV and the prefixes saved per expert both go); without it the prefix cache serves."""
    from hublab.runtime.engine.runtime import Runtime

    bench = bench_quality()
    with Runtime(models_dir=tiny_models_dir, profile="host", threads=1, keep_alive=-1) as rt:
        rt.generate("alpha", "python model", max_tokens=4)
        rt.generate("beta", "python model", max_tokens=4)  # alpha's prefix is saved aside, beta's is live
        bench.forget_kv(rt)
        assert rt.generate("alpha", "python model", max_tokens=4).cached_tokens == 0
        bench.forget_kv(rt)
        assert rt.generate("beta", "python model", max_tokens=4).cached_tokens == 0
        assert rt.generate("beta", "python model", max_tokens=4).cached_tokens > 0
