"""The held-out question sets and the rule that keeps them out of training: shared by tests and the data builder."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT_FILES = (REPO / "bench" / "quality" / "heldout.jsonl", REPO / "bench" / "routing" / "heldout.jsonl",
                 REPO / "bench" / "routing" / "dev.jsonl")


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def heldout_questions() -> list[str]:
    out = []
    for path in HELDOUT_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out.append(row.get("question") or row["query"])
    return out


def too_close(a: frozenset[str], b: frozenset[str]) -> bool:
    """The same question in other words: equal word sets, or word Jaccard >= 0.75 for 3+ words."""
    if a == b:
        return True
    return len(a) >= 3 and len(b) >= 3 and len(a & b) / len(a | b) >= 0.75
