"""Routing quality on queries written apart from the training data (bench/routing/; PROVENANCE.md there says
who wrote each set, when and under which rule).

Four query sets, none trained or calibrated on (tests/test_heldout.py checks every training file):
- `heldout` (bench/routing/heldout.jsonl): the five domains, cooking and legal, with the 20 examples of
  cooking_examples.txt and legal_examples.txt; written by a writer who read no project file, with every query
  near a training, router-example or dev query dropped; read only to measure a finished router;
- `dev2` (bench/routing/dev2.jsonl, same extras): the second held-out set, on which issue 14's goals were met and
  guarded (tests/test_router_examples.py); no longer independent;
- `dev` (bench/routing/dev.jsonl, cooking examples dev_cooking_examples.txt): the first held-out set, on which
  the open-set scoring was chosen between variants;
- `dev3` (bench/routing/dev3.jsonl, cooking from dev_cooking_examples.txt): written blind like the held-out set,
  for choosing routing data and settings now that dev and dev2 no longer tell routers apart.
Each run goes through the device's own code path (`Router.route`, strategy `single`, no keywords):
- `five`: the router's five experts alone, on the five domains' queries: top-1 accuracy, macro-F1, the
  confusion matrix (rows true, columns predicted), the expected calibration error of the top score, and
  the trained head's accuracy alone (without the similarity to the router's labelled queries);
- `open_set`: for each extra domain, the five plus that expert alone, with only its 20 examples and no
  router output (never trained on): the share of its queries routed to it, and the five domains'
  accuracy with it installed; `all_extras`: every extra expert installed at once.
Prints one JSON object. Goals: five >= 0.95 top-1 (issues 14 and 26); with a sixth expert installed its
queries >= 0.85 and the five >= 0.95 (issue 14), the five >= 0.93 with cooking (issue 26). --readme fills
`<!-- routing:SET -->` (a table and the confusion matrix) and `<!-- routing:SET:summary -->` (one line) in each
file given, with the commit and date.

    .venv/bin/python bench/routing_eval.py [--set heldout|dev3|dev2|dev] [--router models/router] [--readme FILE ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUTING = REPO / "bench" / "routing"
SETS = {"heldout": (ROUTING / "heldout.jsonl", {"cooking": ROUTING / "cooking_examples.txt",
                                                "legal": ROUTING / "legal_examples.txt"}),
        "dev": (ROUTING / "dev.jsonl", {"cooking": ROUTING / "dev_cooking_examples.txt"}),
        "dev2": (ROUTING / "dev2.jsonl", {"cooking": ROUTING / "cooking_examples.txt",
                                          "legal": ROUTING / "legal_examples.txt"}),
        "dev3": (ROUTING / "dev3.jsonl", {"cooking": ROUTING / "dev_cooking_examples.txt"})}
GOAL_FIVE, GOAL_OPEN = 0.95, 0.85
GOAL_FIVE_WITH_COOKING = 0.93  # issue 26: the five keep this with cooking installed as a sixth expert


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
    from hublab.runtime.routing.router import ExpertRoute, Router

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
    if "cooking" in open_set:
        result["goal"]["five_with_cooking_met"] = open_set["cooking"]["five_accuracy"] >= GOAL_FIVE_WITH_COOKING
    if len(examples) > 1:
        result["all_extras"] = with_extras(examples)
    return result


def source() -> str:
    """The commit measured, and the files under runtime/ and models/router/ that differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "runtime", "models/router", "bench/routing",
                                        "bench/routing_eval.py").splitlines()
               if not line.endswith(".md")]  # the READMEs it writes
    if not changed:
        return f"commit {head}"
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"commit {head} with uncommitted changes to {shown}"


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def block(result: dict) -> str:
    """The README section for one set: what was measured, a table, and the confusion matrix with every extra."""
    five, open_set = result["five"], result["open_set"]
    lines = [f"`bench/routing_eval.py --set {result['set']}`: {_rel(result['queries'])}, router "
             f"{_rel(result['router'])}, {result['source']}, {result['date']}. Top-1 through `Router.route` "
             "(strategy single, no keywords); an extra expert is installed with only its 20 examples, no "
             "retraining.", "",
             "| experts installed | queries | top-1 | macro-F1 | ECE | head alone | extra's share | five keep |",
             "|---|---|---|---|---|---|---|---|",
             f"| the five | {five['n']} | {five['accuracy']:.3f} | {five['macro_f1']:.3f} | {five['ece']:.3f} | "
             f"{five['head_only_accuracy']:.3f} | | |"]
    runs = [(f"five + {n}", o, [n]) for n, o in open_set.items()]
    if "all_extras" in result:
        runs.append(("five + " + " + ".join(open_set), result["all_extras"], list(open_set)))
    for label, o, names in runs:
        shares = ", ".join(f"{n} {o[f'{n}_share']:.3f}" for n in names)
        lines.append(f"| {label} | {o['n']} | {o['accuracy']:.3f} | {o['macro_f1']:.3f} | | | {shares} | "
                     f"{o['five_accuracy']:.3f} ({o['five_to_new']} claimed) |")
    g = result["goal"]

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    goal = (f"Goals: the five >= {GOAL_FIVE}: {five['accuracy']:.3f}, {met(g['five_met'])}")
    if "cooking" in open_set:
        goal += (f"; with cooking installed the five keep >= {GOAL_FIVE_WITH_COOKING} (issue 26): "
                 f"{open_set['cooking']['five_accuracy']:.3f}, {met(g['five_with_cooking_met'])}")
    goal += "; each extra >= {:.2f} with the five >= {:.2f} (issue 14): {}.".format(
        GOAL_OPEN, GOAL_FIVE, ", ".join(f"{n} {met(ok)}" for n, ok in g["open_set_met"].items()))
    lines += ["", goal]
    full = result.get("all_extras") or next(iter(open_set.values()))
    cm = full["confusion"]
    corner = "true \\ routed"
    first, width = len(corner) + 2, max(len(lab) for lab in cm["labels"]) + 2
    lines += ["", "```", corner.ljust(first) + "".join(lab.rjust(width) for lab in cm["labels"])]
    lines += [name.ljust(first) + "".join(str(v).rjust(width) for v in row) for name, row in cm["rows"].items()]
    lines.append("```")
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    five, open_set = result["five"], result["open_set"]
    extras = "; ".join(f"a sixth expert with 20 examples, {n}, takes {o[f'{n}_share']:.3f} of its queries while the "
                       f"five keep {o['five_accuracy']:.3f}" for n, o in open_set.items())
    return (f"On {five['n']} {result['set']} queries of the five domains (`bench/routing_eval.py --set "
            f"{result['set']}`, {result['source']}, {result['date']}): {five['accuracy']:.3f} top-1; {extras}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", type=Path, default=REPO / "models" / "router", help="router directory")
    parser.add_argument("--set", choices=sorted(SETS), default="heldout", help="which query set (default heldout)")
    parser.add_argument("--readme", type=Path, action="append", default=[],
                        help="fill this file's <!-- routing:SET --> table and <!-- routing:SET:summary --> line "
                             "(repeatable)")
    args = parser.parse_args(argv)
    src, date = source(), datetime.now(timezone.utc).strftime("%Y-%m-%d")
    result = evaluate(args.router, args.set)
    result.update(source=src, date=date)
    print(json.dumps(result, indent=2))
    from hublab.runtime.config import fill_file

    for readme in args.readme:
        name = f"routing:{args.set}"
        if not any([fill_file(readme, name, block(result)), fill_file(readme, f"{name}:summary",
                                                                          summary_line(result))]):
            raise SystemExit(f"{readme}: no <!-- {name} --> or <!-- {name}:summary --> section to fill; add the pair "
                             "of markers where the table or the summary line belongs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
