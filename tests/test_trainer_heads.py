"""Multi-token heads on a frozen tiny Llama: targets, every loss term by hand, OFF decoding, the three
stages, resume, CLI and errors."""
from __future__ import annotations

import argparse
import json
import math

import pytest
from trainer_tiny import QA, tiny_data, tiny_hf, write_jsonl  # noqa: F401

torch = pytest.importorskip("torch")

from hublab.trainer import heads as MH  # noqa: E402
from hublab.trainer.data import DataError, IGNORE  # noqa: E402
from hublab.trainer.lora import TrainError  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------
# Targets

def test_round_robin_split_pads_with_off():
    assert MH.round_robin([10, 11, 12, 13, 14], 2, off=99) == [[10, 11], [12, 13], [14, 99]]
    assert MH.round_robin([10, 11, 12], 3, off=99) == [[10, 11, 12]]


def test_head_targets_are_round_robin_at_every_phase():
    ids = [1, 5, 6, 7, 8]
    labels = [IGNORE, IGNORE, 6, 7, 8]  # prompt "1 5", response "6 7 8"
    rows = MH.head_targets(ids, labels, 2, off=9)
    assert rows == [[IGNORE, IGNORE],  # inside the prompt: nothing to predict
                    [6, 7],  # last prompt token: the first block
                    [7, 8],
                    [8, 9],  # head 2 has nothing left: OFF
                    [9, 9]]  # after the last token: all OFF (stop)
    # anchors every H tokens from the first one are exactly the round-robin split
    assert [rows[1], rows[3]] == MH.round_robin([6, 7, 8], 2, off=9)


# ---------------------------------------------------------------------------------------------------
# Loss terms against numbers worked out by hand

LN3 = math.log(3.0)  # sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25


def test_router_bce():
    # target 1 at g = 0.5: ln 2; target 0 at g = 0.75: -ln 0.25 = ln 4; mean 1.5 ln 2
    loss = MH.router_bce(torch.tensor([[0.0, LN3]]), torch.tensor([[1, 0]]))
    assert float(loss) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # a mask leaves out the second gate
    loss = MH.router_bce(torch.tensor([[0.0, LN3]]), torch.tensor([[1, 0]]), torch.tensor([[1.0, 0.0]]))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


def test_balance_loss():
    # g = [[.75, .25], [.75, .75]]: active counts 2 and 1 -> f = [2/3, 1/3]; mean g = [.75, .5] -> P = [.6, .4]
    # 2 * (2/3 * .6 + 1/3 * .4) = 2 * 0.5333 = 1.0667
    loss = MH.balance_loss(torch.tensor([[LN3, -LN3], [LN3, LN3]]))
    assert float(loss) == pytest.approx(2 * (2 / 3 * 0.6 + 1 / 3 * 0.4), abs=1e-6)
    assert float(MH.balance_loss(torch.tensor([[LN3, LN3]]))) == pytest.approx(1.0)  # perfectly even


def test_gate_entropy():
    # H(0.5) = ln 2 = 0.69315; H(0.75) = .75 * .28768 + .25 * 1.38629 = 0.56233; mean 0.62774
    loss = MH.gate_entropy(torch.tensor([0.0, LN3]))
    assert float(loss) == pytest.approx(0.62774, abs=1e-5)


def test_budget_loss():
    # expected active heads 1.5 and 0.75 against a budget of 1: relu(0.5) and relu(-0.25); mean 0.25
    loss = MH.budget_loss(torch.tensor([[LN3, LN3], [0.0, -LN3]]), budget=1.0)
    assert float(loss) == pytest.approx(0.25, abs=1e-6)


def test_ppo_clipped_objective():
    # ratios 1.5, 0.5, 1.0 with advantages 1, -1, 2 and eps 0.2:
    # min(1.5, 1.2) = 1.2; min(-0.5, -0.8) = -0.8; min(2, 2) = 2 -> mean 0.8, loss -0.8
    new = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    loss = MH.ppo_loss(new, torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]), clip=0.2)
    assert float(loss) == pytest.approx(-0.8, abs=1e-6)


def test_reward_components():
    r, parts = MH.reward("The answer is  PARIS, of course", "paris", gen_ids=[1, 2, 3, 4], ref_ids=[2, 4, 5],
                         tokens=4, forwards=2, k_max=3, clean_stop=True)
    # accuracy 1 (substring, case ignored); order LCS([1,2,3,4], [2,4,5]) = 2 -> 2/3;
    # efficiency (4/2 - 1) / (3 - 1) = 0.5; clean stop 1
    assert parts == pytest.approx({"accuracy": 1.0, "order": 2 / 3, "efficiency": 0.5, "stop": 1.0})
    assert r == pytest.approx(1.0 + 0.5 * 2 / 3 + 0.2 * 0.5 + 0.2 * 1.0)
    r, parts = MH.reward("London", "paris", [7], [2, 4], 1, 1, 3, False, {"accuracy": 2.0})
    assert parts == {"accuracy": 0.0, "order": 0.0, "efficiency": 0.0, "stop": 0.0} and r == 0.0


# ---------------------------------------------------------------------------------------------------
# Decoding with OFF

@pytest.fixture(scope="module")
def hm(tiny_hf):  # noqa: F811
    from hublab.trainer.data import resolve_template

    model, tok, bdev, hdev = MH.load_backbone(str(tiny_hf))
    return MH._assemble(model, tok, bdev, hdev, str(tiny_hf), 3, 3, resolve_template(tok, "auto", "llama"), 16)


def _set(hm, gates: float, off: list[float], scramble: bool = False):
    with torch.no_grad():
        hm.heads.proj.zero_()
        hm.heads.bias.zero_()
        if scramble:  # heads 2.. ignore the hidden state and draft a fixed token the backbone rarely agrees with
            hm.heads.proj[1:] = -torch.eye(hm.heads.proj.shape[-1])
            hm.heads.bias[1:] = torch.randn(hm.heads.bias[1:].shape, generator=torch.Generator().manual_seed(0)) * 5
        hm.router.net[-1].weight.zero_()
        hm.router.net[-1].bias.fill_(gates)
        hm.heads.off_bias.copy_(torch.tensor(off))


def _prompt(hm):
    return MH.prompt_ids(hm, [{"role": "user", "content": "Tell me fact 3."}])


def test_closed_gates_reproduce_backbone_greedy(hm):
    # untrained heads start as the backbone's unembedding, so head 1 alone is ordinary greedy decoding
    _set(hm, -20.0, [-1e4, -1e4, -1e4])
    ids = _prompt(hm)
    gen, base = MH.decode(hm, ids, 12), MH.greedy(hm, ids, 12)
    assert gen.ids == base.ids and len(gen.ids) == 12
    assert gen.forwards == 12 and gen.tokens_per_forward == 1.0
    assert all(len(s.tokens) == 1 for s in gen.steps)


def test_open_gates_emit_k_tokens_per_forward(hm):
    _set(hm, 20.0, [-1e4, -1e4, -1e4])
    gen = MH.decode(hm, _prompt(hm), 12)
    assert [len(s.tokens) for s in gen.steps] == [3, 3, 3, 3]
    assert gen.forwards == 4 and gen.tokens_per_forward == 3.0 and gen.stop == "max_tokens"


def test_off_head_emits_nothing_and_blocks_the_heads_after_it(hm):
    # head 2 predicts OFF: it emits nothing, and head 3 (token t+3) has no place without t+2
    _set(hm, 20.0, [-1e4, 1e4, -1e4])
    gen = MH.decode(hm, _prompt(hm), 6)
    assert [len(s.tokens) for s in gen.steps] == [1] * 6
    assert all(s.token_actions[1] == hm.off for s in gen.steps[:-1])  # the last one stopped at max_tokens


@pytest.mark.parametrize("gates,scramble", [(20.0, False), (-20.0, False), (20.0, True)])
def test_verified_decoding_is_the_backbone_greedy_text(hm, gates, scramble):
    _set(hm, gates, [-1e4, -1e4, -1e4], scramble)
    ids = _prompt(hm)
    gen, base = MH.decode_verified(hm, ids, 12), MH.greedy(hm, ids, 12)
    assert gen.ids == base.ids and gen.forwards <= base.forwards
    if scramble:  # every draft rejected: one token per forward, and the cut drafts left no trace in the cache
        assert gen.forwards == base.forwards
    assert sum(len(s.tokens) for s in gen.steps) == len(gen.ids)


def test_all_off_stops(hm):
    _set(hm, 20.0, [1e4, 1e4, 1e4])
    gen = MH.decode(hm, _prompt(hm), 6)
    assert gen.ids == [] and gen.text == "" and gen.stop == "off" and len(gen.steps) == 1


def test_step_log_probability_counts_only_the_actions_taken(hm):
    # gates 0.5, 0.75, 0.25; head 1 sampled token 5, gate 2 opened and head 2 sampled 7, gate 3 closed
    _set(hm, 0.0, [-1e4, -1e4, -1e4])
    with torch.no_grad():
        hm.router.net[-1].bias.copy_(torch.tensor([0.0, LN3, -LN3]))
    x = MH.prompt_ids(hm, [{"role": "user", "content": "hi"}])
    x = hm.hidden(torch.tensor([x]))[0][0, -1:]
    with torch.no_grad():
        logp = MH._step_logp(hm, x, torch.tensor([[-1, 1, 0]]), torch.tensor([[5, 7, -1]]), 1.0)
        tok = torch.log_softmax(hm.heads(x[0]), -1)
    expected = tok[0, 5] + math.log(0.75) + tok[1, 7] + math.log(1 - 0.25)
    assert float(logp[0]) == pytest.approx(float(expected), abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Training: every stage, resume, CLI

SMALL = dict(heads=3, k_max=2, batch=8, lr=3e-3, router_hidden=16, max_seq_len=64, max_tokens=16,
             eval_fraction=0.2, threads=1)


@pytest.fixture(scope="module")
def trained(tiny_hf, tiny_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("heads") / "run"
    report = MH.train_heads(str(tiny_hf), tiny_data / "qa.jsonl", out, stage1_epochs=2, stage2_epochs=1,
                            ppo_steps=1, **SMALL)
    return out, report


def test_every_stage_runs_and_writes_checkpoints(trained):
    out, report = trained
    for name in ("s1", "s2", "ppo_final"):
        assert {p.name for p in (out / name).iterdir()} >= {"router.safetensors", "heads.safetensors", "meta.json"}
    meta = json.loads((out / "ppo_final" / "meta.json").read_text())
    assert meta["done"] == {"s1": 2, "s2": 1, "ppo": 1} and meta["off_id"] == meta["vocab"]
    stages = [h["stage"] for h in meta["history"]]
    assert stages == ["s1"] * 6 + ["s2"] * 3 + ["ppo"]  # 19 train examples, batch 8
    s1 = [h["ce"] for h in meta["history"] if h["stage"] == "s1"]
    assert s1[-1] < s1[0]
    s2 = [h for h in meta["history"] if h["stage"] == "s2"]
    assert {"router", "balance", "entropy", "budget"} <= set(s2[0])
    assert s2[-1]["tf"] == 0.0 and s2[-1]["k"] == 2.0  # annealed to no teacher forcing and k_max heads
    ev = report["eval"]
    assert ev["examples"] == 5 and ev["greedy"]["tokens_per_forward"] == 1.0
    assert ev["verified"]["accuracy"] == ev["greedy"]["accuracy"]
    assert ev["heads"]["tokens_per_forward"] >= 1.0
    assert 0.0 <= ev["heads"]["accuracy"] <= 1.0


def test_resume_continues_from_latest_checkpoint(trained, tiny_hf, tiny_data):  # noqa: F811
    out, _ = trained
    report = MH.train_heads(str(tiny_hf), tiny_data / "qa.jsonl", out, stage1_epochs=2, stage2_epochs=1,
                            ppo_steps=2, evaluate=False, **SMALL)
    meta = json.loads((out / "ppo_final" / "meta.json").read_text())
    assert report["done"] == {"s1": 2, "s2": 1, "ppo": 2}
    # stages 1 and 2 were not run again; PPO went on from step 1
    assert [h["stage"] for h in meta["history"]] == ["s1"] * 6 + ["s2"] * 3 + ["ppo", "ppo"]
    assert [h["step"] for h in meta["history"][-2:]] == [1, 2]


def test_resume_inside_a_stage(tiny_hf, tiny_data, tmp_path):  # noqa: F811
    args = dict(stage2_epochs=0, ppo_steps=0, evaluate=False, **SMALL)
    MH.train_heads(str(tiny_hf), tiny_data / "qa.jsonl", tmp_path, stage1_epochs=1, **args)
    before = (tmp_path / "s1" / "heads.safetensors").read_bytes()
    MH.train_heads(str(tiny_hf), tiny_data / "qa.jsonl", tmp_path, stage1_epochs=2, **args)
    meta = json.loads((tmp_path / "s1" / "meta.json").read_text())
    assert meta["done"]["s1"] == 2 and [h["step"] for h in meta["history"]] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "s1" / "heads.safetensors").read_bytes() != before
    with pytest.raises(TrainError, match="heads = 3 but this run asks for 2"):
        MH.train_heads(str(tiny_hf), tiny_data / "qa.jsonl", tmp_path, stage1_epochs=2,
                       **{**args, "heads": 2, "k_max": 2})


def test_cli_train_and_infer(trained, tiny_hf, tiny_data, capsys):  # noqa: F811
    out, _ = trained
    p = argparse.ArgumentParser()
    MH.add_infer_arguments(p)
    assert MH.infer_cli(p.parse_args(["--ckpt", str(out), "--prompt", QA[3]["question"], "--max-tokens", "8",
                                      "--json"])) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == sum(len(s["tokens"]) for s in res["steps"]) <= 8
    assert res["forwards"] >= 1 and all(len(s["gates"]) == 3 for s in res["steps"])
    t = argparse.ArgumentParser()
    MH.add_train_arguments(t)
    args = t.parse_args(["--model", str(tiny_hf), "--data", str(tiny_data / "qa.jsonl"), "--out", str(out),
                         "--heads", "3", "--k-max", "2", "--stage1-epochs", "2", "--stage2-epochs", "1",
                         "--ppo-steps", "2", "--router-hidden", "16", "--eval-fraction", "0.2", "--max-tokens", "4"])
    assert MH.train_cli(args) == 0  # everything done already: loads, evaluates, reports
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"].endswith("ppo_final")
    assert set(report["eval"]) == {"examples", "heads", "verified", "greedy"}


def test_bad_data_names_file_and_line(tiny_hf, tmp_path):  # noqa: F811
    bad = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "response": "b"}, {"question": "c?"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing column 'response'"):
        MH.train_heads(str(tiny_hf), bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_quantized_backbone_needs_cuda(tiny_hf, tiny_data, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TrainError, match="--quant 8bit needs a CUDA GPU"):
        MH.train_heads(str(tiny_hf), tiny_data / "qa.jsonl", tmp_path / "run", quant="8bit")
