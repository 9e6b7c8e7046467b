"""What makes an answer worth reading: key-term hits and recall, and the degenerate-text detector.

Shared by bench/quality.py (the held-out benchmark) and `best` synthesis, which must never let a
high-probability loop win over a real answer (repeated text is what a small model finds most likely).
"""
from __future__ import annotations

import re
from collections import Counter

MAX_CHARS = 2000

_WORD = re.compile(r"[a-z0-9_']+")
_FENCED = re.compile(r"```.*?(```|$)", re.S)
_INLINE = re.compile(r"`[^`\n]*`")
# A loop of one to ten characters eight times in a row ("!!!!!!!!", "abcabcabc..."), spaces excluded so that
# indentation is not a loop.
_CHAR_LOOP = re.compile(r"(\S.{0,9}?)\1{7,}", re.S)
# A lower-case word with a capitalised word glued on ("stepToken", "systemToken"): prose never does this;
# code does, which is why code is removed before looking.
_GLUED = re.compile(r"\b[a-z]{2,}[A-Z][a-z]+")
# A line that is a bare command-line flag with at most a few words after it ("-list -- list all …", "--verbose").
_FLAG_LINE = re.compile(r"^\s*(-{1,2}[A-Za-z][\w-]*)([ ,=]|$)")
# A variant shorter than this ("&", "?", "8", "df") starts a word in almost any answer, so it is never looked
# for; code tokens of three or more characters ("&str", "?;", "->x") are fine.
MIN_VARIANT = 3
# Words every English sentence needs; a key-term dump has almost none.
_FUNCTION_WORDS = frozenset("""a an the and or but of to in on at for from with by as is are was were be been it
its this that these those you your i we they he she not no if then than so do does can will would should could
which what when where how why there their has have had into onto about""".split())
_LIST_MIN_WORDS = 12     # shorter answers are judged as they are
# Real answers list things too (the seven colours of a rainbow, the twelve months), so only lists longer than
# an answer needs count: a comma list of this many one- or two-word items, or this many lines of at most
# three words ...
_LIST_ITEMS = 15
_RUN_ON_WORDS = 15       # ... or a run of words this long with no sentence break and no comma ...
_RUN_ON_FUNCTION_SHARE = 0.1  # ... and under this share of function words (prose runs 35-50 %)


def variants(entry: str) -> list[str]:
    """A key term's variants ("listdir|scandir") that are looked for: lower case, MIN_VARIANT or longer."""
    return [v for v in (v.strip().lower() for v in entry.split("|")) if len(v) >= MIN_VARIANT]


def term_found(text: str, entry: str) -> bool:
    """Whether any variant of a key term ("listdir|scandir") occurs in `text`, starting at a word boundary."""
    low = text.lower()
    return any(re.search(r"(?<![a-z0-9])" + re.escape(v), low) for v in variants(entry))


def hit(text: str, key_terms: list[str]) -> bool:
    """An answer hits when it contains at least one key term (any variant)."""
    return any(term_found(text, entry) for entry in key_terms)


def recall(text: str, key_terms: list[str]) -> float | None:
    """The share of key terms (with a variant of MIN_VARIANT characters or more) that the answer contains."""
    scored = [entry for entry in key_terms if variants(entry)]
    return sum(term_found(text, entry) for entry in scored) / len(scored) if scored else None


def _prose(text: str) -> str:
    return _INLINE.sub(" ", _FENCED.sub(" ", text))


def _listed_words(prose: str) -> int:
    """How many words of the prose stand in lists of bare terms, when they are most of its words (else 0):
    comma lists of one- or two-word items, runs of words with no sentence break, no comma and almost no
    function words, and 15 or more lines of at most three words."""
    total = len(_WORD.findall(prose.lower()))
    if total < _LIST_MIN_WORDS:
        return 0
    listed = 0
    short = [n for ln in prose.splitlines() if 0 < (n := len(_WORD.findall(ln.lower()))) <= 3]
    if len(short) >= _LIST_ITEMS:
        listed += sum(short)
    for part in re.split(r"[.!?;:](?=\s|$)|\n", prose):  # "3.3" and "os.path" do not end a sentence
        words = _WORD.findall(part.lower())
        items = sorted(len(_WORD.findall(item.lower())) for item in part.split(","))
        items = [n for n in items if n]
        if len(items) >= _LIST_ITEMS and items[len(items) // 2] <= 2:
            listed += len(words)
        elif len(words) >= _RUN_ON_WORDS and not re.search(r",|(^|\s)\(", part):  # "len()" is a word, " (" prose
            lexical = [w for w in words if not w.isdigit()]
            if sum(w in _FUNCTION_WORDS for w in lexical) < _RUN_ON_FUNCTION_SHARE * len(lexical):
                listed += len(words)
    return listed if 2 * listed >= total else 0


def degenerate(text: str, system_prompt: str = "") -> str | None:
    """Why an answer is degenerate, or None when it reads as an answer.

    Empty; a word 4-gram repeated 3 or more times; a line repeated 3 or more times; a character loop;
    junk glued to words; 3 or more lines of bare command flags; a list of terms, not sentences (most of 12 or
    more words outside code in long comma lists, runs with no function words or many one-to-three-word
    lines); the system prompt echoed; over 2000 characters.
    """
    stripped = text.strip()
    if not stripped:
        return "empty"
    if len(stripped) > MAX_CHARS:
        return f"longer than {MAX_CHARS} characters"
    lines = Counter(ln.strip() for ln in stripped.splitlines()
                    if len(ln.strip()) >= 6 and any(c.isalnum() for c in ln))
    if lines and max(lines.values()) >= 3:
        return f"line {lines.most_common(1)[0][0][:40]!r} repeated {lines.most_common(1)[0][1]} times"
    words = _WORD.findall(stripped.lower())
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    if grams and max(grams.values()) >= 3:
        gram, n = grams.most_common(1)[0]
        return f"4-gram {' '.join(gram)!r} repeated {n} times"
    loop = _CHAR_LOOP.search(stripped)
    if loop:
        return f"character loop {loop.group(1)[:10]!r}"
    prose = _prose(stripped)
    glued = _GLUED.findall(prose)
    if len(glued) >= 3:
        return f"junk glued to words ({', '.join(glued[:3])})"
    flags = [ln for ln in prose.splitlines() if _FLAG_LINE.match(ln)]
    if len(flags) >= 3:
        return f"{len(flags)} lines of bare command flags"
    listed = _listed_words(prose)
    if listed:
        return f"a list of terms, not sentences ({listed} of its words)"
    if system_prompt and len(system_prompt) >= 20:
        echo = " ".join(_WORD.findall(system_prompt.lower())[:8])
        if echo and echo in " ".join(words):
            return "the system prompt echoed"
    return None
