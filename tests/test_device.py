"""The in-process device API the shell uses (and the agent serves): unknown names as a type, one answer
path for chat, raw text and moe with its pieces streamed, and keep-alive per request."""
from __future__ import annotations

import time

import pytest

from hublab.runtime.config import load_system
from hublab.runtime.serve.device import Device, UnknownModel
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError
from test_agent import long_gguf, write_device  # noqa: F401 - long_gguf is a fixture

QUESTION = [{"role": "user", "content": "the python model"}]


@pytest.fixture
def device(tmp_path, tiny_gguf, tiny_adapters, long_gguf):
    d = Device(Runtime(system=load_system(write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf))))
    yield d
    d.close()


def test_unknown_names_raise_the_unknown_model_type(device):
    for call in (lambda: device.load("alpah"), lambda: device.info("alpah"), lambda: device.unload("alpah"),
                 lambda: device.complete("alpah", "x"), lambda: device.bases_for("alpah", "x")):
        with pytest.raises(UnknownModel, match="did you mean 'alpha'"):
            call()
    assert issubclass(UnknownModel, HublabError)  # the CLI and shell print it like any other error
    with pytest.raises(UnknownModel, match="known: alpha, beta"):
        device.config_of("zzzzzz")


def test_complete_streams_the_answer_for_chat_raw_and_moe(device):
    rt = device.rt
    pieces: list[str] = []
    chat = device.complete("alpha", QUESTION, on_piece=pieces.append, max_tokens=8, temperature=0)
    assert "".join(pieces) == chat.text == rt.generate("alpha", QUESTION, max_tokens=8, temperature=0).text
    assert (chat.tokens, chat.finish_reason) == (8, "length") and chat.prompt_tokens > 0
    assert chat.seconds >= chat.load_s > 0
    # 8 tokens: the 7 after the first decoded at tokens_per_s, within the answer's time after the first token
    assert 0 < (chat.tokens - 1) / chat.hublab["tokens_per_s"] <= chat.seconds - chat.prompt_s

    raw = device.complete("tiny", "the python model", raw=True, max_tokens=6)
    assert raw.text == rt.generate("tiny", "the python model", raw=True, max_tokens=6).text

    pieces.clear()
    moe = device.complete("moe", [{"role": "user", "content": "how do I publish a rust crate with cargo"}],
                          on_piece=pieces.append, max_tokens=5)
    assert moe.hublab["selected"][0]["name"] == "beta" and "".join(pieces) == moe.text and moe.tokens >= 5
    assert device.bases_for("moe", "rust cargo") == ["tiny"]
    with pytest.raises(HublabError, match="needs a user message"):
        device.complete("moe", [{"role": "system", "content": "x"}])


def test_keep_sets_each_base_keep_alive_and_expire_honours_it(device):
    device.load("alpha")
    assert device.keep(["tiny"], 0) == ["tiny", "alpha"] and device.rt.loaded() == []

    device.load("alpha")
    device.keep(["tiny"], -1)
    assert [r["expires"] for r in device.running()] == [None, None]  # kept until unloaded
    assert device.expire_idle() == []

    device.keep(["tiny"], 0.2)
    rows = device.running()
    assert [r["name"] for r in rows] == ["tiny", "alpha"] and rows[0]["memory"] > rows[1]["memory"] > 0
    assert 0 <= rows[0]["expires"] - time.time() <= 0.2
    time.sleep(0.3)
    assert device.expire_idle() == ["tiny", "alpha"] and device.running() == []

    device.load("alpha")
    device.keep(["tiny"], None)  # back to [runtime] keep_alive (5m)
    assert 299 < device.running()[0]["expires"] - time.time() <= 300 and device.expire_idle() == []


def test_moe_streams_the_leading_expert_as_it_writes(device):
    """One expert selected: its words arrive piece by piece, long before the answer is done, and add up to the
    answer. Two experts under best: the first one's words stream, and the winner follows when it is another."""
    from hublab.runtime.serve.device import MoeStream

    pieces: list[str] = []
    one = device.complete("moe", [{"role": "user", "content": "how do I publish a rust crate with cargo"}],
                          on_piece=pieces.append, max_tokens=12, temperature=0)
    assert len(one.hublab["selected"]) == 1 and len(pieces) > 1 and "".join(pieces) == one.text
    log: list[str] = []  # the order of events and pieces: the words go out while the expert still writes
    relay = MoeStream(lambda piece: log.append("piece"), "best")
    device.ask("how do I publish a rust crate with cargo", max_tokens=12, temperature=0,
               on_event=lambda kind, data: (log.append(kind), relay(kind, data)))
    assert "piece" in log and log.index("piece") < log.index("expert_done")

    pieces: list[str] = []
    two = device.complete("moe", [{"role": "user", "content": "the python model"}], on_piece=pieces.append,
                          routing="all", synthesis="best", max_tokens=8, temperature=0)
    lead = two.hublab["selected"][0]["name"]
    streamed = "".join(pieces)
    lead_text = device.rt.generate(lead, [{"role": "user", "content": "the python model"}], max_tokens=8,
                                   temperature=0).text.strip()
    assert streamed.startswith(lead_text)
    if two.hublab["chosen"] == lead:
        assert streamed == two.text
    else:
        assert streamed.endswith(two.text) and f"best: {two.hublab['chosen']} answered" in streamed


def test_concatenate_streams_each_expert_under_its_header(device):
    pieces: list[str] = []
    r = device.complete("moe", [{"role": "user", "content": "the python model"}], on_piece=pieces.append,
                        routing="all", synthesis="concatenate", max_tokens=6, temperature=0)
    assert len(pieces) > 2 and "".join(pieces) == r.text and r.text.count("### ") == len(r.hublab["selected"])


def test_a_stopped_question_starts_no_synthesis(device):
    """Stop during the first expert: no other expert and no summariser starts; the answer is what was said."""
    import threading

    cancel = threading.Event()
    events: list[str] = []

    def on_event(kind: str, data: dict) -> None:
        events.append(kind if kind != "expert_start" else f"start:{data['expert']}")
        if kind == "expert_token":
            cancel.set()

    r = device.ask("the python model", routing="all", synthesis="summarize", on_event=on_event, cancel=cancel,
                   max_tokens=32)
    assert r["finish_reason"] == "cancelled" and "synth_start" not in events
    assert sum(e.startswith("start:") for e in events) == 1 and "stopped before summarize" in r["note"]
    assert r["answer"] == r["answers"][0]["text"]


# ---------------------------------------------------------------------------------------------------
# ai config: a setting reaches the running runtime when the answer says it does

def test_ai_config_inference_applies_to_the_next_answer(device):
    """system.toml [inference] (issue 27: it answered "now" and the runtime kept the old sampler until a restart)."""
    rt, alpha = device.rt, device.rt.config("alpha")
    assert device.config("temperature", "0.3")["applies"] == "now" and rt.sampler(alpha, {}).temperature == 0.3
    assert device.config("max_tokens", "3")["applies"] == "now"
    assert device.complete("alpha", QUESTION).tokens == 3
    assert device.config("seed", "7")["applies"] == "now" and rt.sampler(alpha, {}).seed == 7
    # a context is sized as its base loads: a loaded base keeps its own until it loads again
    assert device.config("context_size", "128")["applies"] == "next load" and rt.context_size(alpha) == 128
    device.unload("tiny")
    assert device.config("context_size", "192")["applies"] == "now"
    with rt.hold("alpha") as base:
        assert base.n_ctx == 192


def test_ai_config_runtime_moe_and_registry_apply_now(device, tmp_path):
    rt = device.rt
    assert device.config("threads", "2")["applies"] == "now" and rt.threads == 2 and rt.fixed_threads
    assert device.config("max_memory", "64MB")["applies"] == "now" and rt.budget == 64 << 20
    assert device.config("keep_alive", "1m")["applies"] == "now" and rt.keep_alive == 60
    assert device.config("profile", "pi4-4gb")["applies"] == "now" and rt.profile.name == "pi4-4gb"

    both = "python pip and rust cargo"
    assert [s["name"] for s in device.route(both)["selected"]] == ["alpha", "beta"]
    assert device.config("sure", "0.3")["applies"] == "now"  # alpha's 0.5 is sure enough now
    assert [s["name"] for s in device.route(both)["selected"]] == ["alpha"]
    assert device.config("fallback", "gamma")["applies"] == "now"  # the Ensemble and router are made anew
    assert [s["name"] for s in device.route("nothing matches this")["selected"]] == ["gamma"]
    assert device.config("routing", "all")["applies"] == "now" and len(device.route(both)["selected"]) == 5
    assert device.config("aggregator", "beta")["applies"] == "now" and device.settings()["aggregator"] == "beta"

    (tmp_path / "registry").mkdir()  # pkg reads [registry] url from the file on each call
    assert device.config("url", str(tmp_path / "registry"))["applies"] == "now"
    with pytest.raises(HublabError, match="registry.*not a hublab registry"):
        device.check_package("anything")


def test_ai_config_agent_settings_say_restart(device):
    """The agent takes host, port, token and queue size when it starts: saved, and the answer says so."""
    for key, value in (("host", "127.0.0.2"), ("port", "8790"), ("token", "t"), ("queue_size", "4")):
        assert device.config(key, value)["applies"] == "agent restart"
    saved = load_system(device.rt.system.path)
    assert (saved.host, saved.port, saved.token, saved.queue_size) == ("127.0.0.2", 8790, "t", 4)


def test_ai_config_names_the_keys_system_inference_takes(device):
    """stop and system_prompt are per model; the message no longer claims system.toml has no [inference]."""
    with pytest.raises(HublabError) as err:
        device.config("stop", "x")
    msg = str(err.value)
    assert "no [inference]" not in msg and "system.toml's [inference] takes max_tokens, temperature" in msg
    assert "ai config alpha stop" in msg
