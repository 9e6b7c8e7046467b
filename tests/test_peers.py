"""Experts on several boards (runtime/engine/peers.py): a front `hublab serve` routing to experts on other servers, all
real processes on loopback. Peers: `hublab serve` agents over tiny real GGUF experts (the hublab API, and the same
agent's Ollama API as an Ollama-kind peer), llama.cpp's own llama-server as an OpenAI-kind peer, and small HTTP
servers written here for what a real server should never do (drip, not JSON, too big, redirect elsewhere).
Faults: a peer killed with SIGKILL mid-answer, a peer that is down and comes back, a wrong token, a deadline."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from ggufs import write_tiny_llama
from hublab.runtime.config import ConfigError, load_model, load_system, scan_models
from hublab.runtime.engine.peers import Peers
from hublab.runtime.paths import EMBEDDED_MODELS_DIR

HUBLAB = str(Path(sys.executable).parent / "hublab")
PEER_TOKEN = "peer-secret-7f3a9c"  # must never show in anything the front says
PY_EXAMPLES = ["how do I install a package with pip", "what is a python list comprehension",
               "how do python decorators work", "create a virtualenv for my python project",
               "what does the python asyncio event loop do", "read a csv file with pandas"]
BAKE_EXAMPLES = ["how long do I bake sourdough bread", "what temperature to bake a cake",
                 "why did my bread not rise", "how to knead dough by hand", "proofing yeast for pizza dough",
                 "best flour for baking baguettes"]
PY_QUESTION = "how do I install numpy with pip in a python virtualenv"
BAKE_QUESTION = "how long should I knead bread dough before baking it"


# ---------------------------------------------------------------------------------------------------
# servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_toml(path: Path, name: str, body: str) -> Path:
    path.write_text(f'[model]\nname = "{name}"\ntype = "expert"\n\n[inference]\ntemperature = 0.0\nmax_tokens = 12\n\n'
                    f"[expert]\n{body}")
    return path


def peer_models(root: Path, tiny: Path, adapters: dict[str, Path], long_gguf: Path) -> Path:
    """A peer's models: base tiny; alpha (domain python, examples), baker (a domain the front's router has no output
    for: routed by its examples), slow (a long answer to kill mid-way)."""
    models = root / "models"
    models.mkdir(parents=True)
    (models / "tiny.toml").write_text(f'[model]\nname = "tiny"\npath = "{tiny}"\n\n[inference]\ncontext_size = 512\n')
    expert_toml(models / "alpha.toml", "alpha", f'domain = "python"\nbase = "tiny"\nadapter = "{adapters["alpha"]}"\n'
                f'keywords = ["pip"]\nexamples = {json.dumps(PY_EXAMPLES)}\n')
    expert_toml(models / "baker.toml", "baker", f'base = "tiny"\nadapter = "{adapters["beta"]}"\n'
                f'examples = {json.dumps(BAKE_EXAMPLES)}\n')
    (models / "slow.toml").write_text(f'[model]\nname = "slow"\ntype = "expert"\npath = "{long_gguf}"\n\n[inference]\n'
                                      'temperature = 0.0\nmax_tokens = 3000\ncontext_size = 4096\n\n[expert]\n'
                                      'examples = ["tell me a very long story"]\n')
    system = root / "system.toml"
    system.write_text(f'[runtime]\nmodels_dir = "{models}"\nprofile = "host"\nthreads = 1\n\n'
                      '[moe]\nfallback = "alpha"\n')
    return system


def front_system(root: Path, tiny: Path, peers: list[dict], experts: dict[str, str] | None = None,
                 routing: str = "topk:2", synthesis: str = "best") -> Path:
    """The front: one local expert (general, the fallback) on tiny, the embedded router, and [[peer]] tables."""
    models = root / "front-models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "tiny.toml").write_text(f'[model]\nname = "tiny"\npath = "{tiny}"\n\n[inference]\ncontext_size = 512\n')
    expert_toml(models / "general.toml", "general", 'domain = "general"\nbase = "tiny"\n')
    for name, body in (experts or {}).items():
        expert_toml(models / f"{name}.toml", name, body)
    lines = ["[runtime]", f'models_dir = "{models}"', 'profile = "host"', "threads = 1", "",
             "[moe]", 'fallback = "general"', f'router = "{EMBEDDED_MODELS_DIR / "router"}"', f'routing = "{routing}"',
             f'synthesis = "{synthesis}"', "sure = 1.0"]
    for peer in peers:
        lines += ["", "[[peer]]"] + [f"{k} = {json.dumps(v)}" for k, v in peer.items()]
    path = root / "front.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Serve:
    """A `hublab serve` process; `url` from its banner; `log` its stderr so far."""

    def __init__(self, config: Path, port: int = 0, token: str = "", env: dict | None = None):
        self.config, self.port_asked, self.token, self.extra = config, port, token, env or {}
        self.start()

    def start(self) -> None:
        env = {**os.environ, "HUBLAB_CONFIG": str(self.config), **self.extra}
        env.pop("HUBLAB_TOKEN", None)
        if self.token:
            env["HUBLAB_TOKEN"] = self.token
        self.errfile = open(self.config.with_suffix(f".{time.monotonic_ns()}.err"), "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([HUBLAB, "serve", "--port", str(self.port_asked)], env=env,
                                     stdout=subprocess.PIPE, stderr=self.errfile, text=True)
        banner = self.proc.stdout.readline()
        assert banner.startswith("hublab agent"), banner + self.log
        self.url = banner.split(" on ", 1)[1].split(" ", 1)[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.port_asked = self.port  # a restart comes back on the same port

    @property
    def log(self) -> str:
        self.errfile.flush()
        return Path(self.errfile.name).read_text()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def long_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("long") / "long.gguf", n_ctx=4096)


@pytest.fixture(scope="module")
def den(tmp_path_factory, tiny_gguf, tiny_adapters, long_gguf):
    """A hublab peer with a token."""
    root = tmp_path_factory.mktemp("den")
    s = Serve(peer_models(root, tiny_gguf, tiny_adapters, long_gguf), token=PEER_TOKEN)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory, tiny_gguf, den):
    """The front: its own general expert, den as a hublab peer (api probed), den's Ollama API as an Ollama peer with
    one expert TOML on it."""
    root = tmp_path_factory.mktemp("front")
    config = front_system(root, tiny_gguf, [
        {"name": "den", "url": den.url, "token_env": "HUBLAB_PEER_DEN"},
        {"name": "olla", "url": den.url, "token_env": "HUBLAB_PEER_DEN", "api": "ollama"}],
        experts={"baker-ollama": f'peer = "olla"\nmodel = "baker"\nexamples = {json.dumps(BAKE_EXAMPLES[:3])}\n'})
    s = Serve(config, env={"HUBLAB_PEER_DEN": PEER_TOKEN})
    yield s
    s.stop()
    assert PEER_TOKEN not in s.log


def chat(url: str, model: str, question: str, stream: bool = True, timeout: float = 60, **extra) -> tuple[list, dict]:
    """An OpenAI chat answer: (content pieces, the last JSON document: the whole answer or an error)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": stream,
            "max_tokens": 12, "temperature": 0, **extra}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
        return [], r.json() | {"status": r.status_code}
    pieces, last = [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code >= 400:
            r.read()
            return [], r.json() | {"status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            last = doc
            for choice in doc.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    pieces.append(choice["delta"]["content"])
    return pieces, last


# ---------------------------------------------------------------------------------------------------
# config

def test_peer_tables_and_remote_expert_tomls_are_checked(tmp_path):
    def system(text: str) -> str:
        path = tmp_path / "s.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_system(path)
        return str(e.value)

    ok = tmp_path / "ok.toml"
    ok.write_text('[[peer]]\nname = "den"\nurl = "http://192.168.1.20:8780/"\ntoken_env = "HUBLAB_PEER_DEN"\n\n'
                  '[[peer]]\nname = "gpu"\nurl = "http://desk:11434"\napi = "ollama"\ndeadline = "5m"\n')
    den, gpu = load_system(ok).peers
    assert (den.name, den.url, den.api, den.deadline, den.probe_timeout) == ("den", "http://192.168.1.20:8780", "",
                                                                               120.0, 1.0)
    assert (gpu.api, gpu.deadline) == ("ollama", 300.0)
    assert "write [[peer]] (two brackets)" in system('[peer]\nname = "den"\nurl = "http://x:1"\n')
    assert "s.toml:4: [[peer]] #2 urll: unknown key; did you mean 'url'" in system(
        '[[peer]]\nname = "a"\nurl = "http://x:1"\n[[peer]]\nname = "b"\nurll = "http://x:2"\n')
    assert "never the URL" in system('[[peer]]\nname = "a"\nurl = "http://user:pw@x:1"\n')
    assert "not an http(s) URL" in system('[[peer]]\nname = "a"\nurl = "ftp://x"\n')
    assert "names two peers" in system('[[peer]]\nname = "a"\nurl = "http://x:1"\n[[peer]]\nname = "a"\n'
                                       'url = "http://x:2"\n')
    assert "never the token itself" in system('[[peer]]\nname = "a"\nurl = "http://x:1"\ntoken_env = "s3cr3t!"\n')
    assert "expected one of" in system('[[peer]]\nname = "a"\nurl = "http://x:1"\napi = "grpc"\n')
    assert "deadline" in system('[[peer]]\nname = "a"\nurl = "http://x:1"\ndeadline = "0s"\n')
    assert "name of up to 64" in system('[[peer]]\nname = "a@b"\nurl = "http://x:1"\n')

    models = tmp_path / "models"
    models.mkdir()
    remote = expert_toml(models / "big.toml", "big", 'peer = "gpu"\nmodel = "llama3.1:8b"\n')
    cfg = load_model(remote)
    assert (cfg.peer, cfg.peer_model, cfg.is_expert, cfg.path) == ("gpu", "llama3.1:8b", True, None)
    bad = expert_toml(tmp_path / "bad.toml", "bad", 'peer = "gpu"\nbase = "tiny"\n')
    with pytest.raises(ConfigError, match=r"bad.toml:\d+: \[expert\] base: an expert on peer 'gpu' runs there"):
        load_model(bad)
    bad.write_text(bad.read_text().replace('peer = "gpu"\n', 'model = "x"\n'))
    with pytest.raises(ConfigError, match="model names a model on a peer"):
        load_model(bad)
    # a TOML naming a peer system.toml does not have: the file is reported, the rest loads
    catalog = Peers(load_system(ok).peers[:1], source=ok).attach(scan_models(models), discover=False)
    assert "big" not in catalog.models
    assert any("big.toml: [expert] peer: no [[peer]] named 'gpu'" in e for e in catalog.errors)


class Misbehaving(BaseHTTPRequestHandler):
    """What a broken or hostile server does, by `mode`: drip (an SSE answer, one word every 0.3 s, never ending),
    html (not JSON), huge (a 6 MiB JSON document), away (a redirect to another host), and it records the
    Authorization headers it is sent."""
    mode = "drip"
    seen_auth: list = []
    spans: list = []  # slow: (start, end) of each answer, monotonic seconds

    def log_message(self, *args) -> None:
        pass

    def _reply(self) -> None:
        self.seen_auth.append(self.headers.get("Authorization"))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        mode = self.mode
        if mode == "away":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2:9/v1/models")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "html":
            body = b"<html><body>router login</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode == "huge":
            body = json.dumps({"data": [{"id": "x" * 1000}] * 6000}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode == "stall" and self.command == "POST":  # two words, then silence on an open connection
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for word in (" one", " two"):
                chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            time.sleep(20)
        elif mode == "slow" and self.command == "POST":  # a finite answer, one word every 0.25 s
            start = time.monotonic()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for n in range(6):
                chunk = {"choices": [{"index": 0, "delta": {"content": f" w{n}"},
                                      "finish_reason": "stop" if n == 5 else None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.25)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.spans.append((start, time.monotonic()))
        elif self.command == "GET":  # drip: a well-behaved model list, then a never-ending answer
            body = json.dumps({"object": "list", "data": [{"id": "drip"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            try:
                for _ in range(2000):
                    chunk = {"choices": [{"index": 0, "delta": {"content": " drip"}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass

    do_GET = do_POST = _reply


@pytest.fixture
def misbehaving():
    servers = []

    def start(mode: str) -> str:
        handler = type(f"Mode_{mode}", (Misbehaving,), {"mode": mode, "seen_auth": [], "spans": []})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------------------------------
# a front and its peers

def test_remote_experts_are_listed_with_where_they_run_and_whether_up(front, den):
    models = httpx.get(front.url + "/v1/models").json()["data"]
    where = {m["id"]: m["hublab"].get("where") for m in models}
    assert {"alpha@den", "baker@den", "slow@den"} <= set(where) and where["general"] == "here"
    assert where["alpha@den"] == "den" and where["baker-ollama"] == "olla"
    alpha = next(m for m in models if m["id"] == "alpha@den")
    assert alpha["hublab"]["up"] is True and alpha["hublab"]["api"] == "hublab" and alpha["owned_by"] == "den"
    tags = {m["name"]: m for m in httpx.get(front.url + "/api/tags").json()["models"]}
    assert tags["alpha@den"]["hublab"] == {"where": "den", "up": True, "model": "alpha"}
    assert tags["baker-ollama"]["details"]["format"] == "ollama" and tags["general"]["hublab"]["where"] == "here"
    listing = httpx.get(front.url + "/hublab/experts").json()
    assert {p["name"]: p["up"] for p in listing["peers"]} == {"den": True, "olla": True}
    # the shell's `ai list` and `moe route` over the same agent show it too
    out = subprocess.run([HUBLAB, "shell", "--remote", front.url, "-c", "ai list"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("alpha@den"))
    assert "den" in line.split()[1:] and "up" in line


def test_questions_route_to_remote_experts_and_stream_through(front, den):
    route = httpx.post(front.url + "/hublab/route", json={"query": PY_QUESTION}).json()
    assert route["selected"][0]["name"] == "alpha@den", route["scores"][:3]
    assert route["where"]["alpha@den"]["where"] == "den" and route["where"]["general"]["where"] == "here"
    bake = httpx.post(front.url + "/hublab/route", json={"query": BAKE_QUESTION}).json()
    assert bake["selected"][0]["name"] in ("baker@den", "baker-ollama"), bake["scores"][:3]  # by examples alone
    # asked directly of the peer, and through the front (by name, and routed): the same greedy words, streamed
    with httpx.stream("POST", den.url + "/v1/chat/completions", headers=den.headers(), timeout=60, json={
            "model": "alpha", "messages": [{"role": "user", "content": PY_QUESTION}], "max_tokens": 12,
            "temperature": 0, "stream": True}) as r:
        direct = [json.loads(x[6:])["choices"][0]["delta"].get("content") or "" for x in r.iter_lines()
                  if x.startswith("data: {") and json.loads(x[6:]).get("choices")]
    pieces, last = chat(front.url, "alpha@den", PY_QUESTION)
    assert "".join(pieces) == "".join(direct) and len(pieces) > 3
    assert last["choices"][0]["finish_reason"] == "length"
    pieces, _ = chat(front.url, "moe", PY_QUESTION, hublab={"routing": "single"})
    assert "".join(pieces).strip() == "".join(direct).strip() and len(pieces) > 3
    _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, hublab={"routing": "single"})
    assert whole["hublab"]["chosen"] == "alpha@den"


def test_ollama_kind_peer_answers_over_ndjson(front, den):
    direct = httpx.post(den.url + "/api/chat", headers=den.headers(), timeout=60, json={
        "model": "baker", "messages": [{"role": "user", "content": BAKE_QUESTION}], "stream": False,
        "options": {"num_predict": 10, "temperature": 0}}).json()["message"]["content"]
    lines = []
    with httpx.stream("POST", front.url + "/api/chat", timeout=60, json={
            "model": "baker-ollama", "messages": [{"role": "user", "content": BAKE_QUESTION}],
            "options": {"num_predict": 10, "temperature": 0}}) as r:
        lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
    assert "".join(x["message"]["content"] for x in lines) == direct and lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 10 and lines[-1]["hublab"]["peer"] == "olla"


def test_synthesis_across_local_and_remote_answers(front):
    _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, max_tokens=4,
                    hublab={"routing": "all", "synthesis": "concatenate"})
    text = whole["choices"][0]["message"]["content"]
    for name in ("general", "alpha@den", "baker@den", "slow@den", "baker-ollama"):
        assert f"### {name} (score" in text
    for synthesis in ("best", "voting", "summarize"):
        _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, max_tokens=4,
                        hublab={"routing": "topk:2", "synthesis": synthesis})
        assert whole["status"] == 200 and whole["hublab"]["synthesis"] == synthesis, whole
        assert whole["hublab"]["chosen"], whole
    _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, max_tokens=4,
                    hublab={"routing": "topk:2", "synthesis": "weighted"})
    assert whole["hublab"]["synthesis"] == "best" and "weighted blends" in whole["hublab"]["note"]


# ---------------------------------------------------------------------------------------------------
# faults

WRONG_TOKEN = "wrong-token-5d1e"


def test_broken_peers_are_refused_with_clear_messages_and_skipped(tmp_path, tiny_gguf, den, misbehaving):
    drip, _ = misbehaving("drip")
    html, _ = misbehaving("html")
    huge, _ = misbehaving("huge")
    away, away_handler = misbehaving("away")
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = front_system(tmp_path, tiny_gguf, [
        {"name": "drip", "url": drip, "deadline": "2s"}, {"name": "html", "url": html},
        {"name": "huge", "url": huge}, {"name": "away", "url": away, "token_env": "HUBLAB_PEER_AWAY"},
        {"name": "gone", "url": gone, "api": "openai"},
        {"name": "wrong", "url": den.url, "token_env": "HUBLAB_WRONG"}], experts={
        "dripper": f'peer = "drip"\nmodel = "drip"\nexamples = {json.dumps(BAKE_EXAMPLES)}\n',
        "htmlx": 'peer = "html"\nmodel = "x"\n', "gonex": f'peer = "gone"\nexamples = {json.dumps(PY_EXAMPLES)}\n',
        "wrongx": 'peer = "wrong"\nmodel = "alpha"\n'})
    t0 = time.monotonic()
    front = Serve(config, env={"HUBLAB_WRONG": WRONG_TOKEN, "HUBLAB_PEER_AWAY": PEER_TOKEN})
    try:
        assert time.monotonic() - t0 < 30  # six peers probed in parallel, each within its probe_timeout
        peers = {p["name"]: p for p in httpx.get(front.url + "/hublab/experts").json()["peers"]}
        assert peers["drip"]["up"] is True and peers["drip"]["api"] == "openai"
        assert "answered text/html, not JSON" in peers["html"]["reason"]
        assert "sent more than 4 MiB; refused" in peers["huge"]["reason"]
        assert "redirected /health to http://127.0.0.2, off its host 127.0.0.1; refused" in peers["away"]["reason"]
        assert "connection refused" in peers["gone"]["reason"]
        assert "refused the token (401); set $HUBLAB_WRONG to wrong's token" in peers["wrong"]["reason"]
        assert away_handler.seen_auth and set(away_handler.seen_auth) == {f"Bearer {PEER_TOKEN}"}  # its own host only

        # asked by name: a one-line error naming the peer and what to do
        _, err = chat(front.url, "htmlx", "hello")
        assert err["status"] == 502 and "not JSON" in err["error"]["message"]
        _, err = chat(front.url, "wrongx", "hello")
        assert err["status"] == 502 and "refused the token" in err["error"]["message"]

        # a peer that drips forever is cut at its deadline; what it sent before streamed through
        t0 = time.monotonic()
        pieces, last = chat(front.url, "dripper", "hello", timeout=30)
        took = time.monotonic() - t0
        assert 1.5 < took < 6, took
        assert pieces and set(pieces) == {" drip"}
        assert "took longer than its deadline of 2 s" in last["error"]["message"]

        # routed: the unreachable peer's expert is skipped, the next-ranked answers, the note says why
        route = httpx.post(front.url + "/hublab/route", json={"query": PY_QUESTION, "routing": "single"}).json()
        assert route["scores"][0]["expert"] == "gonex" and route["selected"][0]["name"] != "gonex"
        assert route["where"]["gonex"]["up"] is False
        _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, hublab={"routing": "single"})
        assert whole["status"] == 200 and whole["hublab"]["chosen"] != "gonex"
        assert "skipped gonex (gone is down: peer gone at" in whole["hublab"]["note"]
        assert "connection refused" in whole["hublab"]["note"]

        # nothing the front said, served or logged holds a token
        said = [httpx.get(front.url + p).text for p in ("/v1/models", "/api/tags", "/hublab/experts", "/metrics",
                                                         "/health", "/hublab/info")]
        said.append(json.dumps(err))
        for text in said + [front.log]:
            assert WRONG_TOKEN not in text and PEER_TOKEN not in text
        assert httpx.get(front.url + "/health").json()["status"] == "ok"
    finally:
        front.stop()


def test_a_peer_gone_silent_mid_answer_ends_it_at_its_stall_limit(tmp_path, tiny_gguf, misbehaving):
    # a link that dropped without a reset looks like this: the connection stays open and nothing more comes
    quiet, _ = misbehaving("stall")
    config = front_system(tmp_path, tiny_gguf, [{"name": "quiet", "url": quiet, "stall": "1s"}], experts={
        "hush": 'peer = "quiet"\nmodel = "hush"\n'})
    front = Serve(config)
    try:
        t0 = time.monotonic()
        pieces, last = chat(front.url, "hush", "hello", timeout=30)
        assert time.monotonic() - t0 < 8  # not the 2-minute deadline, nor the server's 20 s of silence
        assert "".join(pieces) == " one two"
        assert "went silent for 1 s mid-answer (8 characters in)" in last["error"]["message"]
        peers = {p["name"]: p for p in httpx.get(front.url + "/hublab/experts").json()["peers"]}
        assert "went silent" in peers["quiet"]["reason"]
    finally:
        front.stop()


def test_remote_experts_on_two_boards_answer_at_once(tmp_path, tiny_gguf, misbehaving):
    # each board answers in about 1.5 s; asked in turn they would take twice that
    one, one_handler = misbehaving("slow")
    two, two_handler = misbehaving("slow")
    config = front_system(tmp_path, tiny_gguf, [{"name": "one", "url": one}, {"name": "two", "url": two}], experts={
        "first": f'peer = "one"\nmodel = "slow"\nexamples = {json.dumps(PY_EXAMPLES)}\n',
        "second": f'peer = "two"\nmodel = "slow"\nexamples = {json.dumps(BAKE_EXAMPLES)}\n'})
    front = Serve(config)
    try:
        _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, max_tokens=4,
                        hublab={"routing": "all", "synthesis": "concatenate"})
        text = whole["choices"][0]["message"]["content"]
        for name in ("first", "second"):
            assert f"### {name} (score" in text and "w0 w1 w2 w3 w4 w5" in text.split(f"### {name}")[1], text
        (start1, end1), (start2, end2) = one_handler.spans[0], two_handler.spans[0]
        assert max(start1, start2) < min(end1, end2), (one_handler.spans, two_handler.spans)  # they overlapped
    finally:
        front.stop()


def test_peer_killed_mid_answer_fails_fast_and_is_used_again_when_back(tmp_path, tiny_gguf, tiny_adapters,
                                                                      long_gguf):
    shed = Serve(peer_models(tmp_path / "shed", tiny_gguf, tiny_adapters, long_gguf))
    front = Serve(front_system(tmp_path, tiny_gguf, [{"name": "shed", "url": shed.url}]))
    try:
        def kill_after(stream_pieces: list, n: int) -> None:
            end = time.monotonic() + 60
            while len(stream_pieces) < n and time.monotonic() < end:
                time.sleep(0.02)
            shed.kill()

        # by name: the answer ends with one error line, within moments, and the front stays up
        pieces: list = []
        killer = threading.Thread(target=kill_after, args=(pieces, 5))
        killer.start()
        t0 = time.monotonic()
        body = {"model": "slow@shed", "messages": [{"role": "user", "content": "tell me a very long story"}],
                "stream": True, "max_tokens": 3000, "temperature": 0}
        last = {}
        with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    last = json.loads(line[6:])
                    if last.get("choices") and last["choices"][0]["delta"].get("content"):
                        pieces.append(last["choices"][0]["delta"]["content"])
        killer.join()
        assert time.monotonic() - t0 < 30
        assert "went away mid-answer" in last["error"]["message"] and "shed" in last["error"]["message"]
        assert httpx.get(front.url + "/health").json()["status"] == "ok"

        # routed while it is down: skipped, the next-ranked answers, the note says so
        _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, hublab={"routing": "single"})
        assert whole["status"] == 200 and whole["hublab"]["chosen"] == "general", whole
        assert "skipped alpha@shed (shed is down" in whole["hublab"]["note"]

        # back on the same port: used again once its down state is stale (RECHECK_S)
        shed.start()
        time.sleep(5.5)
        _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, hublab={"routing": "single"})
        assert whole["hublab"]["chosen"] == "alpha@shed", whole

        # routed and killed mid-answer: the stream says which expert failed and the next one answers
        pieces = []
        killer = threading.Thread(target=kill_after, args=(pieces, 5))
        killer.start()
        body = {"model": "moe", "messages": [{"role": "user", "content": "tell me a very long story"}],
                "stream": True, "max_tokens": 3000, "temperature": 0, "hublab": {"routing": "topk:2"}}
        done = False
        with httpx.stream("POST", front.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    doc = json.loads(line[6:])
                    if doc.get("choices") and doc["choices"][0]["delta"].get("content"):
                        pieces.append(doc["choices"][0]["delta"]["content"])
        killer.join()
        text = "".join(pieces)
        assert done and "[slow@shed failed: slow@shed: peer shed went away mid-answer" in text, text[-300:]
        assert text.split("failed:", 1)[1].split("]\n", 1)[1].strip()  # the next expert's words follow
    finally:
        front.stop()
        shed.kill()
    assert "Traceback" not in front.log


def test_llama_server_as_an_openai_kind_peer(tmp_path, tiny_gguf):
    from hublab.runtime.engine.llamacpp import tool_path

    binary = tool_path("llama-server")
    if binary is None:
        pytest.skip("llama-server is not built here (scripts/test builds it; or bench/vs_llama_server.py)")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(tiny_gguf), "-c", "512", "-t", "1", "-np", "1", "--host",
                             "127.0.0.1", "--port", str(port), "--no-webui"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        config = front_system(tmp_path, tiny_gguf, [{"name": "lls", "url": url}], experts={
            "tinyls": f'peer = "lls"\nmodel = "tiny"\nexamples = {json.dumps(PY_EXAMPLES)}\n'})
        front = Serve(config)
        try:
            row = next(m for m in httpx.get(front.url + "/v1/models").json()["data"] if m["id"] == "tinyls")
            assert row["hublab"]["api"] == "openai" and row["hublab"]["up"] is True  # found by probing
            body = {"model": "tiny", "messages": [{"role": "user", "content": PY_QUESTION}], "max_tokens": 12,
                    "temperature": 0, "top_p": 0.9}
            direct = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
            pieces, last = chat(front.url, "tinyls", PY_QUESTION)
            assert "".join(pieces) == direct["choices"][0]["message"]["content"] and len(pieces) > 3
            assert last["choices"][0]["finish_reason"] == "length"
            _, whole = chat(front.url, "moe", PY_QUESTION, stream=False, hublab={"routing": "single"})
            assert whole["hublab"]["chosen"] == "tinyls"
            said = direct["choices"][0]["message"]["content"]
            assert whole["choices"][0]["message"]["content"].strip() == said.strip()
        finally:
            front.stop()
    finally:
        proc.kill()
        proc.wait()


def test_hublab_list_and_run_name_a_remote_expert_and_its_board(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    expert_toml(models / "far.toml", "far", 'peer = "gone"\nmodel = "llama3.1:8b"\n')
    config = tmp_path / "system.toml"
    config.write_text(f'[runtime]\nmodels_dir = "{models}"\nprofile = "host"\n\n[[peer]]\nname = "gone"\n'
                      f'url = "http://127.0.0.1:{free_port()}"\napi = "ollama"\n')
    env = {**os.environ, "HUBLAB_CONFIG": str(config)}
    out = subprocess.run([HUBLAB, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "far" in out.stdout and "on peer gone (down: peer gone at" in out.stdout
    out = subprocess.run([HUBLAB, "run", "far", "hello"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "gone" in out.stderr and "unreachable (connection refused)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
