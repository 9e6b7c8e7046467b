"""Open-set routing: experts routed by their [expert] examples, no retraining; the examples' checks, the
embedding cache, and a sixth expert installed from a signed package, routed to, and removed again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hublab.runtime.config import EMBEDDED_MODELS_DIR, ConfigError, load_model, scan_models
from hublab.runtime.routing.context import ExpertContext
from hublab.runtime.routing.router import ExpertRoute, Router

from test_pkg_support import base_package, ws  # noqa: F401

DEFAULT_ROUTER = EMBEDDED_MODELS_DIR / "router"
COOKING = Path(__file__).resolve().parents[1] / "bench" / "routing" / "cooking_examples.txt"
FIVE = ("ai", "general", "python", "rust", "system")
COOKING_QUERIES = ["how do I caramelize onions without burning them", "best flour for pizza dough",
                   "my bread came out dense, what went wrong", "how long do hard boiled eggs keep"]
FIVE_QUERIES = {"python": "pandas dataframe drop rows with NaN", "rust": "cargo build says unresolved import",
                "system": "journalctl shows my service restarting every 5 seconds",
                "ai": "how many epochs should a lora fine tune run", "general": "tell me about the french revolution"}

needs_default = pytest.mark.skipif(not (DEFAULT_ROUTER / "model.onnx").is_file(), reason="no default router built")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "cache" / "examples"


def cooking_examples() -> tuple[str, ...]:
    return tuple(line.strip() for line in COOKING.read_text().splitlines() if line.strip())


def expert_toml(path: Path, name: str, expert: str = "") -> Path:
    """An expert TOML: a standalone GGUF expert, or an adapter-less expert on a base when `expert` names one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = "" if "base = " in expert else f'path = "{name}.gguf"\n'
    path.write_text(f'[model]\nname = "{name}"\n{model}\n[expert]\n{expert}')
    return path


# ---------------------------------------------------------------------------------------------------
# [expert] examples and examples_file

def test_examples_inline_then_file_in_order(tmp_path):
    (tmp_path / "ex.txt").write_text("# cooking questions\nhow to make risotto\n\n  why is my custard   lumpy \n")
    cfg = load_model(expert_toml(tmp_path / "c.toml", "cooking",
                                 'examples = ["easy pancake batter"]\nexamples_file = "ex.txt"\n'))
    assert cfg.examples == ("easy pancake batter", "how to make risotto", "why is my custard lumpy")
    assert load_model(expert_toml(tmp_path / "p.toml", "python")).examples == ()


@pytest.mark.parametrize("expert,file,message", [
    ('examples = ["a", " "]\n', None, r"c.toml:\d+: \[expert\] examples: item 2 must be a non-empty string"),
    ('examples = ["a", 3]\n', None, r"item 2 must be a non-empty string"),
    ('examples = ["How to make risotto", "how to  make RISOTTO"]\n', None,
     r"item 2: example 'how to  make RISOTTO' repeats .*item 1; keep it once"),
    ('examples = ["how to make risotto"]\nexamples_file = "ex.txt"\n', b"pie crust\nhow to make risotto\n",
     r"ex.txt:2: example 'how to make risotto' repeats .*item 1; keep it once"),
    ('examples_file = "missing.txt"\n', None, r"\[expert\] examples_file: .*missing.txt not found; create it"),
    ('examples_file = "ex.txt"\n', b"caf\xe9 au lait\n", r"ex.txt is not UTF-8 text; save it as UTF-8"),
    ('examples_file = "../outside.txt"\n', None, r"leaves the expert's directory; put the file beside the TOML"),
    ('examples_file = "/etc/hostname"\n', None, r"leaves the expert's directory"),
    ('examples = "risotto"\n', None, r"\[expert\] examples: expected a list"),
])
def test_bad_examples_are_one_line_errors(tmp_path, expert, file, message):
    if file is not None:
        (tmp_path / "ex.txt").write_bytes(file)
    with pytest.raises(ConfigError, match=message) as info:
        load_model(expert_toml(tmp_path / "c.toml", "cooking", expert))
    assert "\n" not in str(info.value)
    # In a models dir the broken TOML is reported and the others still load.
    expert_toml(tmp_path / "p.toml", "python")
    catalog = scan_models(tmp_path)
    assert list(catalog.experts) == ["python"] and len(catalog.errors) == 1


# ---------------------------------------------------------------------------------------------------
# Scoring with examples (the committed router)

def open_router(**kw) -> Router:
    experts = [ExpertRoute(name) for name in FIVE] + [ExpertRoute("cooking", examples=cooking_examples())]
    return Router.load(DEFAULT_ROUTER, experts, **kw)


@needs_default
def test_an_expert_with_examples_is_routed_without_retraining():
    r = open_router()
    assert r.warnings == []  # no router output, but examples: nothing to warn about
    for q in COOKING_QUERIES:
        assert r.route(q, "single").names == ["cooking"], q
    for domain, q in FIVE_QUERIES.items():
        assert r.route(q, "single").names == [domain], q


@needs_default
def test_every_part_of_the_score_is_shown_and_adds_up():
    r = open_router()
    sel = r.route("how do I caramelize onions without burning them", "topk:2")
    parts = {s.expert: s for s in sel.scores}
    cooking = parts["cooking"]
    assert cooking.head_score == 0.0 and cooking.example_score > 0.5 and cooking.model_score == cooking.example_score
    known = [parts[n] for n in FIVE]
    # The five have the router's own labelled queries as examples: a similarity and a softmax share each.
    assert all(s.similarity is not None for s in known)
    assert sum(s.example_score for s in known) == pytest.approx(1.0, abs=1e-6)
    assert sum(s.head_score for s in known) == pytest.approx(1.0, abs=1e-4)
    left, w = 1.0 - cooking.example_score, r.info.example_weight
    for s in known:  # model = what the new expert leaves x (head blended with the known experts' examples)
        assert s.model_score == pytest.approx(left * ((1 - w) * s.head_score + w * s.example_score), abs=1e-6)
    assert sum(s.score for s in sel.scores) == pytest.approx(1.0, abs=1e-4)
    d = sel.to_dict()["scores"][0]
    assert {"head_score", "example_score", "similarity", "keyword_score", "model_score"} <= set(d)
    json.dumps(sel.to_dict())


@needs_default
def test_a_new_expert_claims_by_nearest_examples_and_their_mean_direction():
    r = open_router()
    assert 0 < r.info.example_centroid < 1  # calibrated by the trainer; 0 would be the nearest examples alone
    q = "how long should I knead bread dough"
    ex = r.embed(list(cooking_examples()))
    v = r.embed([q])[0]
    cos = np.sort(ex @ v)[::-1]
    mean = ex.mean(axis=0)
    near = cos[:r.info.example_k].mean()
    expected = (1 - r.info.example_centroid) * near + r.info.example_centroid * v @ mean / np.linalg.norm(mean)
    parts = {s.expert: s for s in r.score(q)}
    assert parts["cooking"].similarity == pytest.approx(float(expected), abs=1e-5)
    # The known experts' softmax uses their nearest examples alone: their shown similarity is that mean.
    near_known, claim = r.similarities(v)
    assert parts["general"].similarity == pytest.approx(near_known["general"], abs=1e-6)
    assert claim["general"] != near_known["general"] and claim["cooking"] == pytest.approx(expected, abs=1e-5)


@needs_default
def test_a_query_close_to_no_example_is_the_heads_and_the_fallback_keeps_its_meaning():
    r = open_router()
    # Not a cooking question: the examples claim almost nothing and the head decides as before.
    plain = Router.load(DEFAULT_ROUTER, [ExpertRoute(n) for n in FIVE])
    q = "what year did the first moon landing happen"
    with_examples = {s.expert: s for s in r.score(q)}
    assert with_examples["cooking"].example_score < 0.1
    assert r.route(q, "single").names == plain.route(q, "single").names == ["general"]
    # threshold routing: nothing reaches 1.0, so the fallback answers, with or without examples.
    sel = r.route("how do I caramelize onions", "threshold:1.0")
    assert sel.fallback and sel.names == ["general"]


@needs_default
def test_examples_are_embedded_lazily_and_cached_by_encoder_and_examples(cache_home, monkeypatch):
    r = open_router()
    assert not cache_home.exists()  # loading (shell start) embeds nothing
    first = r.route(COOKING_QUERIES[0], "single")
    files = list(cache_home.glob("*.npz"))
    assert len(files) == 1
    # A second router reads the cache: embedding would fail here.
    again = open_router()
    with monkeypatch.context() as m:
        m.setattr(Router, "embed", lambda self, texts: (_ for _ in ()).throw(AssertionError("re-embedded")))
        assert again.route(COOKING_QUERIES[0], "single").scores == first.scores
    # A cache written for another encoder (same file name, other hash inside) is rebuilt, not used.
    with np.load(files[0]) as data:
        vectors, texts = data["vectors"], data["texts"]
    np.savez(files[0], vectors=np.zeros_like(vectors), encoder=np.array("0" * 64), texts=texts)
    rebuilt = open_router()
    assert rebuilt.route(COOKING_QUERIES[0], "single").scores == first.scores
    with np.load(files[0]) as data:
        assert str(data["encoder"]) == rebuilt.encoder_id and np.abs(data["vectors"]).sum() > 0
    # A torn file is rebuilt too.
    files[0].write_bytes(b"PK\x03\x04 torn")
    assert open_router().route(COOKING_QUERIES[0], "single").scores == first.scores
    # Other examples: another cache file.
    other = [ExpertRoute(n) for n in FIVE] + [ExpertRoute("cooking", examples=cooking_examples()[:10])]
    Router.load(DEFAULT_ROUTER, other).route(COOKING_QUERIES[0], "single")
    assert len(list(cache_home.glob("*.npz"))) == 2


# ---------------------------------------------------------------------------------------------------
# A sixth expert from a signed package in a directory registry

@needs_default
def test_install_a_sixth_expert_from_a_signed_package_then_remove_it(ws, tmp_path):  # noqa: F811
    from hublab.runtime import pkg
    from hublab.runtime.engine.runtime import Runtime

    ws.config.write_text(ws.config.read_text() + f'\n[moe]\nrouter = "{DEFAULT_ROUTER}"\n')
    for name in FIVE:  # the five experts the router was trained for, as adapters-to-be on one base
        expert_toml(ws.models / "experts" / f"{name}.toml", name, 'base = "tiny"\n')
    src = base_package(tmp_path / "src" / "tiny", quants=("q8_0",))
    pkg.build(src, key=ws.key)
    pkg.publish(src, str(ws.registry))
    cooking = tmp_path / "src" / "cooking"
    expert_toml(cooking / "cooking.toml", "cooking", 'base = "tiny"\nexamples_file = "examples.txt"\n')
    (cooking / "examples.txt").write_text(COOKING.read_text())
    (cooking / "package.toml").write_text('[package]\nname = "cooking-expert"\nversion = "1.0"\n'
                                          'category = "expert"\ndescription = "answers kitchen questions"\n')
    built = pkg.build(cooking, key=ws.key)
    manifest = (cooking / "package.toml").read_text()
    assert 'path = "examples.txt"' in manifest and built.signed_by == ws.public_key and built.experts == ["cooking"]
    pkg.publish(cooking, str(ws.registry))

    def routed(queries) -> list[str]:
        with Runtime(profile="host", threads=1) as rt:
            assert not rt.catalog.errors, rt.catalog.errors
            return [ExpertContext(rt).router.route(q, "single").names[0] for q in queries]

    pkg.install("tiny", str(ws.registry), profile="host")
    assert "cooking" not in routed(COOKING_QUERIES)
    assert pkg.install("cooking-expert", str(ws.registry), profile="host").signed_by == ws.public_key
    assert routed(COOKING_QUERIES) == ["cooking"] * len(COOKING_QUERIES)
    assert routed(FIVE_QUERIES.values()) == list(FIVE_QUERIES)
    # The examples file is one of the signed files: editing it on the device is caught by verify.
    installed = next(ws.models.rglob("examples.txt"))
    installed.write_text(installed.read_text() + "how to cook a steak\n")
    assert not pkg.verify(["cooking-expert"]).ok
    pkg.remove("cooking-expert")
    assert "cooking" not in routed(COOKING_QUERIES)
    assert routed(FIVE_QUERIES.values()) == list(FIVE_QUERIES)


def test_pkg_build_refuses_an_expert_whose_examples_file_is_not_in_the_package(ws, tmp_path):  # noqa: F811
    from hublab.runtime import pkg
    from hublab.runtime.errors import HublabError

    src = tmp_path / "src" / "cooking"
    expert_toml(src / "cooking.toml", "cooking", 'examples_file = "examples.txt"\n')
    (src / "cooking.gguf").write_bytes(b"GGUF")
    (src / "package.toml").write_text('[package]\nname = "cooking-expert"\nversion = "1.0"\ncategory = "expert"\n')
    with pytest.raises(HublabError, match=r"cooking.toml: \[expert\] examples_file 'examples.txt' is not in the "
                                          r"package"):
        pkg.build(src, key=ws.key)
    (src / "examples.txt").write_text("how to make risotto\n")
    assert pkg.build(src, key=ws.key).files == 3


@needs_default
def test_the_shipped_router_meets_the_open_set_goals_on_the_dev_queries():
    """bench/routing_eval.py's numbers on dev2 (the held-out set these goals were reached on, issue 14) as a guard:
    a retrained or recalibrated router that loses them fails. The held-out set is measured, never asserted on."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("routing_eval", Path(__file__).resolve().parents[1] / "bench"
                                                  / "routing_eval.py")
    routing_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(routing_eval)
    result = routing_eval.evaluate(DEFAULT_ROUTER, "dev2")
    assert result["five"]["accuracy"] >= routing_eval.GOAL_FIVE and result["five"]["n"] >= 250
    assert set(result["open_set"]) == {"cooking", "legal"}
    for name, run in result["open_set"].items():
        assert run["examples"] == {name: 20}
        assert run[f"{name}_share"] >= routing_eval.GOAL_OPEN and run["five_accuracy"] >= routing_eval.GOAL_FIVE, name
    assert result["goal"]["five_met"] and all(result["goal"]["open_set_met"].values())
