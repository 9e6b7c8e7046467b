"""`hublab bench ab`: the same questions to a base and to an expert on it, side by side.

Per answer: whether it mentions a target term (whole words, case-insensitive), how many times, and
tokens/s. Target terms come from the question file (`"terms": [...]` per line) or, failing that, from
the expert's keywords. Writes results/summary.json plus one JSONL of answers per side.

    hublab bench ab --questions questions.jsonl --expert python
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from hublab.runtime.errors import HublabError


def load_questions(path: Path) -> list[dict]:
    """Questions, with optional target terms: {"question"|"prompt"|"text", "terms"?} per JSONL line, one
    plain-text question per line, or a training dataset in any format `hublab train` reads (JSON array or
    JSONL; alpaca, sharegpt, question/response): each record's first user turn is the question."""
    from . import data as D

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HublabError(f"{path}: file not found; give a JSONL of questions") from None
    if text.lstrip().startswith("["):  # a JSON array file: a dataset
        return [_question(rec, f"{path}:{number}", D) for number, rec in D.read_records(path)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HublabError(f"{path}:{number}: invalid JSON ({exc.msg}); write one object per line") from None
            rows.append(_question(rec, f"{path}:{number}", D))
        else:
            rows.append({"question": line.strip(), "terms": []})
    if not rows:
        raise HublabError(f"{path}: no questions; write one per line")
    return rows


def _question(rec, where: str, D) -> dict:
    """{"question", "terms"} of one record: a question line, or a dataset record's first user turn."""
    if not isinstance(rec, dict):
        raise HublabError(f"{where}: expected a JSON object; write one {{\"question\": ...}} per line")
    terms = rec.get("terms", [])
    if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
        raise HublabError(f"{where}: 'terms' must be a list of strings")
    q = rec.get("question") or rec.get("prompt")
    if not isinstance(q, str) and D.detect_format(rec) in ("alpaca", "sharegpt"):
        ex = D.to_example(rec, D.detect_format(rec), where)
        q = next((m["content"] for m in ex.messages if m["role"] == "user"), None)
    if not isinstance(q, str):
        q = rec.get("text")
    if not isinstance(q, str) or not q.strip():
        raise HublabError(f"{where}: missing column 'question'; add it (or prompt/text), or give a dataset "
                          "record (instruction/output, conversations, question/response)")
    return {"question": q.strip(), "terms": terms}


def mentions(text: str, terms: list[str]) -> int:
    return sum(len(re.findall(rf"(?<!\w){re.escape(t)}(?!\w)", text, re.IGNORECASE)) for t in terms)


def ab(questions: Path, expert: str, base: str | None = None, models_dir: Path | None = None,
       out: Path = Path("results"), max_tokens: int = 128, seed: int = 0, runtime=None) -> dict:
    """Run the A/B benchmark; returns the summary (also written to out/summary.json)."""
    from hublab.runtime.engine.runtime import Runtime
    from hublab.runtime.routing.context import ExpertContext

    rt = runtime or Runtime(models_dir=models_dir)
    context = ExpertContext(rt)  # the expert answers with its knowledge, as on a device
    cfg = rt.config(expert)
    base = base or cfg.base
    if not base:
        raise HublabError(f"expert {expert!r} has no base; pass --base NAME to compare against")
    rows = load_questions(questions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"expert": expert, "base": base, "questions": len(rows), "max_tokens": max_tokens}
    for side, name in (("base", base), ("expert", expert)):
        hits, total_mentions, tokens, seconds = 0, 0, 0, 0.0
        with (out / f"answers_{side}.jsonl").open("w", encoding="utf-8") as log:
            for row in rows:
                terms = row["terms"] or list(cfg.keywords)
                res = context.generate(name, row["question"], max_tokens=max_tokens, temperature=0.0, seed=seed)
                m = mentions(res.text, terms)
                hits += m > 0
                total_mentions += m
                tokens += res.tokens
                seconds += res.seconds
                log.write(json.dumps({"question": row["question"], "answer": res.text, "terms": terms,
                                      "mentions": m, "tokens": res.tokens,
                                      "tokens_per_s": round(res.tokens_per_s, 2)}) + "\n")
        summary[side] = {"model": name, "hit_rate": round(hits / len(rows), 4),
                         "mentions_per_answer": round(total_mentions / len(rows), 3),
                         "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0}
    summary["hit_rate_gain"] = round(summary["expert"]["hit_rate"] - summary["base"]["hit_rate"], 4)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = sub.add_parser("ab", help="base vs expert on the same questions")
    a.add_argument("--questions", type=Path, required=True, help='JSONL of {"question", "terms"} or text lines')
    a.add_argument("--expert", required=True)
    a.add_argument("--base", help="model to compare against (default: the expert's base)")
    a.add_argument("--models-dir", type=Path)
    a.add_argument("--out", type=Path, default=Path("results"))
    a.add_argument("--max-tokens", type=int, default=128)
    a.add_argument("--seed", type=int, default=0)


def cli(args: argparse.Namespace) -> int:
    summary = ab(args.questions, args.expert, args.base, args.models_dir, args.out, args.max_tokens, args.seed)
    print(json.dumps(summary))
    return 0
