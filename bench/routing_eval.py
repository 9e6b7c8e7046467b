"""Routing quality on queries written apart from the training data (bench/routing/).

Two query sets, neither trained nor calibrated on (tests/test_quality.py checks every training file):
- `heldout` (bench/routing/heldout.jsonl, 386 queries): 54-56 per known domain, 60 cooking and 50 legal,
  with the 20 examples of cooking_examples.txt and legal_examples.txt; written at once by someone who saw
  no training data (24 queries that coincided with training queries were dropped), and read only to
  measure a finished router;
- `dev` (bench/routing/dev.jsonl, 342 queries, cooking examples dev_cooking_examples.txt): the first
  held-out set, on which the open-set scoring was chosen between variants; its numbers are no longer
  independent.
Each run goes through the device's own code path (`Router.route`, strategy `single`, no keywords):
- `five`: the router's five experts alone, on the five domains' queries: top-1 accuracy, macro-F1, the
  confusion matrix (rows true, columns predicted), the expected calibration error of the top score, and
  the trained head's accuracy alone (without the similarity to the router's labelled queries);
- `open_set`: for each extra domain, the five plus that expert alone, with only its 20 examples and no
  router output (never trained on): the share of its queries routed to it, and the five domains'
  accuracy with it installed; `all_extras`: every extra expert installed at once.
Prints one JSON object. Goals (issue 14): five >= 0.95 top-1; with a sixth expert installed its queries
>= 0.85 and the five still >= 0.95.

    .venv/bin/python bench/routing_eval.py [--set heldout|dev] [--router models/router]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUTING = REPO / "bench" / "routing"
SETS = {"heldout": (ROUTING / "heldout.jsonl", {"cooking": ROUTING / "cooking_examples.txt",
                                                "legal": ROUTING / "legal_examples.txt"}),
        "dev": (ROUTING / "dev.jsonl", {"cooking": ROUTING / "dev_cooking_examples.txt"}),
        "dev2": (ROUTING / "dev2.jsonl", {"cooking": ROUTING / "cooking_examples.txt",
                                          "legal": ROUTING / "legal_examples.txt"})}
GOAL_FIVE, GOAL_OPEN = 0.95, 0.85


def read_heldout(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["query"], r["domain"]) for r in rows]


def read_examples(path: Path) -> tuple[str, ...]:
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def ece(confidence: list[float], correct: list[bool], bins: int = 10) -> float:
    """Expected calibration error of the top score: |accuracy - mean confidence| per bin, weighted."""
    total, n = 0.0, len(confidence)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo < c <= hi or (b == 0 and c == 0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            conf = sum(confidence[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return round(total, 4)


def metrics(pairs: list[tuple[str, str]], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over `labels`, confusion (rows true, columns predicted; extra column: other)."""
    cols = labels + ["other"]
    cm = [[0] * len(cols) for _ in labels]
    for true, pred in pairs:
        cm[labels.index(true)][cols.index(pred if pred in labels else "other")] += 1
    f1s = {}
    for i, name in enumerate(labels):
        tp = cm[i][i]
        fp = sum(cm[j][i] for j in range(len(labels))) - tp
        fn = sum(cm[i]) - tp
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1s[name] = round(2 * p * r / (p + r), 4) if p + r else 0.0
    n = len(pairs)
    return {"n": n, "accuracy": round(sum(t == p for t, p in pairs) / n, 4),
            "macro_f1": round(sum(f1s.values()) / len(f1s), 4), "f1": f1s,
            "confusion": {"labels": cols, "rows": {name: row for name, row in zip(labels, cm)}}}


def evaluate(router_dir: Path, name: str = "heldout") -> dict:
    from hublab.runtime.router import ExpertRoute, Router

    queries, extras = SETS[name]
    rows = read_heldout(queries)
    five_router = Router.load(router_dir, fallback="general", keyword_weight=0.0)
    labels = list(five_router.labels)
    five_rows = [(q, d) for q, d in rows if d in labels]
    picks, conf, misses = [], [], []
    for q, d in five_rows:
        top = five_router.route(q, "single").top
        picks.append((d, top.name))
        conf.append(top.score)
        if top.name != d:
            misses.append({"query": q, "domain": d, "routed": top.name, "score": round(top.score, 3)})
    five = metrics(picks, labels)
    five["ece"] = ece(conf, [t == p for t, p in picks])
    # The trained head alone (no example similarity), for comparison.
    head = [labels[int(five_router.probabilities(q).argmax())] == d for q, d in five_rows]
    five["head_only_accuracy"] = round(sum(head) / len(head), 4)
    five["misrouted"] = misses

    def with_extras(added: dict[str, tuple[str, ...]]) -> dict:
        experts = [ExpertRoute(label) for label in labels] + [ExpertRoute(n, examples=ex) for n, ex in added.items()]
        router = Router.load(router_dir, experts, fallback="general", keyword_weight=0.0)
        routed = [(q, d, router.route(q, "single").top.name) for q, d in rows if d in labels or d in added]
        picked = [(d, p) for _, d, p in routed]
        known = [(t, p) for t, p in picked if t in labels]
        out = metrics(picked, labels + list(added))
        out.update(five_accuracy=round(sum(t == p for t, p in known) / len(known), 4),
                   five_to_new=sum(p in added for _, p in known), examples={n: len(ex) for n, ex in added.items()})
        for n in added:
            mine = [p for t, p in picked if t == n]
            out[f"{n}_share"] = round(mine.count(n) / len(mine), 4)
            out[f"{n}_misrouted"] = [{"query": q, "routed": p} for q, d, p in routed if d == n and p != n]
        return out

    examples = {n: read_examples(path) for n, path in extras.items()}
    open_set = {n: with_extras({n: ex}) for n, ex in examples.items()}
    result = {"router": str(router_dir), "set": name, "queries": str(queries), "five": five, "open_set": open_set,
              "goal": {"five": GOAL_FIVE, "open_set": GOAL_OPEN, "five_met": five["accuracy"] >= GOAL_FIVE,
                       "open_set_met": {n: o[f"{n}_share"] >= GOAL_OPEN and o["five_accuracy"] >= GOAL_FIVE
                                        for n, o in open_set.items()}}}
    if len(examples) > 1:
        result["all_extras"] = with_extras(examples)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", type=Path, default=REPO / "models" / "router", help="router directory")
    parser.add_argument("--set", choices=sorted(SETS), default="heldout", help="which query set (default heldout)")
    args = parser.parse_args(argv)
    print(json.dumps(evaluate(args.router, args.set), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
