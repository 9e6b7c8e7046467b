"""The demo README says how the adapters were trained from what each run recorded, never from typed text."""
from __future__ import annotations

from hublab.trainer.demo import readme

SETTINGS = {"lora_r": 8, "lora_alpha": 16, "lr": 5e-4, "batch_size": 8, "max_seq_len": 256, "epochs": 1.0,
            "minutes": 20.0, "threads": 2, "eval_fraction": 0.03}


def row(domain: str, steps: int, planned: int, settings: dict | None = SETTINGS) -> dict:
    r = {"domain": domain, "base_ppl": 40.0, "expert_ppl": 12.0, "reduction": 0.7, "steps": steps,
         "s_per_step": 11.0, "tokens_per_s": 46.0, "bytes": 3_000_000, "pack_pairs": 1000, "pack_bytes": 1_000_000,
         "planned_steps": planned}
    if settings:
        r["settings"] = settings
    return r


def test_training_text_comes_from_the_runs():
    text = readme([row("python", 159, 159), row("rust", 110, 157)], "(quality)")
    assert "LoRA adapter\n(r=8, alpha=16, all seven attention/MLP projections" in text
    assert "rust stopped at 110 of 157" in text and "python stopped" not in text
    assert "2 threads, 8 examples x up to 256 tokens per step, lr 0.0005" in text and "3% eval split" in text
    text = readme([row("python", 159, 159, settings={**SETTINGS, "lora_r": 16})], "(quality)")
    assert "r=16" in text and "every expert ran all its steps" in text


def test_runs_without_recorded_settings_say_so():
    text = readme([row("python", 159, 159, settings=None)], "(quality)")
    assert "did not record their settings" in text and "r=8" not in text and "LoRA adapter\n(all seven" in text
