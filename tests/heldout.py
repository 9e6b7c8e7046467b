"""The held-out and dev sets, every file a model or router learns from, and the rules that keep them apart.

Questions are too close when they are the same question in other words or with typos: equal word sets,
word Jaccard >= WORD_JACCARD, or character-trigram Jaccard >= TRIGRAM_JACCARD (tests/test_heldout.py shows
what each threshold catches). Answers are too close when they share a run of ANSWER_RUN words.
"""
from __future__ import annotations

import json
import math
import re
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUALITY_HELDOUT = REPO / "bench" / "quality" / "heldout.jsonl"
QUALITY_DEV = REPO / "bench" / "quality" / "dev.jsonl"
QUALITY_DEV_OTHER = REPO / "bench" / "quality" / "dev_other.jsonl"
ROUTING_HELDOUT = REPO / "bench" / "routing" / "heldout.jsonl"
ROUTING_DEV = tuple(REPO / "bench" / "routing" / f"{name}.jsonl" for name in ("dev", "dev2", "dev3"))
HELDOUT_FILES = (QUALITY_HELDOUT, ROUTING_HELDOUT)
DEV_FILES = (QUALITY_DEV, QUALITY_DEV_OTHER, *ROUTING_DEV)

# A one-word substitution in a 4-word question leaves word Jaccard 3/5 = 0.6; in 5 words, 4/6.
WORD_JACCARD = 0.6
# One typo changes at most 3 trigrams of a word; in a question of 5+ words trigram Jaccard stays above 0.6,
# while different questions on one topic ("how do I install numpy" / "how do I import numpy") fall below.
TRIGRAM_JACCARD = 0.6
# ... and the content words must agree as well: one of three changed leaves 2/4.
CONTENT_JACCARD = 0.5
CONTENT_TRIGRAM_JACCARD = 0.4
ANSWER_RUN = 10


# Words, and runs of code symbols (`==`, `//`, `&`, `->`) so that "`is` vs `==`" and "/ vs //" differ;
# sentence punctuation and quotes are not tokens.
_TOKEN = re.compile(r"[a-z0-9_]+|[^\w\s.,;:!?'\"()`]+")
STOPWORDS = frozenset("""a an the and or of to in on at for from with by about into as is are was were be been do does
did can could should would will shall may might must i me my you your we our it its this that these those there
what whats what's which who whom whose when where why how s t d ll ve re m not no vs versus than then so if
have has had between
""".split())


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def answer_words(text: str) -> list[str]:
    """An answer's words, without code symbols: a shared path or command is not a shared sentence."""
    return re.findall(r"[a-z0-9_]+", text.lower())


def words(text: str) -> frozenset[str]:
    return frozenset(tokens(text))


def content_words(text: str) -> frozenset[str]:
    return words(text) - STOPWORDS


def trigrams(text: str) -> frozenset[str]:
    """Character 3-grams of the text's words joined by single spaces, padded: typo-tolerant."""
    norm = " " + " ".join(tokens(text)) + " "
    return frozenset(norm[i:i + 3] for i in range(len(norm) - 2))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def question(row: dict) -> str:
    return row.get("question") or row.get("query") or row.get("text") or ""


def heldout_questions() -> list[str]:
    """Every question of the held-out and dev sets (the data builder must never train on any of them)."""
    return [question(r) for path in HELDOUT_FILES + DEV_FILES for r in read_jsonl(path)]


def training_files() -> list[Path]:
    """Every JSONL a model, a knowledge pack or the router learns or retrieves from."""
    return sorted((REPO / "trainer" / "data").rglob("*.jsonl")) + sorted((REPO / "models").rglob("*.jsonl"))


def training_questions() -> list[tuple[str, str]]:
    """(where, text) for every question or query anything is trained, calibrated or routed on: training and
    knowledge JSONL, the router's labelled examples, expert examples, the open-set experts' example files."""
    out = [(p.relative_to(REPO).as_posix(), question(r)) for p in training_files() for r in read_jsonl(p)]
    for p in sorted((REPO / "bench" / "routing").glob("*_examples.txt")):
        out += [(p.relative_to(REPO).as_posix(), t.strip()) for t in p.read_text().splitlines() if t.strip()]
    for p in sorted((REPO / "models").rglob("*.toml")):
        expert = tomllib.loads(p.read_text()).get("expert", {})
        out += [(p.relative_to(REPO).as_posix(), t) for t in expert.get("examples", [])]
        if expert.get("examples_file"):
            f = p.parent / expert["examples_file"]
            out += [(f.relative_to(REPO).as_posix(), t.strip()) for t in f.read_text().splitlines() if t.strip()]
    npz = REPO / "models" / "router" / "examples.npz"
    if npz.is_file():
        import numpy as np

        out += [("models/router/examples.npz", str(t)) for t in np.load(npz)["texts"]]
    return [(where, text) for where, text in out if text.strip()]


def training_answers() -> list[tuple[str, str]]:
    """(where, text) for every answer a model is trained on or a knowledge pack retrieves."""
    return [(p.relative_to(REPO).as_posix(), r["response"]) for p in training_files() for r in read_jsonl(p)
            if isinstance(r.get("response"), str)]


class Near:
    """Sets indexed for exact Jaccard >= t lookups (prefix filtering: two sets that reach t share an element
    among the first |s| - ceil(t|s|) + 1 of each, in one global order, rarest first)."""

    def __init__(self, sets: list[frozenset], t: float):
        self.sets, self.t = sets, t
        freq = Counter(g for s in sets for g in s)
        self.order = lambda s: sorted(s, key=lambda g: (freq.get(g, 0), g))
        self.index: dict = defaultdict(list)
        for i, s in enumerate(sets):
            for g in self.prefix(s):
                self.index[g].append(i)

    def prefix(self, s: frozenset) -> list:
        return self.order(s)[: len(s) - math.ceil(self.t * len(s)) + 1]

    def near(self, s: frozenset) -> list[tuple[int, float]]:
        """(index, Jaccard) of every set with Jaccard >= t."""
        found = {i for g in self.prefix(s) for i in self.index.get(g, ())}
        return [(i, j) for i in sorted(found) if (j := jaccard(s, self.sets[i])) >= self.t]


class QuestionIndex:
    """Texts to compare new questions against, by word set and by character trigrams.

    A measure counts only when the question's content words (STOPWORDS left out) agree too: "What does yield
    do?" and "What does lora_alpha do?" share a template, not a question."""

    def __init__(self, texts: list[tuple[str, str]]):
        self.texts = texts
        self.exact, self.content = defaultdict(list), defaultdict(list)
        for i, (_, text) in enumerate(texts):
            self.exact[words(text)].append(i)
            if len(content_words(text)) >= 2:
                self.content[content_words(text)].append(i)
        self.by_words = Near([words(t) for _, t in texts], WORD_JACCARD)
        self.by_trigrams = Near([trigrams(t) for _, t in texts], TRIGRAM_JACCARD)

    def clashes(self, text: str) -> list[tuple[str, str, str]]:
        """(why, where, other text) for every indexed text too close to `text`."""
        out, seen = [], set()
        w, c = words(text), content_words(text)

        def add(i: int, why: str) -> None:
            if i not in seen:
                seen.add(i)
                out.append((why, *self.texts[i]))

        for i in self.exact.get(w, []):
            add(i, "same words")
        for i in self.content.get(c, []) if len(c) >= 2 else []:
            add(i, "same content words")  # "symptoms of dehydration" / "What are the symptoms of dehydration?"
        if len(w) >= 3:  # two-word queries share a word set only by being the same query
            for i, j in self.by_words.near(w):
                other = self.texts[i][1]
                if len(self.by_words.sets[i]) >= 3 and jaccard(c, content_words(other)) >= CONTENT_JACCARD:
                    add(i, f"word Jaccard {j:.2f}")
        for i, j in self.by_trigrams.near(trigrams(text)):
            other = self.texts[i][1]
            if jaccard(trigrams(" ".join(sorted(c))), trigrams(" ".join(sorted(content_words(other))))) \
                    >= CONTENT_TRIGRAM_JACCARD:
                add(i, f"trigram Jaccard {j:.2f}")
        return out


class RunIndex:
    """Answers indexed by every run of ANSWER_RUN words."""

    def __init__(self, texts: list[tuple[str, str]]):
        self.texts = texts
        self.runs: dict[tuple, int] = {}
        for i, (_, text) in enumerate(texts):
            toks = answer_words(text)
            for k in range(len(toks) - ANSWER_RUN + 1):
                self.runs.setdefault(tuple(toks[k:k + ANSWER_RUN]), i)

    def shared(self, text: str) -> list[tuple[str, str, str]]:
        """(the shared run, where, other text) for each indexed answer sharing a run with `text`."""
        toks, out, seen = answer_words(text), [], set()
        for k in range(len(toks) - ANSWER_RUN + 1):
            i = self.runs.get(tuple(toks[k:k + ANSWER_RUN]))
            if i is not None and i not in seen:
                seen.add(i)
                out.append((" ".join(toks[k:k + ANSWER_RUN]), *self.texts[i]))
        return out
