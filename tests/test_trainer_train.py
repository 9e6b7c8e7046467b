"""`hublab train` / `hublab infer` route each sub-command to its module; bad input is one line, exit 1."""
from __future__ import annotations

import pytest

from hublab.cli import main as hublab_main


@pytest.mark.parametrize("argv, message", [
    (["train", "moe-init", "--arch", "nope", "--data", "x.jsonl", "-o", "{tmp}/o"],
     "--arch 'nope': unknown; use one of mixtral-tiny"),
    (["train", "moe-lora", "--base", "{tmp}/none", "-o", "{tmp}/o", "--data", "{tmp}/x.jsonl"],
     "x.jsonl: file not found; fix the path"),
    (["train", "heads", "--model", "{tmp}/none", "--data", "{tmp}/x.jsonl", "--out", "{tmp}/o"],
     "x.jsonl: file not found; fix the path"),
    (["infer", "heads", "--ckpt", "{tmp}/none", "--prompt", "hi"],
     "no checkpoint (meta.json in s1/, s2/ or ppo_final/); train with hublab train heads"),
])
def test_subcommands_reach_their_module_and_fail_in_one_line(argv, message, tmp_path, capsys):
    rc = hublab_main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("hublab: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_help_lists_every_training_pipeline(capsys):
    with pytest.raises(SystemExit):
        hublab_main(["train", "--help"])
    out = capsys.readouterr().out
    for name in ("expert", "scratch", "router", "moe-init", "moe-lora", "heads"):
        assert f"    {name}" in out
