"""Tiny real GGUF files for runtime tests, written with gguf-py (no torch needed).

`write_tiny_llama` writes a llama-architecture model with a small sentencepiece-style vocabulary and
seeded random weights: llama.cpp loads and runs it like any other model, quickly. `write_lora_adapter`
writes a LoRA adapter GGUF for any base by reading the base's tensor shapes, so it also works on the
real gemma base.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use your how said "
         "an each she which do their time if will way about many then them write would like so these her "
         "long make thing see him two has look more day could go come did number sound no most people my "
         "over know water than call first who may down side been now find python rust linux model").split()


def write_tiny_llama(path: Path, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
                     n_ff: int = 128, n_ctx: int = 1024, seed: int = 0, dtype=np.float32) -> Path:
    """A llama model of a few hundred KB that llama.cpp loads and generates with."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁"] + ["▁" + w for w in WORDS]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(WORDS) + 1)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(WORDS) + 1)  # unknown, control, control, byte, normal
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0 if dtype == np.float32 else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name, *shape, scale=0.2):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(dtype))

    head_dim = n_embd // n_head
    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    # Byte and control tokens get no output weight, so greedy text is made of the word tokens.
    out = (rng.standard_normal((n_vocab, n_embd)) * 0.5).astype(dtype)
    out[:259] = 0
    w.add_tensor("output.weight", out)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        t(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        t(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_lora_adapter(base: Path, path: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 1,
                       scale: float = 0.05, targets=LORA_TARGETS) -> Path:
    """A random LoRA adapter GGUF that matches `base`'s tensor shapes (llama.cpp's adapter layout)."""
    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(str(base))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for tensor in reader.tensors:
        name = tensor.name
        parts = name.split(".")
        if len(parts) != 4 or parts[2] not in targets or parts[3] != "weight":
            continue
        n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])  # ggml order: ne0 = input width
        # ggml ne of lora_a is (n_in, rank) and of lora_b (rank, n_out); numpy shapes are reversed.
        w.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
        w.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_model_toml(path: Path, name: str, *, gguf_path: Path | None = None, base: str = "",
                     adapter: Path | None = None, extra: str = "", expert: bool = False, **inference) -> Path:
    """A model/expert TOML in the seed's shape."""
    lines = ["[model]", f'name = "{name}"', f'type = "{"expert" if expert or base else "base"}"']
    if gguf_path:
        lines.append(f'path = "{gguf_path}"')
    inf = {"temperature": 0.0, "max_tokens": 16, **inference}
    lines += ["", "[inference]"] + [f"{k} = {v!r}".replace("'", '"') for k, v in inf.items()]
    if base or adapter or expert:
        lines += ["", "[expert]", f'domain = "{name}"']
        if base:
            lines.append(f'base = "{base}"')
        if adapter:
            lines.append(f'adapter = "{adapter}"')
    path.write_text("\n".join(lines) + "\n" + extra)
    return path
