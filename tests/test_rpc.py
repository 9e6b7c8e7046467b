"""One base across RPC workers (llama.cpp's ggml-rpc) on loopback: real `hublab rpc-worker` processes, the gemma
base and the demo adapters, a worker killed mid-answer, a worker of another protocol version, the bind rule.

Needs llama.cpp's RPC server and client built (`hublab rpc-worker --build`; scripts/test does it): without them
these tests fail rather than pass unseen."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ggufs import write_model_toml
from hublab.runtime.config import ConfigError, load_model
from hublab.runtime.engine.llamacpp import rpc_protocol, tool_path
from hublab.runtime.engine.rpc import ProtocolMismatch, RpcError, check_worker, hello
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError
from hublab.runtime.serve.agent import Agent
from hublab.runtime.serve.device import Device
from hublab.runtime.config import load_system

HUBLAB = str(Path(sys.executable).parent / "hublab")
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
ADAPTERS = ["python", "rust", "system", "ai", "general"]
PROMPTS = {"python": "What does the with statement do?", "rust": "What is a trait object?",
           "system": "What does chmod +x do?", "ai": "What is a learning rate?", "general": "Why is the sky blue?"}


@pytest.fixture(scope="module", autouse=True)
def rpc_tools():
    missing = [t for t in ("rpc-server", "rpc-client") if tool_path(t) is None]
    if missing:
        pytest.fail(f"llama.cpp's {', '.join(missing)} not built; run `hublab rpc-worker --build` (scripts/test does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """`hublab rpc-worker` on a loopback port (the process becomes ggml's RPC server)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([HUBLAB, "rpc-worker", "--port", str(self.port), "--threads", "1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 30
        while True:
            try:
                hello(self.endpoint, timeout=2)
                return
            except RpcError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def workers():
    pair = [Worker(), Worker()]
    yield pair
    for w in pair:
        w.kill()


def split_models(root: Path, gemma: Path, endpoints: list[str]) -> Path:
    """The gemma base twice (local, and split over `endpoints`), each demo adapter as an expert on both."""
    models = root / "models"
    models.mkdir(parents=True)
    rpc = json.dumps(endpoints)
    write_model_toml(models / "gemma.toml", "gemma", gguf_path=gemma, context_size=256)
    write_model_toml(models / "split.toml", "split", gguf_path=gemma, context_size=256)
    text = (models / "split.toml").read_text().replace('type = "base"', f'type = "base"\nrpc = {rpc}')
    (models / "split.toml").write_text(text)
    for name in ADAPTERS:
        write_model_toml(models / f"{name}.toml", name, base="gemma", adapter=DEMO / f"{name}.gguf")
        write_model_toml(models / f"{name}-split.toml", f"{name}-split", base="split", adapter=DEMO / f"{name}.gguf")
    return models


def test_split_base_answers_as_the_unsplit_one_with_each_demo_adapter(tmp_path, gemma_gguf, workers):
    models = split_models(tmp_path, gemma_gguf, [w.endpoint for w in workers])
    # pi4-8gb: weights in plain CPU buffers, as ggml's RPC server keeps them (a repacked local base runs other
    # kernels, whose rounding flips a 270M model's greedy near-ties)
    with Runtime(models_dir=models, profile="pi4-8gb", threads=1, keep_alive=-1) as rt:
        local = {n: rt.generate(n, PROMPTS.get(n, "What is a list comprehension?"), max_tokens=24).text
                 for n in ["gemma", *ADAPTERS]}
        mix = {"python": 0.5, "rust": 0.5}  # weighted synthesis: one answer from both adapters' distributions
        local["mixture"] = "".join(rt.mixture_stream(mix, PROMPTS["rust"], max_tokens=12, temperature=0))
        rt.unload("gemma")
        split = {}
        for n in ["gemma", *ADAPTERS]:
            name = "split" if n == "gemma" else f"{n}-split"
            r = rt.generate(name, PROMPTS.get(n, "What is a list comprehension?"), max_tokens=24)
            split[n] = r.text
            assert r.tokens > 0 and r.expert == name
        split["mixture"] = "".join(rt.mixture_stream({f"{n}-split": w for n, w in mix.items()}, PROMPTS["rust"],
                                                     max_tokens=12, temperature=0))
        child = rt._loaded["split"].proc.pid
        assert all(rt.is_loaded(f"{n}-split") for n in ADAPTERS)  # hot-swapped on one split base, no reload
        assert rt.generate("python-split", PROMPTS["python"], max_tokens=8).tokens > 0
        assert rt._loaded["split"].proc.pid == child
        rt.set_threads(2)  # `ai config threads` reaches the process that decodes the split base
        assert rt.generate("python-split", PROMPTS["python"], max_tokens=4).threads == 2
        rt.set_threads(1)

        # fit-before-load counts this board's share: the embeddings and logits, not the layers the workers hold
        whole, share = rt.plan("gemma").estimate, rt.plan("split").estimate
        assert share.kv_cache == 0 and share.weights < whole.weights and share.total < whole.total
        info = Device(rt).info("python-split")
        assert [w["endpoint"] for w in info["split"]["workers"]] == [w.endpoint for w in workers]
        assert [w["share"] for w in info["split"]["workers"]] == [0.5, 0.5]
    assert split == local


def test_worker_killed_mid_answer_fails_that_answer_only(tmp_path, gemma_gguf, tiny_gguf, tiny_adapters):
    first, second = Worker(), Worker()
    try:
        models = split_models(tmp_path, gemma_gguf, [first.endpoint, second.endpoint])
        write_model_toml(models / "tiny.toml", "tiny", gguf_path=tiny_gguf, context_size=128)
        write_model_toml(models / "plain.toml", "plain", base="tiny")
        config = tmp_path / "system.toml"
        config.write_text(f'[runtime]\nmodels_dir = "{models}"\nprofile = "host"\nthreads = 1\nkeep_alive = "-1"\n'
                          '\n[moe]\nfallback = "plain"\n')
        agent = Agent(Device(Runtime(system=load_system(config))), port=0, quiet=True).start()
        try:
            url = agent.url + "/v1/chat/completions"
            assert httpx.post(url, json={"model": "plain", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 4}, timeout=60).status_code == 200
            frames = []
            body = {"model": "python-split", "messages": [{"role": "user", "content": "Tell me about Python."}],
                    "max_tokens": 400, "stream": True, "temperature": 0}
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        frames.append(json.loads(line[6:]))
                        if len(frames) == 3:
                            first.kill()
            errors = [f["error"]["message"] for f in frames if "error" in f]
            assert len(errors) == 1 and "\n" not in errors[0], frames[-2:]
            assert first.endpoint in errors[0] and "went away" in errors[0]
            # the agent stays up and its other experts answer
            assert httpx.get(agent.url + "/health", timeout=10).json()["status"] == "ok"
            r = httpx.post(url, json={"model": "plain", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 4}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
            # while the worker is away the split base answers with a one-line error, at once
            r = httpx.post(url, json={"model": "python-split", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 4}, timeout=60)
            assert r.status_code == 503 and r.headers["Retry-After"] and first.endpoint in r.json()["error"]["message"]
            # back on its port: the next request loads the split base again
            first = Worker(first.port)
            r = httpx.post(url, json={"model": "python-split", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 4}, timeout=120)
            assert r.status_code == 200, r.text
        finally:
            agent.stop()
            agent.device.close()
    finally:
        first.kill()
        second.kill()


def test_worker_stalled_mid_answer_ends_it_at_the_stall_limit(tmp_path, gemma_gguf, monkeypatch):
    # SIGSTOP: the worker's sockets stay open and it says nothing more, as when a link stalls without closing
    from hublab.runtime.engine import split

    monkeypatch.setattr(split, "STALL_S", 2.0)
    first, second = Worker(), Worker()
    try:
        models = split_models(tmp_path, gemma_gguf, [first.endpoint, second.endpoint])
        with Runtime(models_dir=models, profile="host", threads=1, keep_alive=-1) as rt:
            pieces = []
            t0 = None
            with pytest.raises(RpcError) as err:
                for piece in rt.stream("python-split", "Tell me about Python.", max_tokens=400, temperature=0):
                    pieces.append(piece)
                    if len(pieces) == 3:
                        os.kill(first.proc.pid, signal.SIGSTOP)
                        t0 = time.monotonic()
            assert t0 is not None and time.monotonic() - t0 < 20
            message = str(err.value)
            assert "\n" not in message and "stalled" in message and first.endpoint in message, message
            assert rt.generate("python", "hi", max_tokens=2).tokens > 0  # the local base is not affected
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.proc.pid, signal.SIGCONT)
        first.kill()
        second.kill()


class FakeWorker:
    """A socket that answers ggml-rpc's HELLO with another protocol version, then hangs up."""

    def __init__(self, version: tuple[int, int, int]):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.version = version
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(9)
                if len(head) == 9 and head[0] == 14:
                    conn.recv(struct.unpack("<Q", head[1:])[0])
                    conn.sendall(struct.pack("<Q", 28) + bytes([*self.version, 0]) + bytes(24))


def test_a_worker_of_another_protocol_version_is_refused_naming_both(tmp_path, gemma_gguf, workers):
    fake = FakeWorker((6, 1, 0))
    ours = ".".join(map(str, rpc_protocol()))
    with pytest.raises(ProtocolMismatch) as caught:
        check_worker(fake.endpoint, rpc_protocol())
    assert "6.1.0" in str(caught.value) and ours in str(caught.value)
    models = split_models(tmp_path, gemma_gguf, [workers[0].endpoint, fake.endpoint])
    with Runtime(models_dir=models, profile="host", threads=1) as rt:
        with pytest.raises(HublabError, match="6.1.0"):
            rt.generate("python-split", "hi", max_tokens=2)
        assert rt.generate("python", "hi", max_tokens=2).tokens > 0  # the local base is not affected
        assert not rt.is_loaded("split")
    fake.sock.close()


def test_worker_binds_loopback_and_refuses_other_addresses_without_the_flag():
    p = subprocess.run([HUBLAB, "rpc-worker", "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no authentication" in lines[0] and "--allow-remote" in lines[0]
    port = free_port()
    w = Worker(port)  # the default address is loopback
    try:
        assert check_worker(w.endpoint, rpc_protocol()) == rpc_protocol()
        held = subprocess.run([HUBLAB, "rpc-worker", "--port", str(port)], capture_output=True, text=True, timeout=60)
        assert held.returncode == 1 and str(port) in held.stderr and len(held.stderr.strip().splitlines()) == 1
    finally:
        w.kill()


@pytest.mark.parametrize("lines, says", [
    ('rpc = ["pi2"]', "is not host:port"),
    ('rpc = ["pi2:50052", "pi2:50052"]', "listed twice"),
    ('rpc = ["pi2:50052"]\ntensor_split = [1, 2]', "2 shares for 1 rpc workers"),
    ('tensor_split = [1]', "shares without rpc workers"),
    ('rpc = ["pi2:50052", "pi3:50052"]\ntensor_split = [0, 0]', "every share is 0"),
    ('rpc = ["pi2:50052"]\ntensor_split = [-1]', "not a share"),
])
def test_rpc_keys_are_checked_with_file_key_and_fix(tmp_path, lines, says):
    path = tmp_path / "base.toml"
    path.write_text(f'[model]\nname = "base"\npath = "base.gguf"\n{lines}\n')
    with pytest.raises(ConfigError) as caught:
        load_model(path)
    msg = str(caught.value)
    assert says in msg and str(path) in msg and "\n" not in msg


def test_rpc_on_an_adapter_expert_points_at_its_base(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text('[model]\nname = "e"\nrpc = ["pi2:50052"]\n\n[expert]\nbase = "gemma"\nadapter = "a.gguf"\n')
    with pytest.raises(ConfigError, match="put rpc in the TOML of base 'gemma'|put rpc in the TOML of base"):
        load_model(path)


def test_worker_card_and_its_systemd_unit(tmp_path):
    card = tmp_path / "card"
    p = subprocess.run([HUBLAB, "deploy", "--to", str(card), "--worker", "--profile", "pi5-8gb", "--worker-host",
                        "10.0.0.2"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no authentication" in p.stderr and not card.exists()
    p = subprocess.run([HUBLAB, "deploy", "--to", str(card), "--worker", "--profile", "pi5-8gb", "--worker-host",
                        "10.0.0.2", "--allow-remote", "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["profile"] == "pi5-8gb" and load_system(card / "system.toml").profile == "pi5-8gb"
    env = (card / "rpc-worker.env").read_text()
    assert "HUBLAB_RPC_HOST=10.0.0.2" in env and "HUBLAB_RPC_FLAGS=--allow-remote" in env
    unit = (Path(__file__).resolve().parents[1] / "packaging" / "hublab-rpc-worker.service").read_text()
    start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert start.split("=", 1)[1].split()[1:3] == ["rpc-worker", "--host"] and "rpc-worker.env" in unit


def test_profile_shows_a_split_base_by_board(tmp_path, gemma_gguf):
    models = split_models(tmp_path, gemma_gguf, ["pi2:50052", "pi3:50052"])
    (tmp_path / "system.toml").write_text(f'[runtime]\nmodels_dir = "{models}"\n')
    env = {**os.environ, "HUBLAB_CONFIG": str(tmp_path / "system.toml")}
    p = subprocess.run([HUBLAB, "--profile", "pi5-8gb", "profile", "--json"], capture_output=True, text=True,
                       env=env, timeout=60)
    doc = json.loads(p.stdout)["split_bases"]
    assert [s["name"] for s in doc] == ["split"]
    assert [w["endpoint"] for w in doc[0]["workers"]] == ["pi2:50052", "pi3:50052"]
    assert doc[0]["local"]["kv_cache"] == 0 and all(w["bytes"] > 0 for w in doc[0]["workers"])
