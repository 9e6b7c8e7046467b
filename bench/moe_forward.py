"""MoE training throughput: hublab's fast experts forward vs transformers' own, on the same model.

For each family a mid-size model (hidden 512, 2 layers, experts half the 1b width, the 1b sizes' expert counts and
top-k) is built once from random init; forward + backward of the causal-LM loss on the same batch runs with
each experts implementation in turn, repetitions interleaved so that load from other processes hits
every side alike. Time is this process's CPU time (time.process_time), not wall time: on a
machine shared with other jobs, wall time measured their load more than ours. With one thread it
is the compute time. Prints one JSON object: median tokens/s per implementation and the ratios of
`fast` to transformers' default (`grouped_mm`) and to its `eager` loop, all from this one run.

    .venv/bin/python bench/moe_forward.py                  # 1 CPU thread, all three families
    .venv/bin/python bench/moe_forward.py --threads 2 --reps 7 --tokens 1024 --arch mixtral
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

# mid sizes: small enough for a CPU minute, the 1b archs' routing (experts, top-k, shared experts)
MID = {
    "mixtral": ("mixtral-1b", dict(intermediate_size=1024)),
    "qwen2moe": ("qwen2moe-1b", dict(intermediate_size=1024, moe_intermediate_size=512,
                                     shared_expert_intermediate_size=1024)),
    "deepseekv3": ("deepseekv3-1b", dict(intermediate_size=1024, moe_intermediate_size=256, q_lora_rank=256,
                                         kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)),
}
COMMON = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, vocab_size=2048)


def build(family: str):
    import torch
    import transformers

    from hublab.trainer import moe

    arch, sizes = MID[family]
    kv = 8 if family == "deepseekv3" else 2
    cfg = moe.build_config(arch, **COMMON, num_key_value_heads=kv, **sizes)
    torch.manual_seed(0)
    model = getattr(transformers, moe.FAMILIES[family][1])(cfg)
    return model.train()


def use(model, impl: str) -> None:
    """`fast_loop` is `fast` with the per-slice matmul loop instead of torch._grouped_mm."""
    from hublab.trainer import moe

    moe.USE_TORCH_GROUPED_MM = impl != "fast_loop"
    moe.set_experts(model, "fast" if impl == "fast_loop" else impl)


def step(model, ids) -> None:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def bench(family: str, impls: list[str], tokens: int, reps: int) -> dict:
    import torch

    from hublab.trainer import moe

    model = build(family)
    seq = 128
    ids = torch.randint(0, model.config.vocab_size, (max(1, tokens // seq), seq),
                        generator=torch.Generator().manual_seed(0))
    n = ids.numel()
    times: dict[str, list[float]] = {i: [] for i in impls}
    for impl in impls:  # warm-up: first calls allocate and register
        use(model, impl)
        step(model, ids)
    for _ in range(reps):
        for impl in impls:
            use(model, impl)
            t = time.process_time()
            step(model, ids)
            times[impl].append(time.process_time() - t)
    tok_s = {i: round(n / statistics.median(t), 1) for i, t in times.items()}
    info = moe.describe(model.config)
    row = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "tokens": n,
           "experts": info["experts"], "top_k": info["top_k"], "shared_experts": info["shared_experts"],
           "tokens_per_s": tok_s}
    for ours in ("fast", "fast_loop"):
        for other in ("grouped_mm", "eager"):
            if ours in tok_s and other in tok_s:
                row[f"{ours}_vs_{other}"] = round(tok_s[ours] / tok_s[other], 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", action="append", choices=list(MID), help="family (repeatable; default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512, help="tokens per forward+backward")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--impl", default="fast,fast_loop,grouped_mm,eager",
                   help="experts implementations to compare (fast_loop: fast without torch._grouped_mm)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    t0 = time.perf_counter()
    results = {f: bench(f, impls, args.tokens, args.reps) for f in (args.arch or list(MID))}
    print(json.dumps({"device": "cpu", "threads": args.threads, "torch": torch.__version__,
                      "has_torch_grouped_mm": hasattr(torch, "_grouped_mm"), "results": results,
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
