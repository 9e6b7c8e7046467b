"""Routing + synthesis end to end on tiny real models: each strategy's exact semantics."""
import threading

import numpy as np
import pytest

from ggufs import write_model_toml
from hublab.runtime.config import EMBEDDED_MODELS_DIR, load_system
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError
from hublab.runtime.routing.ensemble import Ensemble, cosine_matrix, summarize_prompt, vote

ROUTER_DIR = EMBEDDED_MODELS_DIR / "router"


@pytest.fixture
def moe_dir(tmp_path, tiny_gguf, tiny_adapters):
    """Experts named like the default router's domains, on the tiny base."""
    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "tiny.toml", "tiny", gguf_path=tiny_gguf, context_size=1024)
    kw = {"python": '["python", "pip"]', "rust": '["rust", "cargo"]', "general": "[]"}
    adapters = {"python": tiny_adapters["alpha"], "rust": tiny_adapters["beta"], "general": None}
    for name, adapter in adapters.items():
        write_model_toml(models / "experts" / f"{name}.toml", name, base="tiny", adapter=adapter,
                         extra=f"keywords = {kw[name]}\n", max_tokens=10, repeat_penalty=1.0)
    return models


def make(models, routing="topk:2", synthesis="best", router=False, **system):
    lines = ["[runtime]", f'models_dir = "{models}"', 'profile = "host"', "threads = 1", "", "[moe]",
             f'routing = "{routing}"', f'synthesis = "{synthesis}"',
             f'router = "{ROUTER_DIR if router else models / "no-router"}"']
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in system.items()]
    path = models.parent / "system.toml"
    path.write_text("\n".join(lines) + "\n")
    rt = Runtime(system=load_system(path))
    return rt, Ensemble(rt)


def test_keyword_routing_without_router_and_fallback(moe_dir):
    rt, moe = make(moe_dir)
    with rt:
        sel = moe.route("how do I use cargo with rust")
        assert sel.names[0] == "rust"
        assert moe.router is None and "keywords only" in moe.router_note
        # no keyword: the router share goes to the fallback expert
        assert moe.route("tell me a story").names == ["general"]
        assert moe.route("tell me a story", "threshold:0.9").names == ["general"]


def test_best_picks_score_times_mean_token_probability(moe_dir):
    rt, moe = make(moe_dir, synthesis="best", routing="all")
    with rt:
        events = []
        result = moe.ask("python or rust with pip and cargo", on_event=lambda k, d: events.append(k))
        assert len(result.answers) == 3
        for a in result.answers:
            assert a.confidence == pytest.approx(a.score * a.result.mean_token_prob)
        best = max(result.answers, key=lambda a: a.confidence)
        assert result.chosen == best.expert and result.answer == best.text
        assert events[0] == "route" and events[-1] == "done" and events.count("expert_start") == 3
        assert set(result.timings) == {"route_s", "experts_s", "synthesis_s", "total_s"}
        d = result.to_dict()
        assert d["synthesis"] == "best" and len(d["selected"]) == 3 and d["answers"][0]["stats"]["tokens"] > 0


def test_weighted_single_expert_equals_that_expert(moe_dir):
    rt, moe = make(moe_dir, synthesis="weighted", routing="single")
    with rt:
        result = moe.ask("python pip question")
        assert result.selected[0]["name"] == "python"
        alone = rt.generate("python", "python pip question")
        assert result.answer == alone.text.strip()


def test_weighted_mixes_distributions_of_two_experts(moe_dir):
    rt, moe = make(moe_dir, synthesis="weighted", routing="topk:2")
    with rt:
        q = "python pip and rust cargo"
        result = moe.ask(q)
        weights = result.selection.weights()
        assert set(weights) == {"python", "rust"} and sum(weights.values()) == pytest.approx(1.0)
        mixed = "".join(rt.mixture_stream(weights, q)).strip()
        assert result.answer == mixed
        singles = {rt.generate(n, q).text.strip() for n in weights}
        assert mixed not in singles or len(singles) == 1
        assert "weights" in result.note


def test_weighted_refuses_experts_on_different_bases(moe_dir, tmp_path):
    from ggufs import write_tiny_llama

    other = write_tiny_llama(tmp_path / "other.gguf", seed=9)
    write_model_toml(moe_dir / "experts" / "solo.toml", "solo", gguf_path=other, expert=True,
                     extra='keywords = ["solo"]\n')
    rt, moe = make(moe_dir, synthesis="weighted", routing="topk:2")
    with rt:
        with pytest.raises(HublabError, match="one shared base"):
            moe.ask("python solo")


def test_concatenate_lists_every_answer_by_score(moe_dir):
    rt, moe = make(moe_dir, synthesis="concatenate", routing="all")
    with rt:
        result = moe.ask("rust cargo")
        headers = [line for line in result.answer.splitlines() if line.startswith("### ")]
        assert len(headers) == 3 and headers[0].startswith("### rust (score")
        scores = [float(h.split("score ")[1].rstrip(")")) for h in headers]
        assert scores == sorted(scores, reverse=True)
        for a in result.answers:
            assert a.text in result.answer


def test_summarize_prompts_the_aggregator_with_all_candidates(moe_dir):
    rt, moe = make(moe_dir, synthesis="summarize", routing="topk:2")
    with rt:
        q = "python pip and rust cargo"
        result = moe.ask(q)
        candidates = result.answers[:-1]
        assert [a.expert for a in candidates] == result.selection.names
        assert result.chosen == "general" and result.answers[-1].expert == "general (aggregator)"
        expected = rt.generate("general", summarize_prompt(q, candidates)).text.strip()
        assert result.answer == expected
        prompt = summarize_prompt(q, candidates)
        assert all(a.text.strip() in prompt for a in candidates) and q in prompt


def test_vote_math():
    sim = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    scores = [0.5, 0.3, 0.2]
    agreement = vote(scores, sim)
    assert agreement[0] == pytest.approx((0.3 * 0.9 + 0.2 * 0.1) / 0.5)
    assert agreement[2] == pytest.approx((0.5 * 0.1 + 0.3 * 0.2) / 0.8)
    assert max(range(3), key=lambda i: agreement[i]) in (0, 1)
    assert cosine_matrix(np.array([[1.0, 0.0], [2.0, 0.0]]))[0, 1] == pytest.approx(1.0)


@pytest.mark.skipif(not (ROUTER_DIR / "model.onnx").exists(), reason="default router not built")
def test_voting_uses_router_embeddings_and_router_scores(moe_dir):
    rt, moe = make(moe_dir, synthesis="voting", routing="all", router=True)
    with rt:
        result = moe.ask("How do I install a package with pip in python?")
        assert moe.router is not None
        assert result.selection.scores[0].expert == "python"
        texts = [a.text or " " for a in result.answers]
        sim = cosine_matrix(np.asarray(moe.router.embed(texts), dtype=np.float64))
        expected = vote([a.score for a in result.answers], sim)
        assert [a.agreement for a in result.answers] == pytest.approx(expected)
        assert result.chosen == result.answers[int(np.argmax(expected))].expert


def test_bad_settings_and_cancel(moe_dir):
    rt, moe = make(moe_dir)
    with rt:
        with pytest.raises(HublabError, match="routing"):
            moe.set(routing="top3")
        with pytest.raises(HublabError, match="synthesis"):
            moe.set(synthesis="average")
        moe.set(routing="all", synthesis="concatenate")
        cancel = threading.Event()
        cancel.set()
        result = moe.ask("python", cancel=cancel)
        assert result.finish_reason == "cancelled" and result.answers == []


def test_missing_fallback_is_a_clear_error(moe_dir):
    rt, moe = make(moe_dir, fallback="nobody")
    with rt:
        with pytest.raises(HublabError, match="fallback"):
            moe.route("anything")


def test_best_never_picks_a_degenerate_answer(moe_dir):
    """A loop is the most probable text a small model writes: confidence must not reward it."""
    from hublab.runtime.engine.runtime import GenerationResult
    from hublab.runtime.routing.ensemble import ExpertAnswer, EnsembleResult

    rt, moe = make(moe_dir)
    with rt:
        sel = moe.route("python and rust")
        loop = ExpertAnswer("python", 0.6, "the cat sat on the mat " * 4,
                            result=GenerationResult("python", "", mean_token_prob=0.99))
        good = ExpertAnswer("rust", 0.4, "Run cargo new to start a project.",
                            result=GenerationResult("rust", "", mean_token_prob=0.3))
        result = EnsembleResult("q", "", sel.routing, "best", sel, answers=[loop, good])
        moe._best(result, lambda kind, data: None, {})
        assert result.chosen == "rust" and result.answer == good.text
        assert loop.confidence == 0.0 and good.confidence == pytest.approx(0.4 * 0.3)
