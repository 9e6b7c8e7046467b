"""The in-process device API the shell uses (and the agent serves): unknown names as a type, one answer
path for chat, raw text and moe with its pieces streamed, and keep-alive per request."""
from __future__ import annotations

import time

import pytest

from hublab.runtime.config import load_system
from hublab.runtime.device import Device, UnknownModel
from hublab.runtime.engine import Runtime
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
    assert chat.seconds >= chat.load_s > 0 and chat.hublab["tokens_per_s"] >= 0

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
