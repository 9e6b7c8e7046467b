"""The agent's Ollama API, driven by the official `ollama` client (and httpx where the client has no call)
against a real loopback agent over tiny real GGUF experts: every endpoint plain and streaming, options,
keep_alive and /api/ps, moe, embeddings from a tiny real ONNX encoder, pull/delete through a real
package registry, and the agent's token, queue and disconnect rules on these routes."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

from encoders import write_encoder_router
from ggufs import WORDS
from hublab.runtime import pkg
from hublab.runtime.serve.agent import Agent
from hublab.runtime.config import load_system, set_system_value
from hublab.runtime.serve.device import Device
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.engine.profiles import active_profile
from test_agent import long_gguf, metric, start_agent, wait_for, write_device  # noqa: F401 - long_gguf: fixture
from test_pkg_support import base_package, expert_package, ws  # noqa: F401 - ws: fixture

ollama = pytest.importorskip("ollama")

QUESTION = [{"role": "user", "content": "the python model"}]
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture
def agent(tmp_path, tiny_gguf, tiny_adapters, long_gguf):
    a = start_agent(write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf))
    yield a
    a.stop()
    a.device.close()


@pytest.fixture
def client(agent):
    return ollama.Client(host=agent.url)


def error_of(response: httpx.Response) -> str:
    """An Ollama-shaped error: {"error": "<one line>"}."""
    doc = response.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and "\n" not in doc["error"], doc
    assert "Traceback" not in response.text
    return doc["error"]


# ---------------------------------------------------------------------------------------------------
# listing and describing

def test_version_and_root(agent):
    assert httpx.get(agent.url + "/api/version").json()["version"]
    assert "hublab is running" in httpx.get(agent.url + "/").text


def test_tags_lists_every_model_and_moe(client):
    models = {m.model: m for m in client.list().models}
    assert set(models) == {"moe", "alpha", "beta", "gamma", "plain", "slow", "tiny"}  # no router in this dir
    alpha = models["alpha"]
    assert alpha.details.family == "llama" and alpha.details.parent_model == "tiny"
    assert alpha.details.quantization_level == "F32" and alpha.details.format == "gguf"
    assert alpha.size > 0 and len(alpha.digest) == 64 and alpha.modified_at.year >= 2024
    assert models["moe"].details.family == "moe" and set(models["moe"].details.families) == {
        "alpha", "beta", "gamma", "plain", "slow"}


def test_show_an_expert_moe_and_an_unknown_name(client):
    s = client.show("alpha")
    assert s.details.parent_model == "tiny" and s.capabilities == ["completion"]
    assert s.modelinfo["general.architecture"] == "llama" and s.modelinfo["hublab.context_size"] == 256
    assert "num_predict 16" in s.parameters and "temperature 0.0" in s.parameters
    assert s.modelfile.splitlines()[1].startswith("FROM ") and "ADAPTER " in s.modelfile
    assert client.show("alpha:latest").modelinfo == s.modelinfo  # Ollama's default tag is accepted
    m = client.show("moe")
    assert m.modelinfo["hublab.routing"] == "topk:2" and "beta" in m.modelinfo["hublab.experts"]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("alpah")
    assert e.value.status_code == 404 and "did you mean 'alpha'" in e.value.error


# ---------------------------------------------------------------------------------------------------
# chat and generate

def test_chat_plain_and_streaming(agent, client):
    r = client.chat(model="alpha", messages=QUESTION, options=GREEDY, stream=False)
    text = r.message.content
    assert text.strip() and r.message.role == "assistant" and r.done and r.done_reason == "length"
    assert r.eval_count == 8 and r.prompt_eval_count > 0 and r.total_duration >= r.eval_duration > 0
    # the same answer the runtime gives for the same chat
    assert text == agent.device.rt.generate("alpha", QUESTION, max_tokens=8, temperature=0).text

    chunks = list(client.chat(model="alpha", messages=QUESTION, options=GREEDY, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done and chunks[-1].done_reason == "length"
    assert "".join(c.message.content for c in chunks) == text and chunks[-1].message.content == ""
    assert chunks[-1].eval_count == 8

    other = client.chat(model="beta", messages=QUESTION, options=GREEDY)
    assert other.message.content != text  # beta's adapter is applied on the same base


def test_generate_plain_streaming_raw_and_system(agent, client):
    rt = agent.device.rt
    r = client.generate(model="tiny", prompt="the python model", raw=True, options={"num_predict": 6})
    assert r.response == rt.generate("tiny", "the python model", raw=True, max_tokens=6).text and r.eval_count == 6
    streamed = list(client.generate(model="tiny", prompt="the python model", raw=True, options={"num_predict": 6},
                                    stream=True))
    assert "".join(c.response for c in streamed) == r.response and streamed[-1].done
    # without raw the prompt is a user message in the model's template, like /api/chat
    templated = client.generate(model="alpha", prompt="the python model", options=GREEDY)
    assert templated.response == client.chat(model="alpha", messages=QUESTION, options=GREEDY).message.content
    with_system = client.generate(model="alpha", prompt="the python model", system="you are a rust model",
                                  options=GREEDY)
    assert with_system.response == rt.generate("alpha", QUESTION, system_prompt="you are a rust model",
                                               max_tokens=8, temperature=0).text


def test_options_sample_stop_and_num_ctx(agent, client):
    sampled = {"temperature": 1.5, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.2, "seed": 7, "num_predict": 12}
    a = client.chat(model="gamma", messages=QUESTION, options=sampled).message.content
    b = client.chat(model="gamma", messages=QUESTION, options=sampled).message.content
    assert a == b  # one seed, one answer
    greedy = client.chat(model="gamma", messages=QUESTION, options={**GREEDY, "num_predict": 12}).message.content
    word = greedy.split()[2]
    stopped = client.chat(model="gamma", messages=QUESTION, options={**GREEDY, "num_predict": 12, "stop": [word]})
    assert stopped.done_reason == "stop" and word not in stopped.message.content
    assert greedy.startswith(stopped.message.content)

    # num_ctx: prompt + answer fit in it
    n = client.chat(model="gamma", messages=QUESTION, options=GREEDY).prompt_eval_count
    r = client.chat(model="gamma", messages=QUESTION, options={"temperature": 0, "num_ctx": n + 3})
    assert r.eval_count == 3 and r.done_reason == "length"
    with pytest.raises(ollama.ResponseError) as e:  # streamed too: refused before the stream starts
        list(client.chat(model="gamma", messages=QUESTION, options={"num_ctx": 100000}, stream=True))
    assert e.value.status_code == 400 and "context_size" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="gamma", messages=QUESTION, options={"temperature": "hot"})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    # num_predict -1: until the context is full (the expert's own max_tokens would stop at 16)
    r = client.generate(model="tiny", prompt="the", raw=True, options={"num_predict": -1, "temperature": 0,
                                                                      "stop": ["\n\n"]})
    assert r.eval_count > 16 or r.done_reason == "stop"


def test_moe_routes_plain_and_streaming(agent, client):
    question = [{"role": "user", "content": "how do I publish a rust crate with cargo"}]
    raw = httpx.post(agent.url + "/api/chat", json={"model": "moe", "messages": question, "stream": False,
                                                    "options": {"num_predict": 5}}).json()
    assert raw["hublab"]["selected"][0]["name"] == "beta" and raw["done"] and raw["eval_count"] >= 5
    r = client.chat(model="moe", messages=question, options={"num_predict": 5})
    assert r.message.content == raw["message"]["content"] and r.message.content.strip()
    chunks = list(client.chat(model="moe", messages=question, options={"num_predict": 5}, stream=True))
    assert "".join(c.message.content for c in chunks) == r.message.content and chunks[-1].done
    g = client.generate(model="moe", prompt="pip install for python", options={"num_predict": 5})
    assert g.response.strip() == agent.device.rt.generate("alpha", "pip install for python", max_tokens=5).text.strip()


# ---------------------------------------------------------------------------------------------------
# keep_alive and /api/ps

def _expires_in(model) -> float:
    return (model.expires_at - datetime.now(timezone.utc)).total_seconds()


def test_keep_alive_ps_load_and_unload(agent, client):
    assert client.ps().models == []
    client.chat(model="alpha", messages=QUESTION, options=GREEDY, keep_alive="10m")
    running = {m.model: m for m in client.ps().models}
    assert set(running) == {"tiny", "alpha"}
    assert 590 < _expires_in(running["tiny"]) <= 600 and running["tiny"].size > running["alpha"].size > 0
    assert running["tiny"].context_length == 256 and running["alpha"].details.parent_model == "tiny"
    assert len(running["alpha"].digest) == 64

    client.chat(model="alpha", messages=QUESTION, options=GREEDY)  # no keep_alive: [runtime] keep_alive (5m)
    assert 290 < _expires_in(client.ps().models[0]) <= 300

    client.chat(model="alpha", messages=QUESTION, options=GREEDY, keep_alive=-1)
    assert client.ps().models[0].expires_at.year == 9999

    r = client.chat(model="alpha", messages=QUESTION, options=GREEDY, keep_alive=0)
    assert r.message.content and client.ps().models == []  # unloaded right after the answer

    # an empty prompt only loads (Ollama's preload), or unloads with keep_alive 0
    r = client.generate(model="beta", prompt="", keep_alive="1s")
    assert r.done_reason == "load" and {m.model for m in client.ps().models} == {"tiny", "beta"}
    wait_for(lambda: client.ps().models == [], timeout=10, what="the 1 s keep_alive to unload")
    client.generate(model="gamma")
    assert client.chat(model="gamma", messages=[], keep_alive=0).done_reason == "unload"
    assert client.ps().models == []


# ---------------------------------------------------------------------------------------------------
# embeddings

def test_embed_and_embeddings_from_the_router_encoder(tmp_path, tiny_gguf, tiny_adapters, long_gguf):
    config = write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf)
    table = write_encoder_router(tmp_path / "models" / "router", ["alpha", "beta", "gamma", "plain", "slow"])
    a = start_agent(config)
    try:
        client = ollama.Client(host=a.url)
        assert "router" in {m.model for m in client.list().models}
        assert client.show("router").capabilities == ["embedding"]
        r = client.embed(model="router", input=["python model", "rust linux water"])
        got = np.asarray(r.embeddings)
        ids = [[WORDS.index(w) + 1 for w in text.split()] for text in ("python model", "rust linux water")]
        by_hand = np.stack([table[i].mean(axis=0) / np.linalg.norm(table[i].mean(axis=0)) for i in ids])
        assert got.shape == (2, 8) and np.allclose(got, by_hand, atol=1e-5)
        assert r.prompt_eval_count == 5
        one = client.embed(model="router", input="python model").embeddings
        old = client.embeddings(model="router", prompt="python model").embedding
        assert np.allclose(one[0], got[0]) and np.allclose(old, got[0])
        # every listed name embeds, with the router's encoder (as Ollama embeds with any model it serves)
        for name in ("moe", "alpha", "alpha:latest", "tiny"):
            assert np.allclose(client.embed(model=name, input=["python model", "rust linux water"]).embeddings, got)
            assert np.allclose(client.embeddings(model=name, prompt="python model").embedding, got[0])
        shown = client.show("alpha")
        assert "embedding" in shown.capabilities and "router" in shown.modelinfo["hublab.embedding"]
        assert "embedding" in client.show("moe").capabilities
        with pytest.raises(ollama.ResponseError) as e:
            client.embed(model="nope", input="x")
        assert e.value.status_code == 404 and "moe" in e.value.error and "router" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="router", messages=QUESTION)
        assert e.value.status_code == 400 and "/api/embed" in e.value.error
    finally:
        a.stop()
        a.device.close()


def test_embed_without_a_router_says_how_to_get_one(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="router", input="x")
    assert e.value.status_code == 400 and "no router at" in e.value.error


# ---------------------------------------------------------------------------------------------------
# pull and delete: packages from the configured registry

@pytest.fixture
def registry_device(ws, tmp_path):
    """A device whose system.toml names a directory registry holding signed packages tiny and alpha-expert,
    and one unsigned package; nothing installed yet."""
    base = base_package(tmp_path / "src" / "tiny")
    pkg.build(base, key=ws.key)
    pkg.publish(base, str(ws.registry))
    expert = expert_package(tmp_path / "src" / "alpha", base / "q8_0" / "tiny.gguf")
    pkg.build(expert, key=ws.key)
    pkg.publish(expert, str(ws.registry))
    unsigned = expert_package(tmp_path / "src" / "beta", base / "q8_0" / "tiny.gguf", name="beta-expert",
                              expert="beta", seed=2)
    pkg.build(unsigned, sign=False)
    pkg.publish(unsigned, str(ws.registry))
    set_system_value(ws.config, "registry", "url", str(ws.registry))
    set_system_value(ws.config, "moe", "fallback", "alpha")
    return ws


def _agent_for(config: Path, profile="host") -> Agent:
    return Agent(Device(Runtime(system=load_system(config), profile=profile, threads=1)), port=0, quiet=True).start()


def test_pull_installs_with_progress_and_delete_removes(registry_device):
    a = _agent_for(registry_device.config)
    try:
        client = ollama.Client(host=a.url)
        assert "tiny" not in {m.model for m in client.list().models}
        done = client.pull("tiny")  # not streamed: one answer once installed
        assert done.status == "success"
        progress = list(client.pull("alpha-expert:1.0", stream=True))
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        files = [p for p in progress if p.total]
        assert files and all(0 <= p.completed <= p.total for p in files) and files[-1].completed == files[-1].total
        assert {"tiny", "alpha"} <= {m.model for m in client.list().models}
        r = client.chat(model="alpha", messages=QUESTION, options=GREEDY)
        assert r.message.content.strip() and r.eval_count == 8

        # refusals come before anything is streamed or written: unsigned, not in the registry
        with pytest.raises(ollama.ResponseError) as e:
            list(client.pull("beta-expert", stream=True))
        assert e.value.status_code == 400 and "not signed" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("nothing-here")
        assert e.value.status_code in (400, 404)

        # delete by the model a package provides (or by package name); it is unloaded first
        assert client.delete("alpha").status == "success"
        assert "alpha" not in {m.model for m in client.list().models} and "alpha" not in a.device.rt.loaded()
        with pytest.raises(ollama.ResponseError) as e:
            client.delete("alpha")
        assert e.value.status_code == 404 and "tiny" in e.value.error  # names what is installed
        assert client.delete("tiny").status == "success" and client.list().models[0].model == "moe"
    finally:
        a.stop()
        a.device.close()


def test_pull_refuses_a_package_the_board_cannot_fit(registry_device):
    board = dataclasses.replace(active_profile("pi-zero-2w"), name="tiny-board", max_model_size=4096,
                                model_budget=8192)
    a = _agent_for(registry_device.config, profile=board)
    try:
        with pytest.raises(ollama.ResponseError) as e:
            list(ollama.Client(host=a.url).pull("tiny", stream=True))
        assert e.value.status_code == 400 and "does not fit board profile tiny-board" in e.value.error
        assert not (registry_device.models / "packages").exists()
    finally:
        a.stop()
        a.device.close()


# ---------------------------------------------------------------------------------------------------
# errors, token, queue, disconnect: the agent's rules hold on these routes

def test_bad_requests_are_one_line_json_errors(agent):
    u = agent.url + "/api"
    r = httpx.post(u + "/chat", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in error_of(r)
    r = httpx.post(u + "/chat", json={"model": "nope", "messages": QUESTION})
    assert r.status_code == 404 and "no model or expert named 'nope'" in error_of(r)
    assert "known: alpha, beta, gamma, moe, plain" in error_of(r)  # moe is a name a client can use
    r = httpx.post(u + "/chat", json={"model": "alpha", "messages": "hi"})
    assert r.status_code == 400 and "messages" in error_of(r)
    r = httpx.post(u + "/generate", json={"model": "alpha", "prompt": "x", "format": "yaml"})
    assert r.status_code == 400 and "format" in error_of(r)
    r = httpx.post(u + "/generate", json={"prompt": "x"})
    assert r.status_code == 400 and "model is required" in error_of(r)
    r = httpx.post(u + "/chat", json={"model": "alpha", "messages": QUESTION, "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive" in error_of(r)
    r = httpx.get(u + "/chat")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and error_of(r)
    r = httpx.post(u + "/delete", json={"model": "alpha"})
    assert r.status_code == 405 and r.headers["allow"] == "DELETE"
    r = httpx.request("DELETE", u + "/delete", json={"model": "alpha"})
    assert r.status_code == 400 and "not by an installed package" in error_of(r)
    r = httpx.get(u + "/nothing")
    assert r.status_code == 404 and error_of(r)
    assert httpx.get(agent.url + "/health").json()["status"] == "ok"  # and the agent still serves


def test_token_required_on_the_ollama_routes(tmp_path, tiny_gguf, tiny_adapters, long_gguf):
    a = start_agent(write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf), token="s3cret")
    try:
        r = httpx.get(a.url + "/api/tags")
        assert r.status_code == 401 and "bearer token" in error_of(r)
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=a.url, headers={"Authorization": "Bearer wrong"}).list()
        assert e.value.status_code == 401
        ok = ollama.Client(host=a.url, headers={"Authorization": "Bearer s3cret"})
        assert ok.chat(model="tiny", messages=QUESTION, options={"num_predict": 3}).eval_count == 3
    finally:
        a.stop()
        a.device.close()


def test_queue_full_answers_503(tmp_path, tiny_gguf, tiny_adapters, long_gguf):
    a = start_agent(write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf), queue_size=1)
    codes: list[int] = []
    body = {"model": "alpha", "messages": QUESTION, "stream": False, "options": {"num_predict": 3}}

    def chat():
        codes.append(httpx.post(a.url + "/api/chat", json=body, timeout=60).status_code)

    try:
        with a.device.rt.hold("alpha"):  # the base is busy: the first request runs into it, the second queues
            first = threading.Thread(target=chat)
            first.start()
            wait_for(lambda: a.gate.running == 1, what="first request running")
            second = threading.Thread(target=chat)
            second.start()
            wait_for(lambda: a.gate.waiting == 1, what="second request queued")
            r = httpx.post(a.url + "/api/generate", json={"model": "beta", "prompt": "x"})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in error_of(r)
        first.join(30)
        second.join(30)
        assert codes == [200, 200]
    finally:
        a.stop()
        a.device.close()


def test_disconnect_mid_stream_cancels_the_generation(agent):
    body = {"model": "slow", "prompt": "the python model", "raw": True, "options": {"num_predict": 3000}}
    with httpx.stream("POST", agent.url + "/api/generate", json=body) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        for i, line in enumerate(r.iter_lines()):
            assert json.loads(line)["done"] is False
            if i == 3:
                break  # leaving the block closes the connection mid-answer
    wait_for(lambda: "slow" in agent.device.rt.stats and agent.gate.running == 0, what="generation to end")
    assert agent.device.rt.stats["slow"].tokens < 3000
    assert metric(agent, "hublab_cancelled_total") == 1
    time.sleep(0.1)
    assert httpx.get(agent.url + "/health").json()["status"] == "ok"
