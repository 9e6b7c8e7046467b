"""What makes an answer worth reading: key-term hits and the degenerate-text detector.

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


def _terms(entry: str) -> list[str]:
    return [v.strip().lower() for v in entry.split("|") if v.strip()]


def term_found(text: str, entry: str) -> bool:
    """Whether any variant of a key term ("listdir|scandir") occurs in `text`, starting at a word boundary."""
    low = text.lower()
    return any(re.search(r"(?<![a-z0-9])" + re.escape(v), low) for v in _terms(entry))


def hit(text: str, key_terms: list[str]) -> bool:
    """An answer hits when it contains at least one key term (any variant)."""
    return any(term_found(text, entry) for entry in key_terms)


def _prose(text: str) -> str:
    return _INLINE.sub(" ", _FENCED.sub(" ", text))


def degenerate(text: str, system_prompt: str = "") -> str | None:
    """Why an answer is degenerate, or None when it reads as an answer.

    Empty; a word 4-gram repeated 3 or more times; a line repeated 3 or more times; a character loop;
    junk glued to words; 3 or more lines of bare command flags; the system prompt echoed; over 2000
    characters.
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
    if system_prompt and len(system_prompt) >= 20:
        echo = " ".join(_WORD.findall(system_prompt.lower())[:8])
        if echo and echo in " ".join(words):
            return "the system prompt echoed"
    return None
