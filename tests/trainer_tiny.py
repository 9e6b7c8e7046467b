"""Tiny real trainer artifacts: a sentencepiece tokenizer trained on a few lines and a 2-layer Llama
built from config (random init). Shared by the tests/test_trainer_*.py files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

LINES = [
    "Python lists grow with append and shrink with pop.",
    "A dictionary maps keys to values in Python.",
    "Rust moves values unless they implement Copy.",
    "The borrow checker keeps Rust references valid.",
    "The ls command lists the files in a directory.",
    "A LoRA adapter adds a low-rank update to a weight matrix.",
    "The quick brown fox jumps over the lazy dog.",
    "Raspberry Pi boards run Linux on ARM processors.",
]
QA = [{"question": f"Tell me fact {i}.", "response": LINES[i % len(LINES)]} for i in range(24)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """HF dir of a tiny Llama (hidden 64, 2 layers) with a sentencepiece tokenizer.model beside it."""
    from hublab.trainer.scratch import init_model, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_hf")
    tok = train_tokenizer(LINES * 20 + [q["question"] for q in QA], root / "tok", vocab_size=400)
    return init_model("tiny", tok, root / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(d / "qa.jsonl", QA)
    write_jsonl(d / "text.jsonl", [{"text": line} for line in LINES * 3])
    return d


@pytest.fixture(scope="session")
def tiny_trained(tiny_hf, tiny_data, tmp_path_factory):
    """A LoRA run on the tiny model: (TrainResult, config path)."""
    from hublab.trainer.train import expert

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = out / "expert.toml"
    cfg.write_text(f'[train]\nbase = "{tiny_hf}"\noutput = "run"\nmax_steps = 12\nbatch_size = 4\n'
                   f'max_seq_len = 64\nlr = 0.05\nwarmup_steps = 2\neval_every = 4\nsave_every = 4\n'
                   f'eval_fraction = 0.2\npatience = 0\n[lora]\nr = 8\nalpha = 16\n'
                   f'[[data]]\npath = "{tiny_data / "qa.jsonl"}"\n')
    return expert(cfg), cfg
