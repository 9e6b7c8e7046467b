"""The held-out sets stay apart from everything trained, retrieved, routed or tuned on (rules in tests/heldout.py).

Both ways: a held-out item near a training file fails, and so does a training file (or pack, or router example)
added later near a held-out item. Dropped items are listed in bench/*/PROVENANCE.md."""
from __future__ import annotations

import re

import pytest
from heldout import (DEV_FILES, HELDOUT_FILES, QUALITY_DEV, QUALITY_HELDOUT, STOPWORDS, QuestionIndex, RunIndex,
                     question, read_jsonl, training_answers, training_files, training_questions)


@pytest.fixture(scope="module")
def trained() -> QuestionIndex:
    return QuestionIndex(training_questions())


@pytest.fixture(scope="module")
def dev() -> QuestionIndex:
    return QuestionIndex([(p.name, question(r)) for p in DEV_FILES for r in read_jsonl(p)])


def test_every_kind_of_training_source_is_compared():
    where = {w for w, _ in training_questions()}
    for needed in ("trainer/data/answers/python.jsonl", "trainer/data/router_train.jsonl",
                   "trainer/data/router_openset.jsonl", "models/demo/general-knowledge.jsonl",
                   "bench/routing/cooking_examples.txt", "bench/routing/legal_examples.txt",
                   "models/router/examples.npz"):
        assert needed in where, needed
    assert {w for w, _ in training_answers()} >= {"trainer/data/answers/rust.jsonl", "models/demo/ai-knowledge.jsonl"}


@pytest.mark.parametrize("path", HELDOUT_FILES, ids=lambda p: p.parent.name)
def test_no_heldout_question_is_near_a_training_question(path, trained):
    clashes = [(question(r), c) for r in read_jsonl(path) for c in trained.clashes(question(r))]
    assert not clashes, clashes[:5]


@pytest.mark.parametrize("path", HELDOUT_FILES, ids=lambda p: p.parent.name)
def test_no_heldout_question_is_near_a_dev_question(path, dev):
    clashes = [(question(r), c) for r in read_jsonl(path) for c in dev.clashes(question(r))]
    assert not clashes, clashes[:5]


def test_no_heldout_reference_shares_ten_words_with_a_training_or_dev_answer():
    answers = RunIndex(training_answers() + [(QUALITY_DEV.name, r["reference"]) for r in read_jsonl(QUALITY_DEV)])
    shared = [(r["id"], s) for r in read_jsonl(QUALITY_HELDOUT) for s in answers.shared(r["reference"])]
    assert not shared, shared[:5]


@pytest.mark.parametrize("path", HELDOUT_FILES, ids=lambda p: p.parent.name)
def test_heldout_items_are_distinct(path):
    """Each set against itself: no two of its own questions clash (the writer's own duplicate check, and a
    bound on how often the rules fire on unrelated questions)."""
    texts = [question(r) for r in read_jsonl(path)]
    index = QuestionIndex([(str(i), t) for i, t in enumerate(texts)])
    twins = [(t, c[2]) for i, t in enumerate(texts) for c in index.clashes(t) if c[1] != str(i)]
    assert not twins, twins[:5]


@pytest.mark.parametrize("path", DEV_FILES, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_dev_questions_are_not_training_questions_word_for_word(path):
    """The dev sets predate these rules (PROVENANCE.md counts how many would fail them); they keep the first
    rule against training and knowledge files: no question with the same words, or word Jaccard >= 0.75 on three
    or more words."""
    def first_words(text: str) -> frozenset[str]:  # the first rule's words: letters and digits only
        return frozenset(re.findall(r"[a-z0-9]+", text.lower()))

    train = [first_words(question(r)) for p in training_files() for r in read_jsonl(p)]
    clashes = []
    for r in read_jsonl(path):
        w = first_words(question(r))
        clashes += [question(r) for t in train if w == t or (len(w) >= 3 and len(t) >= 3
                                                             and len(w & t) / len(w | t) >= 0.75)]
    assert not clashes, clashes[:5]


# What the thresholds catch: a training question of four or more words with one typo in its longest word, one
# function word replaced or dropped, a filler word added, or its words reordered, is caught as that question.

def _perturbed(text: str) -> dict[str, str]:
    ws = text.split()
    longest = max(range(len(ws)), key=lambda i: len(ws[i]))
    w = ws[longest]
    out = {"typo": " ".join(ws[:longest] + [w[:2] + w[3] + w[2] + w[4:] if len(w) >= 5 else w + "e"]
                            + ws[longest + 1:]),
           "filler added": " ".join(ws[:1] + ["actually"] + ws[1:]),
           "reordered": " ".join(ws[1:] + ws[:1])}
    stop = next((i for i, x in enumerate(ws) if x.lower().strip("?,.") in STOPWORDS), None)
    if stop is not None:
        out["function word replaced"] = " ".join(ws[:stop] + ["please"] + ws[stop + 1:])
        out["function word dropped"] = " ".join(ws[:stop] + ws[stop + 1:])
    return out


def test_typos_and_one_word_paraphrases_are_caught():
    sample = [t for _, t in training_questions() if len(set(t.lower().split())) >= 4][::40]
    assert len(sample) >= 200
    index = QuestionIndex([(str(i), t) for i, t in enumerate(sample)])
    tried, missed = 0, []
    for i, text in enumerate(sample):
        for kind, variant in _perturbed(text).items():
            tried += 1
            if str(i) not in {c[1] for c in index.clashes(variant)}:
                missed.append((kind, variant, text))
    # the misses are typos in the one content word of a three-word question ("What is net wotrh?"), and rarely a
    # contraction replaced in a four-word one ("What's your favorite color?" -> "please your favorite color?":
    # "what's" is two words, so a third of the words changed)
    assert len(missed) <= 0.01 * tried, missed[:10]
    assert sum(m[0] != "typo" for m in missed) <= 0.002 * tried, [m for m in missed if m[0] != "typo"]
