"""The runtime engine on real GGUFs: tiny llama models written in fixtures, and the gemma base."""
import threading

import pytest

from ggufs import write_lora_adapter, write_model_toml, write_tiny_llama
from hublab.runtime.engine.runtime import FitError, Runtime
from hublab.runtime.errors import HublabError
from hublab.runtime.engine.profiles import active_profile

PROMPT = "the python model"


def runtime(models_dir, **kw):
    kw.setdefault("profile", "host")
    kw.setdefault("threads", 1)
    return Runtime(models_dir=models_dir, **kw)


def test_load_and_generate_deterministic(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        assert not rt.catalog.errors
        a = rt.generate("tiny", PROMPT, raw=True, max_tokens=12)
        b = rt.generate("tiny", PROMPT, raw=True, max_tokens=12)
        assert a.text == b.text and a.text.strip()
        assert a.tokens == 12 and a.finish_reason == "length" and a.prompt_tokens > 0
        assert a.tokens_per_s > 0 and a.rss_bytes > 0
        assert rt.stats["tiny"].calls == 2 and rt.stats["tiny"].tokens == 24


def test_adapter_switch_changes_output_and_switching_back_restores_it(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        base1 = rt.generate("plain", PROMPT, raw=True, max_tokens=16).text
        alpha = rt.generate("alpha", PROMPT, raw=True, max_tokens=16).text
        beta = rt.generate("beta", PROMPT, raw=True, max_tokens=16).text
        alpha2 = rt.generate("alpha", PROMPT, raw=True, max_tokens=16).text
        base2 = rt.generate("plain", PROMPT, raw=True, max_tokens=16).text
        assert len({base1, alpha, beta}) == 3
        assert alpha == alpha2 and base1 == base2
        # one loaded model carries every adapter: no reload on switch
        assert list(rt._loaded) == ["tiny"]
        assert set(rt._loaded["tiny"].adapters) == {"alpha", "beta"}


def test_streaming_pieces_join_to_the_text(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        gen = rt.stream("alpha", PROMPT, raw=True, max_tokens=10)
        pieces = list(gen)
        assert len(pieces) > 1 and "".join(pieces) == gen.result.text


def test_stop_strings_end_generation_and_are_not_shown(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        full = rt.generate("tiny", PROMPT, raw=True, max_tokens=16).text
        words = full.split()
        stop = words[2]
        cut = rt.generate("tiny", PROMPT, raw=True, max_tokens=16, stop=[stop])
        assert cut.finish_reason == "stop" and stop not in cut.text
        assert full.startswith(cut.text) and len(cut.text) < len(full)


def test_cancel_stops_generation(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        cancel = threading.Event()
        gen = rt.stream("tiny", PROMPT, raw=True, max_tokens=100, cancel=cancel)
        for i, _ in enumerate(gen):
            if i == 2:
                cancel.set()
        assert gen.result.finish_reason == "cancelled" and gen.result.tokens < 100


def test_logprobs_give_mean_token_probability(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        r = rt.generate("tiny", PROMPT, raw=True, max_tokens=8, logprobs=True)
        # greedy decoding picks the most likely token: its probability is at least 1/vocab
        assert 1 / 400 < r.mean_token_prob <= 1.0


def test_chat_prompt_uses_plain_format_and_system_prompt(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        base = rt.load("tiny")
        tokens, stops = rt.prompt_tokens(base, rt.config("tiny"), "hello", False, "be brief")
        text = base.llama.detokenize(tokens).decode()
        assert "system: be brief" in text and "user: hello" in text and text.endswith("assistant:")
        assert stops == ["\nuser:"]


def test_fit_refusal_names_need_budget_and_fix(tiny_models_dir):
    with runtime(tiny_models_dir, max_memory=100_000) as rt:
        with pytest.raises(FitError) as info:
            rt.load("alpha")
        msg = str(info.value)
        assert "alpha needs" in msg and "board budget" in msg and "try a smaller quantization" in msg
        assert rt.loaded() == []


def test_lru_eviction_makes_room(tmp_path, tiny_gguf):
    models = tmp_path / "models"
    models.mkdir()
    other = write_tiny_llama(tmp_path / "other.gguf", seed=5)
    write_model_toml(models / "a.toml", "a", gguf_path=tiny_gguf, context_size=128)
    write_model_toml(models / "b.toml", "b", gguf_path=other, context_size=128)
    write_model_toml(models / "c.toml", "c", gguf_path=tiny_gguf, context_size=128)
    probe = runtime(models)
    one = probe.estimate("a").total
    with runtime(models, max_memory=int(one * 2.5)) as rt:
        rt.load("a")
        rt.load("b")
        rt.generate("a", PROMPT, raw=True, max_tokens=2)  # a is now the most recently used
        rt.load("c")
        assert set(rt.loaded()) == {"a", "c"}  # b, least recently used, was evicted


def test_keep_alive_zero_unloads_after_use_and_duration_expires(tiny_models_dir):
    with runtime(tiny_models_dir, keep_alive=0) as rt:
        rt.generate("alpha", PROMPT, raw=True, max_tokens=2)
        assert rt.loaded() == []
    with runtime(tiny_models_dir, keep_alive=0.01) as rt:
        rt.generate("alpha", PROMPT, raw=True, max_tokens=2)
        assert rt.loaded() == ["tiny", "alpha"]
        import time

        time.sleep(0.05)
        assert rt.expire_idle() == ["tiny", "alpha"] and rt.loaded() == []
    with runtime(tiny_models_dir, keep_alive=-1) as rt:
        rt.generate("alpha", PROMPT, raw=True, max_tokens=2)
        assert rt.expire_idle() == [] and rt.loaded() == ["tiny", "alpha"]


def test_unload_adapter_keeps_base_and_unload_base_takes_adapters(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        rt.load("alpha")
        rt.load("beta")
        assert rt.unload("alpha") == ["alpha"] and set(rt.loaded()) == {"tiny", "beta"}
        assert rt.unload("tiny") == ["tiny", "beta"] and rt.loaded() == []
        assert rt.generate("alpha", PROMPT, raw=True, max_tokens=3).tokens == 3


def test_unknown_expert_and_missing_files_are_one_line_errors(tmp_path, tiny_models_dir, tiny_gguf):
    with runtime(tiny_models_dir) as rt:
        with pytest.raises(HublabError, match="did you mean 'alpha'"):
            rt.generate("alpah", PROMPT)
    write_model_toml(tiny_models_dir / "experts" / "lost.toml", "lost", base="tiny", adapter=tmp_path / "no.gguf")
    write_model_toml(tiny_models_dir / "experts" / "full.toml", "full", base="tiny", adapter=tiny_gguf)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    write_model_toml(tiny_models_dir / "junk.toml", "junk", gguf_path=tmp_path / "junk.gguf")
    with runtime(tiny_models_dir) as rt:
        with pytest.raises(HublabError, match="adapter: file .* not found"):
            rt.load("lost")
        with pytest.raises(HublabError, match="is a full model, not a LoRA adapter"):
            rt.load("full")
        with pytest.raises(HublabError, match="not a readable GGUF"):
            rt.load("junk")
        rows = {r["name"]: r for r in rt.status()}
        assert rows["lost"]["error"] and rows["alpha"]["error"] is None and rows["alpha"]["quant"] == "F32"


def test_adapter_for_another_model_is_rejected(tmp_path, tiny_models_dir):
    wide = write_tiny_llama(tmp_path / "wide.gguf", n_embd=128)
    wrong = write_lora_adapter(wide, tmp_path / "wrong.gguf")
    write_model_toml(tiny_models_dir / "experts" / "wrong.toml", "wrong", base="tiny", adapter=wrong)
    with runtime(tiny_models_dir) as rt:
        with pytest.raises(HublabError, match="rejected"):
            rt.load("wrong")
        assert rt.generate("alpha", PROMPT, raw=True, max_tokens=2).tokens == 2


def test_prompt_longer_than_context_is_refused(tiny_models_dir):
    with runtime(tiny_models_dir) as rt:
        with pytest.raises(HublabError, match="context holds 128"):
            rt.generate("tiny", "the " * 300, raw=True)


# -- the real gemma base -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, gemma_gguf):
    d = tmp_path_factory.mktemp("gemma")
    write_model_toml(d / "gemma.toml", "gemma", gguf_path=gemma_gguf, context_size=256)
    for name, seed in (("x", 11), ("y", 12)):
        adapter = write_lora_adapter(gemma_gguf, d / f"{name}.gguf", seed=seed, rank=4, scale=0.06,
                                     targets=("attn_q", "attn_v"))
        write_model_toml(d / f"{name}.toml", name, base="gemma", adapter=adapter)
    return d


def test_gemma_adapters_switch_without_reload_and_restore_exactly(gemma_dir):
    with runtime(gemma_dir) as rt:
        q = "The capital of France is"
        base1 = rt.generate("gemma", q, raw=True, max_tokens=12)
        x1 = rt.generate("x", q, raw=True, max_tokens=12)
        llama_obj = rt._loaded["gemma"].llama
        y1 = rt.generate("y", q, raw=True, max_tokens=12)
        x2 = rt.generate("x", q, raw=True, max_tokens=12)
        base2 = rt.generate("gemma", q, raw=True, max_tokens=12)
        assert rt._loaded["gemma"].llama is llama_obj
        assert "Paris" in base1.text or "capital" in base1.text
        assert len({base1.text, x1.text, y1.text}) == 3
        assert x1.text == x2.text and base1.text == base2.text


def test_gemma_chat_uses_gemma_turns(gemma_dir):
    with runtime(gemma_dir) as rt:
        base = rt.load("gemma")
        tokens, stops = rt.prompt_tokens(base, rt.config("gemma"), "hi", False, "sys")
        text = base.llama.detokenize(tokens, special=True).decode()
        assert text == "<bos><start_of_turn>user\nsys\n\nhi<end_of_turn>\n<start_of_turn>model\n"
        assert stops == ["<end_of_turn>"]


def test_pi_zero_profile_refuses_a_context_that_does_not_fit(gemma_dir):
    zero = active_profile("pi-zero-2w")
    with runtime(gemma_dir, profile=zero, max_memory=200 << 20) as rt:
        with pytest.raises(FitError, match="pi-zero-2w"):
            rt.load("x")


def test_system_inference_settings_apply_to_every_model(tiny_models_dir, tmp_path):
    from hublab.runtime.config import load_system

    cfg = tmp_path / "system.toml"
    cfg.write_text(f'[runtime]\nmodels_dir = "{tiny_models_dir}"\n\n[inference]\nmax_tokens = 3\n')
    with Runtime(system=load_system(cfg), profile="host", threads=1) as rt:
        assert rt.generate("alpha", PROMPT, raw=True).tokens == 3
        assert rt.generate("alpha", PROMPT, raw=True, max_tokens=5).tokens == 5  # the call still wins
    cfg.write_text("[inference]\ntemperature = 7.0\n")
    with pytest.raises(HublabError, match="temperature"):
        load_system(cfg)


def test_raw_prompt_parses_special_tokens_unless_told_not_to(tiny_models_dir):
    """Like llama-server, "<s>" in a raw prompt is the BOS token; special=False reads it as text."""
    with runtime(tiny_models_dir) as rt:
        base = rt.load("tiny")
        cfg = rt.config("tiny")
        parsed, _ = rt.prompt_tokens(base, cfg, "<s>hello", True, "")
        plain, _ = rt.prompt_tokens(base, cfg, "<s>hello", True, "", special=False)
        bos = base.llama.token_bos()
        assert parsed[:2] == [bos, bos] and plain[0] == bos and plain[1] != bos


def test_min_tokens_holds_the_end_back(tmp_path, monkeypatch):
    """[inference] min_tokens: the demo general expert answers "What is 2+2?" in two tokens; held to 20, it goes
    on; under a grammar the document ends where it ends."""
    from pathlib import Path

    import llama_cpp

    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    with runtime(Path(__file__).resolve().parents[1] / "models") as rt:
        short = rt.generate("general", "What is 2+2?", max_tokens=60)
        assert short.finish_reason == "stop" and short.tokens < 10
        rt.config("general").inference.min_tokens = 20
        held = rt.generate("general", "What is 2+2?", max_tokens=60)
        assert held.tokens >= 20 and held.text.startswith(short.text.strip().rstrip("."))
        # every token that would end the answer is held, not only end of text and end of turn
        from hublab.runtime.engine.session import end_tokens

        with rt.hold("general") as base:
            vocab = base.llama._model.vocab
            ends = end_tokens(base.llama)
            assert len(ends) > 2 and {llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)} < set(ends)
        doc = rt.generate("general", "What is 2+2?", max_tokens=60, grammar='root ::= "{\\"n\\": 4}"')
        assert doc.text == '{"n": 4}' and doc.tokens < 20
        # a weighted mixture follows its lead expert's setting
        def mixed() -> int:
            gen = rt.mixture_stream({"general": 0.7, "python": 0.3}, "What is 2+2?", max_tokens=60)
            for _ in gen:
                pass
            return gen.result.tokens
        rt.config("general").inference.min_tokens = 0
        plain = mixed()
        assert plain < 50
        rt.config("general").inference.min_tokens = plain + 10
        assert mixed() >= plain + 10


def test_dry_breaks_a_loop_the_repeat_penalty_leaves(tmp_path, monkeypatch):
    """[inference] dry_multiplier (llama.cpp's DRY sampler): greedy on the real gemma base, "1, 2," goes round and
    round; with DRY the answer leaves the loop once it would repeat a run of its own longer than
    dry_allowed_length. A grammar's document repeats by design, so DRY leaves it alone."""
    from pathlib import Path

    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    prompt = "Count: 1, 2, 1, 2, 1, 2, 1, 2,"
    loop = 'root ::= (" 1, 2,")+'
    with runtime(Path(__file__).resolve().parents[1] / "models") as rt:
        def answer(**kw) -> str:
            return rt.generate("general", prompt, raw=True, max_tokens=32, temperature=0, repeat_penalty=1.0,
                               **kw).text
        rt.config("general").inference.dry_multiplier = 0.0
        assert answer().startswith(" 1, 2, 1, 2, 1, 2,")
        assert answer(grammar=loop).startswith(" 1, 2, 1, 2, 1, 2,")
        rt.config("general").inference.dry_multiplier = 1.0
        broken = answer()
        assert broken.startswith(" 1,") and " 1, 2, 1, 2, 1, 2," not in broken
        assert answer(grammar=loop).startswith(" 1, 2, 1, 2, 1, 2,")
