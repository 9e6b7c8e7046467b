"""Llama-style models from random init, with a sentencepiece tokenizer trained on the data when none is given.

The result is an ordinary HF model directory (config.json, model.safetensors, tokenizer.model,
tokenizer.json) that `export gguf` converts and `export quantize` shrinks.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from hublab.runtime.errors import HublabError

# The hublabio family: llama layout (RMSNorm, SwiGLU, RoPE, grouped-query attention).
ARCHS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, max_position_embeddings=512, vocab_size=512),
    "hublabio-0.5b": dict(hidden_size=1280, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4,
                          intermediate_size=3456, max_position_embeddings=4096, vocab_size=32000),
    "hublabio-1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=5632, max_position_embeddings=4096, vocab_size=32000),
    "hublabio-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                        intermediate_size=8192, max_position_embeddings=8192, vocab_size=32000),
    "hublabio-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=11008, max_position_embeddings=8192, vocab_size=32000),
}


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 32000) -> Path:
    """Train a byte-fallback BPE sentencepiece model on texts; write tokenizer.model + HF files to out_dir."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise HublabError("no text to train a tokenizer on; give data with text or pass --tokenizer DIR")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # byte_fallback needs 256 byte pieces plus the specials; hard_vocab_limit=False lets small corpora
    # end with fewer pieces than asked instead of failing.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=max(vocab_size, 300), model_type="bpe",
        character_coverage=1.0, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        hard_vocab_limit=False, minloglevel=2, max_sentence_length=1 << 16)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def init_model(arch: str, tokenizer_dir: Path, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised Llama model of `arch`, sized to the tokenizer, saved with it in out_dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHS:
        raise HublabError(f"--arch {arch!r}: unknown; use one of {', '.join(ARCHS)}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = {**ARCHS[arch], **overrides, "vocab_size": len(tok)}
    cfg = LlamaConfig(**spec, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=arch == "tiny", rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    return save_with_tokenizer(LlamaForCausalLM(cfg), tok, tokenizer_dir, out_dir)


def save_with_tokenizer(model, tok, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Model and tokenizer saved in out_dir, with the sentencepiece tokenizer.model the GGUF converter
    reads (save_pretrained of a fast tokenizer does not write it)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    src = Path(tokenizer_dir) / "tokenizer.model"
    if src.exists() and src.resolve() != (out_dir / "tokenizer.model").resolve():
        (out_dir / "tokenizer.model").write_bytes(src.read_bytes())
    return out_dir
