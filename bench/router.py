"""Router latency on this machine: one query of exactly 32 tokens, scored again and again.

Measures two things per run, both single-threaded Python calling onnxruntime as the device does:
- `model`: tokenize + ONNX (encoder, head, softmax) -> probabilities;
- `route`: the whole routing decision: model scores mapped onto the configured experts, the similarity to
  the router's own labelled queries, keyword evidence, blend, and the strategy (`Router.route`);
- `route_examples`: the same with 20 more experts of 50 `[expert] examples` each (issue 14), embedded
  once beforehand (`examples_embed_s`, cached on disk afterwards) and compared with every query.
Prints one JSON object. Goals (issues 3 and 14): MiniLM int8 p50 <= 8 ms, p99 <= 20 ms, examples included.

    .venv/bin/python bench/router.py
    .venv/bin/python bench/router.py --router models/router --runs 500 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_P50_MS, GOAL_P99_MS = 8.0, 20.0

TEXT = ("How do I share a tokio runtime between several async tasks in Rust without cloning the whole "
        "configuration struct every time a new connection arrives on the listener socket and is accepted")


def query_of(router, tokens: int) -> str:
    """The longest prefix of TEXT (in words) within `tokens` tokens ([CLS], [SEP] included), padded to exactly that."""
    words = TEXT.split()
    text = next(t for t in (" ".join(words[:n]) for n in range(len(words), 0, -1))
                if len(router.tokenizer.encode(t).ids) <= tokens)
    while len(router.tokenizer.encode(text).ids) < tokens:
        text += " now"  # one token
    return text


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(p / 100 * (len(ms) - 1))))]

    return {"p50_ms": round(pct(50), 3), "p90_ms": round(pct(90), 3), "p99_ms": round(pct(99), 3),
            "mean_ms": round(sum(ms) / len(ms), 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3),
            "runs": len(ms)}


def time_calls(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def synthetic_experts(n_experts: int = 20, n_examples: int = 50) -> list:
    """n_experts experts of n_examples distinct example queries each, none of them a router output."""
    from hublab.runtime.routing.router import ExpertRoute

    topics = ["sourdough", "gardening", "chess", "guitar", "cycling", "knitting", "astronomy", "birds", "tax", "wine",
              "sailing", "pottery", "fishing", "camping", "coffee", "painting", "poetry", "running", "baking", "dogs"]
    asks = ["how do I start with", "common mistakes in", "best tools for", "a beginner's guide to", "why is my",
            "how much does it cost to get into", "tips to improve at", "history of", "what to read about", "safety in"]
    return [ExpertRoute(f"extra-{t}", examples=tuple(f"{a} {t} ({j})" for j in range(n_examples // len(asks))
                                                     for a in asks)[:n_examples])
            for t in topics[:n_experts]]


def bench_router(router_dir: Path, runs: int, warmup: int, threads: int, tokens: int) -> dict:
    import tempfile

    from hublab.runtime.config import EMBEDDED_MODELS_DIR, load_system, scan_models
    from hublab.runtime.routing.router import Router

    # A path that does not exist means all defaults; the embedded experts alone, whatever the user's
    # ~/.config says or installed, so runs on different machines measure the same thing.
    system = load_system(REPO / "bench" / "no-system.toml")
    experts = list(scan_models(EMBEDDED_MODELS_DIR).experts.values()) or None
    start = time.perf_counter()
    router = Router.load(router_dir, experts, keyword_weight=system.keyword_weight, fallback=system.fallback,
                         threads=threads)
    load_s = time.perf_counter() - start
    query = query_of(router, tokens)
    n_tokens = len(router.tokenizer.encode(query).ids)
    model = percentiles(time_calls(lambda: router.probabilities(query), runs, warmup))
    route = percentiles(time_calls(lambda: router.route(query, system.routing), runs, warmup))
    selection = router.route(query, system.routing)
    extra = synthetic_experts()
    home = os.environ.get("HUBLAB_HOME")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HUBLAB_HOME"] = cache  # a cold example cache, not the user's
        try:
            wide = Router.load(router_dir, [*(experts or []), *extra], keyword_weight=system.keyword_weight,
                               fallback=system.fallback, threads=threads)
            start = time.perf_counter()
            wide.example_index()
            embed_s = time.perf_counter() - start
            route_examples = percentiles(time_calls(lambda: wide.route(query, system.routing), runs, warmup))
        finally:
            if home is None:
                os.environ.pop("HUBLAB_HOME", None)
            else:
                os.environ["HUBLAB_HOME"] = home
    return {
        "router": str(router_dir), "quantization": router.info.quantization, "encoder": router.info.encoder,
        "model_bytes": (router_dir / "model.onnx").stat().st_size, "load_s": round(load_s, 3),
        "query_tokens": n_tokens, "query": query, "routing": system.routing, "selected": selection.names,
        "model": model, "route": route,
        "examples": {"experts": len(extra), "per_expert": len(extra[0].examples),
                     "router_examples": int(len(wide.example_index()[0]) - sum(len(e.examples) for e in extra)),
                     "examples_embed_s": round(embed_s, 2)},
        "route_examples": route_examples,
        "goal": {"p50_ms": GOAL_P50_MS, "p99_ms": GOAL_P99_MS,
                 "p50_met": max(route["p50_ms"], route_examples["p50_ms"]) <= GOAL_P50_MS,
                 "p99_met": max(route["p99_ms"], route_examples["p99_ms"]) <= GOAL_P99_MS},
    }


# --- synthesis -------------------------------------------------------------------------------------
# Per synthesis strategy: end-to-end time / a single-expert answer (issue 3). Owned by the synthesis
# work; fill in `bench_synthesis` and it is reported under "synthesis" beside the router numbers.

SYNTH_QUESTION = "How do I read a file line by line in Python and count its words?"


def bench_synthesis(args: argparse.Namespace) -> dict | None:
    """Each strategy over topk:2 on the embedded default experts (greedy, same max tokens), as a multiple
    of one expert answering alone. Costs are dominated by how many answers each strategy decodes."""
    if args.synthesis_tokens <= 0:
        return None
    from hublab.runtime.engine.runtime import Runtime
    from hublab.runtime.routing.ensemble import Ensemble, SYNTHESES

    rt = Runtime(profile="host", threads=args.llm_threads, keep_alive=-1)
    ensemble = Ensemble(rt)
    n = args.synthesis_tokens
    with rt:
        top = ensemble.route(SYNTH_QUESTION, "single").names[0]
        ensemble.context.generate(top, SYNTH_QUESTION, max_tokens=4, temperature=0.0)  # load and warm
        t0 = time.perf_counter()
        single = ensemble.context.generate(top, SYNTH_QUESTION, max_tokens=n, temperature=0.0)
        t_single = time.perf_counter() - t0
        out = {"question": SYNTH_QUESTION, "routing": "topk:2", "max_tokens": n, "single_expert": top,
               "single_s": round(t_single, 3), "single_tokens": single.tokens, "strategies": {}}
        for name in SYNTHESES:
            t0 = time.perf_counter()
            r = ensemble.ask(SYNTH_QUESTION, routing="topk:2", synthesis=name, max_tokens=n, temperature=0.0)
            elapsed = time.perf_counter() - t0
            tokens = sum(a.result.tokens for a in r.answers if a.result)
            out["strategies"][name] = {"seconds": round(elapsed, 3), "ratio_to_single": round(elapsed / t_single, 2),
                                       "tokens_decoded": tokens, "experts": [c["name"] for c in r.selected]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", type=Path, default=REPO / "models" / "router", help="router directory")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads; 0 = its default (all "
                                                               "cores)")
    parser.add_argument("--tokens", type=int, default=32, help="query length in tokens, [CLS] and [SEP] included")
    parser.add_argument("--synthesis-tokens", type=int, default=32,
                        help="max tokens per answer in the synthesis benchmark; 0 skips it")
    parser.add_argument("--llm-threads", type=int, default=1, help="llama.cpp threads for the synthesis benchmark")
    args = parser.parse_args(argv)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "threads": args.threads or "onnxruntime default",
              "router": bench_router(args.router, args.runs, args.warmup, args.threads, args.tokens),
              "synthesis": bench_synthesis(args)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
