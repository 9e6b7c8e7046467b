"""Knowledge packs: pairs retrieved with the router encoder and put before the question, cached by hash."""
from __future__ import annotations

import json

import numpy as np
import pytest
from encoders import write_encoder_router
from ggufs import write_model_toml

from hublab.runtime.routing import knowledge as K
from hublab.runtime.routing.context import ExpertContext
from hublab.runtime.routing.embcache import cache_root
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError

PAIRS = [{"question": "python model", "response": "the python answer"},
         {"question": "rust linux", "response": "the rust answer"},
         {"question": "water day", "response": "the water answer"}]


def write_pack(path, rows=PAIRS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def models(tmp_path, tiny_gguf, tiny_adapters, monkeypatch):
    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    models = tmp_path / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "tiny.toml", "tiny", gguf_path=tiny_gguf, context_size=256)
    write_pack(models / "experts" / "alpha-knowledge.jsonl")
    write_model_toml(models / "experts" / "alpha.toml", "alpha", base="tiny", adapter=tiny_adapters["alpha"],
                     extra='knowledge = "alpha-knowledge.jsonl"\nknowledge_shots = 2\nknowledge_min = 0.3\n')
    write_model_toml(models / "experts" / "general.toml", "general", base="tiny")
    write_encoder_router(models / "router", ["alpha", "general"])
    return models


def test_closest_pairs_go_before_the_question_as_earlier_turns(models):
    with Runtime(models_dir=models, profile="host", threads=1, keep_alive=-1) as rt:
        ctx = ExpertContext(rt)
        chat, n, _, _ = ctx.lookup(rt.config("alpha"), "python model")
        assert n >= 1 and chat[-1] == {"role": "user", "content": "python model"}
        # the closest pair sits right before the question
        assert chat[-3:-1] == [{"role": "user", "content": "python model"},
                               {"role": "assistant", "content": "the python answer"}]
        # a system message stays first
        chat, _, _, _ = ctx.lookup(rt.config("alpha"), [{"role": "system", "content": "S"},
                                                {"role": "user", "content": "rust linux"}])
        assert chat[0]["role"] == "system" and chat[-2]["content"] == "the rust answer"
        # an expert without a pack, or shots = 0, is untouched
        assert ctx.lookup(rt.config("general"), "python model")[:2] == ("python model", 0)
        rt.config("alpha").knowledge_shots = 0
        assert ctx.lookup(rt.config("alpha"), "python model")[:2] == ("python model", 0)


def test_knowledge_takes_at_most_half_the_context(models):
    # the tiny base runs at 256 tokens: a 2,000-character answer (the closest pair) would leave no room
    long = {"question": "python model", "response": "a very long python answer " * 80}
    write_pack(models / "experts" / "alpha-knowledge.jsonl", [long] + PAIRS[1:] + [PAIRS[0]])
    with Runtime(models_dir=models, profile="host", threads=1, keep_alive=-1) as rt:
        assert rt.context_size(rt.config("alpha")) == 256
        chat, n, _, _ = ExpertContext(rt).lookup(rt.config("alpha"), "python model")
        shown = "".join(m["content"] for m in chat[:-1])
        assert n >= 1 and "very long" not in shown and len(shown) <= 256 * 3 // 2
        assert rt.generate("alpha", chat, max_tokens=4).tokens > 0


def test_generation_reports_the_pairs_it_used(models):
    with Runtime(models_dir=models, profile="host", threads=1, keep_alive=-1) as rt:
        ctx = ExpertContext(rt)
        r = ctx.generate("alpha", "python model", max_tokens=4)
        other = ctx.generate("general", "python model", max_tokens=4)
        assert r.knowledge >= 1 and r.prompt_tokens > other.prompt_tokens
        # the engine alone generates from the chat it is given: knowledge is put in above it
        bare = rt.generate("alpha", "python model", max_tokens=4)
        assert bare.knowledge == 0 and bare.prompt_tokens < r.prompt_tokens


def test_lookup_names_the_closest_answer_for_the_sampler_to_favour(models):
    with Runtime(models_dir=models, profile="host", threads=1, keep_alive=-1) as rt:
        found = ExpertContext(rt).lookup(rt.config("alpha"), "python model")
        assert found.count >= 1 and found.favour == ["the python answer"]  # the closest pair's answer only
        assert ExpertContext(rt).lookup(rt.config("general"), "python model").favour == []


@pytest.fixture(scope="module")
def gemma_models(tmp_path_factory, gemma_gguf):
    models = tmp_path_factory.mktemp("gemma-knowledge")
    (models / "experts").mkdir()
    write_model_toml(models / "gemma.toml", "gemma", gguf_path=gemma_gguf, context_size=512)
    write_pack(models / "experts" / "alpha-knowledge.jsonl",
               [{"question": "python model", "response": "Zeppelins drift above Reykjavik harbour."}] + PAIRS[1:])
    write_model_toml(models / "experts" / "alpha.toml", "alpha", base="gemma",
                     extra='knowledge = "alpha-knowledge.jsonl"\nknowledge_shots = 1\nknowledge_min = 0.3\n')
    write_model_toml(models / "experts" / "general.toml", "general", base="gemma")
    write_encoder_router(models / "router", ["alpha", "general"])
    return models


def test_favoured_tokens_are_the_words_not_the_short_ones(gemma_gguf):
    import llama_cpp

    from hublab.runtime.engine.session import favoured_tokens

    llama = llama_cpp.Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    got = favoured_tokens(llama, ["the python answer is a rust model", "python!"], 1.5)
    assert {llama.detokenize([t]).decode().strip() for t in got} == {"the", "python", "answer", "rust", "model"}
    assert set(got.values()) == {1.5}
    assert favoured_tokens(llama, ["python"], 0.0) == {} and favoured_tokens(llama, [], 1.5) == {}


def test_knowledge_bias_steers_the_answer_to_the_retrieved_words(gemma_models, monkeypatch):
    monkeypatch.setenv("HUBLAB_HOME", str(gemma_models / "home"))
    words = {"zeppelins", "drift", "above", "reykjavik", "harbour"}

    def share(text: str) -> float:  # of the answer's words, those the retrieved answer holds
        said = [w.strip(".,!?*").lower() for w in text.split()]
        return sum(any(w and w in x for x in words) for w in said) / max(len(said), 1)

    with Runtime(models_dir=gemma_models, profile="host", threads=1, keep_alive=-1) as rt:
        ctx = ExpertContext(rt)
        ask = dict(max_tokens=16, temperature=0.0)
        question = "python model"
        plain = ctx.generate("alpha", question, **ask).text
        rt.config("alpha").knowledge_bias = 8.0
        steered = ctx.generate("alpha", question, **ask).text
        assert share(steered) > share(plain), (plain, steered)  # the base copies the shown answer in part already
        # the engine alone is given nothing to favour; given the text, it favours it the same way
        assert rt.generate("alpha", question, **ask).text != steered
        told = "Question: Where do airships drift?\nAnswer:"
        bare = rt.generate("alpha", told, raw=True, **ask).text
        favoured = rt.generate("alpha", told, raw=True, favour=["Zeppelins drift above Reykjavik harbour."], **ask).text
        assert share(favoured) > share(bare), (bare, favoured)


def test_embeddings_are_cached_by_pack_and_encoder_hash(models, tmp_path):
    calls = []

    def embed(texts):
        calls.append(len(texts))
        v = np.random.default_rng(len(texts)).standard_normal((len(texts), 4))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    pack = models / "experts" / "alpha-knowledge.jsonl"
    K.Library(embed, "enc-1").pack(pack)
    K.Library(embed, "enc-1").pack(pack)
    assert calls == [3]                         # the second library read the cache
    K.Library(embed, "enc-2").pack(pack)
    assert calls == [3, 3]                      # another encoder: other embeddings
    write_pack(pack, PAIRS + [{"question": "new one", "response": "x"}])
    assert len(K.Library(embed, "enc-1").pack(pack).records) == 4 and calls == [3, 3, 4]
    # a torn cache file is rebuilt, not trusted
    for f in (cache_root() / "knowledge").glob("*.npz"):
        f.write_bytes(b"junk")
    K.Library(embed, "enc-1").pack(pack)
    assert calls == [3, 3, 4, 4]


def test_a_shipped_sidecar_saves_the_first_embedding(models):
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return np.eye(len(texts), 4)

    pack = models / "experts" / "alpha-knowledge.jsonl"
    side = K.embed_pack(pack, embed, "enc-1")
    assert side.parent == pack.parent and calls == [3]
    got = K.Library(embed, "enc-1").pack(pack)
    assert calls == [3] and got.vectors.shape == (3, 4)
    assert not (cache_root() / "knowledge").exists()  # read from the sidecar, nothing cached
    write_pack(pack, PAIRS[:2])
    K.embed_pack(pack, embed, "enc-1")
    assert len(list(pack.parent.glob("alpha-knowledge.*.npy"))) == 1  # the stale sidecar is gone


def test_the_demo_packs_ship_the_sidecar_of_the_shipped_router():
    """Each demo pack's embeddings are shipped for the router beside it (the key names the pack and the router's
    model.onnx): after a router retrain without new sidecars, a fresh install would embed all ~4,700 pairs on its
    first `?` (tens of seconds on a Pi). Rebuild them with trainer.demo.embed_pack."""
    import tomllib

    from hublab.runtime.paths import EMBEDDED_MODELS_DIR
    from hublab.runtime.routing.router import Router

    router = Router.load(EMBEDDED_MODELS_DIR / "router", threads=1)
    packs = []
    for toml in sorted((EMBEDDED_MODELS_DIR / "experts").glob("*.toml")):
        knowledge = tomllib.loads(toml.read_text()).get("expert", {}).get("knowledge")
        if knowledge:
            packs.append((toml.parent / knowledge).resolve())
    assert len(packs) == 5
    for pack in packs:
        side = K.sidecar(pack, K.pack_key(pack, router.encoder_id))
        assert side.is_file(), f"{side.name} missing: rebuild it with hublab.trainer.demo.embed_pack"
        assert np.load(side).shape[0] == len(K.read_pack(pack))
        assert len(list(pack.parent.glob(f"{pack.stem}.*.npy"))) == 1  # no stale one beside it


@pytest.mark.parametrize("content, message", [
    (b'{"question": "q"}\n', ":1: needs non-empty string fields question and response"),
    (b'not json\n', ":1: not a JSON object"),
    (b'\xff\xfe\n', "not UTF-8"),
])
def test_bad_packs_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(HublabError, match=message) as e:
        K.read_pack(path)
    assert "\n" not in str(e.value)
    with pytest.raises(HublabError, match="not found"):
        K.read_pack(tmp_path / "missing.jsonl")


def test_pack_settings_are_validated(models):
    from hublab.runtime.config import ConfigError, load_model

    toml = models / "experts" / "alpha.toml"
    toml.write_text(toml.read_text().replace("knowledge_shots = 2", "knowledge_shots = 99"))
    with pytest.raises(ConfigError, match="knowledge_shots"):
        load_model(toml)
