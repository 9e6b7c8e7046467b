"""The device agent: a real HTTP server on loopback over tiny real GGUF experts, driven with httpx and
the openai client. Covers the OpenAI API (plain and SSE), the /hublab endpoints, auth, the bounded queue
(503 + Retry-After), cancellation when a client disconnects, and `hublab serve` as a process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ggufs import write_model_toml, write_tiny_llama
from hublab.runtime.serve.agent import Agent
from hublab.runtime.serve.device import Device
from hublab.runtime.config import SEED_MAX, load_system
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError

KEYWORDS = {"alpha": ["python", "pip"], "beta": ["rust", "cargo"], "gamma": ["linux", "kernel"]}
HUBLAB = str(Path(sys.executable).parent / "hublab")


@pytest.fixture(scope="session")
def long_gguf(tmp_path_factory) -> Path:
    """A tiny llama with a 4096-token context: ~2 s for 3000 tokens here, long enough to interrupt."""
    return write_tiny_llama(tmp_path_factory.mktemp("long") / "long.gguf", n_ctx=4096)


def write_device(root: Path, tiny_gguf: Path, adapters: dict[str, Path], long_gguf: Path, **system) -> Path:
    """A models dir (base tiny, keyword experts alpha/beta/gamma, fallback plain, standalone slow expert)
    and the system.toml that points at it; returns the system.toml."""
    models = root / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "tiny.toml", "tiny", gguf_path=tiny_gguf, context_size=256)
    for name, adapter in adapters.items():
        kw = json.dumps(KEYWORDS[name])
        write_model_toml(models / "experts" / f"{name}.toml", name, base="tiny", adapter=adapter,
                         extra=f"keywords = {kw}\n")
    write_model_toml(models / "experts" / "plain.toml", "plain", base="tiny")
    write_model_toml(models / "experts" / "slow.toml", "slow", gguf_path=long_gguf, expert=True,
                     context_size=4096, max_tokens=3000, extra='keywords = ["story"]\n')
    lines = ["[runtime]", f'models_dir = "{models}"', 'profile = "host"', "threads = 1",
             f'keep_alive = "{system.pop("keep_alive", "5m")}"', "", "[moe]", 'fallback = "plain"']
    for section, values in system.items():
        lines += ["", f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = root / "system.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def device_config(tmp_path, tiny_gguf, tiny_adapters, long_gguf) -> Path:
    return write_device(tmp_path, tiny_gguf, tiny_adapters, long_gguf)


def start_agent(config: Path, **kw) -> Agent:
    device = Device(Runtime(system=load_system(config)))
    kw.setdefault("quiet", True)
    return Agent(device, port=0, **kw).start()


@pytest.fixture
def agent(device_config):
    a = start_agent(device_config)
    yield a
    a.stop()
    a.device.close()


def wait_for(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def metric(agent: Agent, name: str) -> float:
    text = httpx.get(agent.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def sse_events(lines) -> list[str]:
    """Raw SSE data payloads, checking the framing: every event is `data: ...` then a blank line."""
    payloads, pending = [], None
    for line in lines:
        if line == "":
            assert pending is not None, "blank line without an event"
            payloads.append(pending)
            pending = None
        else:
            assert line.startswith("data: ") and pending is None, f"bad SSE line {line!r}"
            pending = line[len("data: "):]
    assert pending is None
    return payloads


# ---------------------------------------------------------------------------------------------------
# OpenAI API

def test_openai_client_chat_plain_and_streaming(agent):
    from openai import OpenAI

    client = OpenAI(base_url=agent.url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "moe" and {"alpha", "beta", "gamma", "plain", "slow", "tiny"} <= set(ids)

    messages = [{"role": "user", "content": "the python model"}]
    r = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert text.strip() and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # a new agent: nothing of alpha's prompt is cached yet

    # the prefix cache per expert shows in usage: alpha's prompt again, after beta ran, is read from its cache
    client.completions.create(model="beta", prompt="the python model", max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens

    stream = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text  # greedy: the stream says exactly what the plain answer said
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8

    # another expert on the same base answers differently (its adapter is applied)
    other = client.chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0)
    assert other.choices[0].message.content != text


def test_text_completion_sse_format_and_raw_prompt(agent):
    body = {"model": "tiny", "prompt": "the python model", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", agent.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        payloads = sse_events(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "tiny" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["text"] for c in chunks)

    plain = httpx.post(agent.url + "/v1/completions", json={**body, "stream": False}).json()
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"] == streamed
    # a raw completion is the same text the runtime gives for the raw prompt
    assert streamed == agent.device.rt.generate("tiny", "the python model", raw=True, max_tokens=6).text


def test_openai_client_text_completion_plain_and_streaming(agent):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=agent.url + "/v1", api_key="unused")
    r = client.completions.create(model="tiny", prompt="the python model", max_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="tiny", prompt="the python model", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    # a prompt longer than the context is refused with a 400 before any SSE starts, streamed or not
    with pytest.raises(BadRequestError, match="context holds 256"):
        list(client.completions.create(model="tiny", prompt="the " * 400, max_tokens=6, stream=True))


def test_model_moe_routes_by_keywords(agent):
    r = httpx.post(agent.url + "/v1/chat/completions", json={
        "model": "moe", "max_tokens": 5, "messages": [{"role": "user", "content": "how do I publish a rust crate with "
                                                                                  "cargo"}]})
    d = r.json()
    assert r.status_code == 200 and d["hublab"]["selected"][0]["name"] == "beta"
    assert d["choices"][0]["message"]["content"].strip() and d["usage"]["completion_tokens"] == 5

    body = {"model": "moe", "prompt": "pip install for python", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", agent.url + "/v1/completions", json=body) as s:
        payloads = sse_events(s.iter_lines())
    assert payloads[-1] == "[DONE]"
    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
    assert text.strip() == agent.device.rt.generate("alpha", "pip install for python", max_tokens=5).text.strip()


def test_request_errors_are_openai_shaped(agent):
    u = agent.url
    r = httpx.post(u + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "known:" in r.json()["error"]["message"] or "did you mean" in r.json()["error"]["message"]
    assert httpx.post(u + "/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.post(u + "/v1/chat/completions", json={"model": "alpha"}).status_code == 400
    r = httpx.post(u + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert httpx.get(u + "/v2/nothing").status_code == 404
    r = httpx.get(u + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert httpx.get(u + "/health").json()["status"] == "ok"  # and the agent still serves


def test_seed_tops_out_at_llama_cpps_32_bits_on_every_surface(agent, device_config):
    """One seed limit wherever a seed is given: OpenAI and Ollama requests, and ai config into system.toml and
    into a model's TOML; one past it is refused saying why (files: test_config.py)."""
    u, msg = agent.url, [{"role": "user", "content": "x"}]
    for seed, ok in ((SEED_MAX, True), (SEED_MAX + 1, False)):
        answers = {
            "openai": httpx.post(u + "/v1/chat/completions",
                                 json={"model": "alpha", "messages": msg, "max_tokens": 1, "seed": seed}),
            "ollama": httpx.post(u + "/api/chat", json={"model": "alpha", "messages": msg, "stream": False,
                                                        "options": {"num_predict": 1, "seed": seed}}),
            "ai config": httpx.post(u + "/hublab/config", json={"key": "seed", "value": seed}),
            "ai config alpha": httpx.post(u + "/hublab/config", json={"name": "alpha", "key": "seed", "value": seed}),
        }
        for surface, r in answers.items():
            assert r.status_code == (200 if ok else 400) and ("32-bit" in r.text) != ok, (surface, seed, r.text)
    assert load_system(device_config).inference == {"seed": SEED_MAX}
    assert agent.device.rt.config("alpha").inference.seed == SEED_MAX


# ---------------------------------------------------------------------------------------------------
# hublab API (/hublab/...)

def test_api_experts_load_unload_info_stats(agent):
    u = agent.url
    listing = httpx.get(u + "/hublab/experts").json()
    assert {m["name"] for m in listing["models"]} == {"alpha", "beta", "gamma", "plain", "slow", "tiny"}
    assert not any(m["loaded"] for m in listing["models"])
    d = httpx.post(u + "/hublab/load", json={"name": "alpha"}).json()
    assert d["loaded"] == ["tiny", "alpha"] and d["used"] > 0
    info = httpx.get(u + "/hublab/info", params={"name": "alpha"}).json()
    assert info["loaded"] and info["base"] == "tiny" and info["context_size"] == 256 and info["quant"] == "F32"
    assert info["estimate"]["total"] > 0 and info["memory"]["budget"] > 0
    runtime_info = httpx.get(u + "/hublab/info").json()
    assert runtime_info["profile"] == "host" and runtime_info["loaded"] == ["tiny", "alpha"]
    httpx.post(u + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 4})
    stats = httpx.get(u + "/hublab/stats").json()
    assert stats["experts"]["alpha"]["calls"] == 1 and stats["experts"]["alpha"]["tokens"] == 4
    assert stats["queue"] == {"waiting": 0, "running": 0, "capacity": 8}
    d = httpx.post(u + "/hublab/unload", json={"name": "tiny"}).json()
    assert set(d["unloaded"]) == {"tiny", "alpha"} and d["loaded"] == []
    r = httpx.post(u + "/hublab/load", json={"name": "alpah"})
    assert r.status_code == 404 and "did you mean 'alpha'" in r.json()["error"]["message"]
    assert httpx.post(u + "/hublab/load", json={}).status_code == 400


def test_api_route_settings_config_benchmark(agent, device_config):
    u = agent.url
    d = httpx.post(u + "/hublab/route", json={"query": "linux kernel modules"}).json()
    assert d["selected"][0]["name"] == "gamma" and len(d["scores"]) == 5
    assert abs(sum(s["score"] for s in d["scores"]) - 1) < 1e-6
    assert httpx.post(u + "/hublab/route", json={"query": "x", "routing": "topk:zero"}).status_code == 400

    assert httpx.get(u + "/hublab/settings").json()["routing"] == "topk:2"
    d = httpx.post(u + "/hublab/settings", json={"routing": "all", "synthesis": "concatenate"}).json()
    assert (d["routing"], d["synthesis"]) == ("all", "concatenate")
    saved = load_system(device_config)
    assert (saved.routing, saved.synthesis) == ("all", "concatenate")
    r = httpx.post(u + "/hublab/settings", json={"synthesis": "average"})
    assert r.status_code == 400 and "best" in r.json()["error"]["message"]
    assert load_system(device_config).synthesis == "concatenate"  # a bad value changes nothing

    d = httpx.post(u + "/hublab/config", json={"key": "keep_alive", "value": "10m"}).json()
    assert d["saved_to"] == str(device_config) and agent.device.rt.keep_alive == 600
    d = httpx.post(u + "/hublab/config", json={"name": "alpha", "key": "max_tokens", "value": 7}).json()
    assert d["model"] == "alpha" and agent.device.rt.config("alpha").inference.max_tokens == 7
    r = httpx.post(u + "/hublab/config", json={"key": "temprature", "value": 1})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]

    b = httpx.post(u + "/hublab/benchmark", json={"name": "beta", "max_tokens": 16}).json()
    assert b["name"] == "beta" and b["tokens"] == 16 and b["tokens_per_s"] > 0 and b["prompt_tokens_per_s"] > 0


def test_api_ask_streams_moe_events(agent):
    body = {"query": "python and rust", "routing": "topk:2", "synthesis": "best", "max_tokens": 4}
    events = []
    with httpx.stream("POST", agent.url + "/hublab/ask", json=body) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[0] == "route" and kinds[-1] == "done"
    assert kinds.count("expert_start") == 2 and kinds.count("expert_done") == 2 and "synth_start" in kinds
    result = events[-1][1]["result"]
    assert {s["name"] for s in result["selected"]} == {"alpha", "beta"}
    assert result["answer"] == "".join(d["text"] for k, d in events if k == "answer_token")


def test_metrics_count_requests_tokens_and_memory(agent):
    httpx.post(agent.url + "/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 5})
    httpx.get(agent.url + "/nowhere")
    text = httpx.get(agent.url + "/metrics").text
    assert 'hublab_requests_total{path="/v1/completions",code="200"} 1' in text
    assert 'hublab_requests_total{path="other",code="404"} 1' in text
    assert 'hublab_generated_tokens_total{expert="gamma"} 5' in text
    assert metric(agent, "hublab_tokens_per_second") > 0
    assert metric(agent, "hublab_model_memory_bytes") > 0 and metric(agent, "hublab_resident_memory_bytes") > 0
    assert metric(agent, "hublab_queue_depth") == 0
    for line in text.splitlines():  # valid exposition format: comments or `name{labels} number`
        assert line.startswith("# ") or float(line.rsplit(" ", 1)[1]) >= 0


# ---------------------------------------------------------------------------------------------------
# auth, queue, cancellation

def test_token_required_when_set(device_config):
    from openai import AuthenticationError, OpenAI

    a = start_agent(device_config, token="s3cret")
    try:
        r = httpx.get(a.url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(a.url + "/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(a.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=a.url + "/v1", api_key="wrong").models.list()
        ok = OpenAI(base_url=a.url + "/v1", api_key="s3cret").completions.create(model="tiny", prompt="x", max_tokens=3)
        assert ok.usage.completion_tokens == 3
    finally:
        a.stop()
        a.device.close()


def test_non_loopback_bind_needs_a_token(device_config):
    device = Device(Runtime(system=load_system(device_config)))
    with pytest.raises(HublabError, match="without a token"):
        Agent(device, host="0.0.0.0", port=0)
    a = Agent(device, host="0.0.0.0", port=0, token="t")  # with one it listens
    a.server.server_close()
    # and the command refuses to start, with one line naming the setting
    env = {**os.environ, "HUBLAB_CONFIG": str(device_config)}
    env.pop("HUBLAB_TOKEN", None)
    p = subprocess.run([HUBLAB, "serve", "--host", "0.0.0.0", "--port", "0"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "[agent] token" in p.stderr


def test_queue_full_answers_503_with_retry_after(device_config):
    a = start_agent(device_config, queue_size=1)
    rt = a.device.rt
    codes: dict[str, int] = {}

    def ask(key):
        r = httpx.post(a.url + "/v1/completions", json={"model": "alpha", "prompt": key, "max_tokens": 4}, timeout=60)
        codes[key] = r.status_code

    try:
        with rt.hold("alpha"):  # the base is busy: the first request runs into it, the second queues
            first = threading.Thread(target=ask, args=("first",))
            first.start()
            wait_for(lambda: a.gate.running == 1, what="first request running")
            second = threading.Thread(target=ask, args=("second",))
            second.start()
            wait_for(lambda: a.gate.waiting == 1, what="second request queued")
            r = httpx.post(a.url + "/v1/chat/completions", json={
                "model": "beta", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert metric(a, "hublab_queue_depth") == 1 and metric(a, "hublab_rejected_total") == 1
        first.join(30)
        second.join(30)
        assert codes == {"first": 200, "second": 200}  # the queued ones are served once the base frees
    finally:
        a.stop()
        a.device.close()


def test_disconnect_mid_stream_cancels_generation(agent):
    body = {"model": "slow", "prompt": "the python model", "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", agent.url + "/v1/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving the block closes the connection mid-answer
    wait_for(lambda: "slow" in agent.device.rt.stats and agent.gate.running == 0, what="generation to end")
    assert agent.device.rt.stats["slow"].tokens < 3000
    assert metric(agent, "hublab_cancelled_total") == 1


def test_disconnect_while_queued_gives_up_the_place(agent):
    rt = agent.device.rt
    codes = []
    payload = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 4}).encode()
    with rt.hold("alpha"):  # keeps the base busy: the first request runs into it, the raw one queues
        first = threading.Thread(target=lambda: codes.append(httpx.post(
            agent.url + "/v1/completions", json={"model": "alpha", "prompt": "y", "max_tokens": 4}).status_code))
        first.start()
        wait_for(lambda: agent.gate.running == 1, what="first request running")
        sock = socket.create_connection(("127.0.0.1", agent.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        wait_for(lambda: agent.gate.waiting == 1, what="raw request queued")
        sock.close()
        wait_for(lambda: agent.gate.waiting == 0, what="raw request to give up its place")
        assert metric(agent, "hublab_cancelled_total") == 1
    first.join(30)
    assert codes == [200]
    assert rt.stats["alpha"].calls == 1  # only the first request generated


def test_idle_models_expire(tmp_path, tiny_gguf, tiny_adapters, long_gguf):
    config = write_device(tmp_path / "k", tiny_gguf, tiny_adapters, long_gguf, keep_alive="1s")
    a = start_agent(config)
    try:
        httpx.post(a.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert httpx.get(a.url + "/health").json()["loaded"] == ["tiny", "alpha"]
        wait_for(lambda: httpx.get(a.url + "/health").json()["loaded"] == [], timeout=10, what="idle unload")
    finally:
        a.stop()
        a.device.close()


# ---------------------------------------------------------------------------------------------------
# the command

def test_hublab_serve_process_answers_and_stops_on_sigterm(device_config):
    env = {**os.environ, "HUBLAB_CONFIG": str(device_config)}
    p = subprocess.Popen([HUBLAB, "serve", "--port", "0", "--quiet"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        banner = p.stdout.readline()
        assert banner.startswith("hublab agent") and "profile host" in banner
        url = banner.split(" on ", 1)[1].split(" ", 1)[0]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        r = httpx.post(url + "/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 3})
        assert r.json()["usage"]["completion_tokens"] == 3
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_systemd_unit_runs_hublab_serve(tmp_path):
    import shutil

    unit = Path(__file__).parents[1] / "packaging" / "hublab-agent.service"
    text = unit.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[1:] == ["serve", "--quiet"]
    assert "Environment=HUBLAB_CONFIG=" in text and "EnvironmentFile=-/etc/hublab/agent.env" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify the unit as written, with ExecStart pointed at this checkout's command (it must exist)
    copy = tmp_path / "hublab-agent.service"
    copy.write_text(text.replace(exec_start.split("=", 1)[1].split()[0], HUBLAB))
    p = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_load_bench_reports_served_rejected_and_rss(device_config):
    script = Path(__file__).parents[1] / "bench" / "agent_load.py"
    p = subprocess.run([sys.executable, str(script), "--config", str(device_config), "--model", "alpha",
                        "--clients", "6", "--requests", "24", "--seconds", "60", "--queue-size", "1",
                        "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["requests_sent"] == 24 and doc["errors"] == 0
    assert doc["served"] + doc["rejected_503"] == 24 and doc["served"] >= 2
    assert doc["rejected_503"] == doc["agent_rejected_total"]
    assert doc["completion_tokens"] == 8 * doc["served"]
    assert doc["rss_after_first_answer"] > doc["rss_before"] > 0 and doc["rss_after"] > 0  # the model loaded


def test_one_loopback_rule_for_the_agent_and_the_webui():
    """"localhost" and loopback addresses only: a name that resolves to loopback today still needs a token."""
    from hublab.runtime.serve import agent as agent_module
    from hublab.runtime.inputs import is_loopback
    from hublab.trainer import webui

    assert agent_module.is_loopback is is_loopback and webui.is_loopback is is_loopback
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "ip6-localhost", "pi.local", ""))


def test_the_agent_is_the_server_requests_see(agent):
    """http_common's request code knows the agent only as its Server protocol (no import of the agent back)."""
    from protocols import protocol_members, signature_problems

    from hublab.runtime.serve import http_common
    from hublab.runtime.serve.agent import Agent

    methods, attrs = protocol_members(http_common.Server)
    assert {"observe", "retry_after"} <= set(methods) and all(hasattr(agent, a) for a in attrs)
    set_in_init = {f"Agent has no {a}" for a in attrs}  # instance attributes: checked on the instance above
    assert [p for p in signature_problems(http_common.Server, Agent) if p not in set_in_init] == []
    assert "agent" not in http_common.__dict__ and "Agent" not in http_common.__dict__
