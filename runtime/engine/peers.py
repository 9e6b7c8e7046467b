"""Experts on other boards: the `[[peer]]` servers of system.toml, and the experts this board asks them for.

A peer is any server that already speaks one of three APIs; nothing new goes over the wire:

- `hublab`: another `hublab serve`. Its experts are listed at GET /hublab/routing (description, domain, keywords,
  and the examples its own router routes them by) and show here as `EXPERT@PEER`, routed by this board's router like
  installed ones; answers come from its /v1/chat/completions (SSE).
- `openai`: llama-server, vLLM, LM Studio, ...: /v1/chat/completions (SSE); a liveness probe is GET /v1/models.
- `ollama`: Ollama (or hublab's Ollama API): /api/chat (NDJSON); the probe is GET /api/version.
For openai and ollama peers an expert TOML names the model (`[expert] peer = "den"`, `model = "llama3.1:8b"`).
When `api` is not set the kind is found by probing: hublab's /health, then Ollama's /api/version, then /v1/models.

What a peer may do to this board is bounded. A probe waits `probe_timeout` (1 s); a peer's last word (a probe or
an answer) is trusted for RECHECK_S seconds, so a question costs at most one probe per peer and an unreachable peer
costs little. One answer takes at most the peer's `deadline`, however slowly its bytes drip (a watchdog shuts the
socket). A JSON document over MAX_JSON, a stream line over MAX_LINE or an answer over MAX_ANSWER, a body that is not
JSON, a redirect off the peer's host and a refused token are errors naming the peer and the fix. The token (read
from the `token_env` variable) goes to the peer's host only, and no message here ever contains it.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Catalog, Inference, ModelConfig, PeerConfig
from ..errors import HublabError
from ..inputs import quote
from .session import Generation, GenerationResult

MAX_JSON = 4 << 20       # a probe or listing answer
MAX_LINE = 1 << 20       # one SSE or NDJSON line of a streamed answer
MAX_ANSWER = 8 << 20     # every byte of one streamed answer
MAX_REDIRECTS = 3        # on the peer's own host; one off it is refused
RECHECK_S = 5.0          # a peer's last word (probe or answer) is trusted this long
REDISCOVER_S = 60.0      # a hublab peer's expert list is fetched again after this long
MAX_EXAMPLES = 32        # examples taken per remote expert (each embedded once by the router; 20 route well)
PROBES = {"hublab": "/health", "ollama": "/api/version", "openai": "/v1/models"}
_SENT = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")
_OPENAI = ("max_tokens", "temperature", "top_p", "seed", "stop")
_EXPERT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PeerError(HublabError):
    """A peer could not be reached, refused, or answered what this board does not take; the message names the peer,
    what happened and the fix. `kind`: "unreachable" (no connection, no answer in time), "refused" (the token, a
    redirect off its host: asking another way is no use) or "answer" (an error status, not JSON, too big)."""

    def __init__(self, message: str, kind: str = "answer"):
        super().__init__(message)
        self.kind = kind


@dataclass
class _Peer:
    config: PeerConfig
    api: str | None = None
    up: bool | None = None           # None: not asked yet
    reason: str = ""                 # why it is down
    seen: float = -math.inf          # monotonic time of its last word (probe or answer)
    checked_at: float = 0.0          # epoch time of the same, for listings
    discovered_at: float = -math.inf
    experts: dict[str, ModelConfig] = field(default_factory=dict)  # hublab: discovered, by local name
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: Any = None

    @property
    def name(self) -> str:
        return self.config.name


class _Watch:
    """Ends a response when its deadline passes, when it goes silent for `stall` seconds after it has begun (a link
    that dropped without a reset), or when `cancel` is set, by shutting its socket down (a read blocked on a
    dripping or silent peer wakes at once); `fired` says which."""

    def __init__(self, seconds: float, cancel: threading.Event | None, stall: float | None = None):
        self.start = time.monotonic()
        self.end = self.start + seconds
        self.cancel = cancel
        self.stall = stall
        self.heard: float | None = None  # when the answer last sent something (None: not begun)
        self.fired = ""
        self._done = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def attach(self, response) -> None:
        stream = response.extensions.get("network_stream")
        self._sock = stream.get_extra_info("socket") if stream is not None else None
        self._thread = threading.Thread(target=self._run, name="hublab-peer-watch", daemon=True)
        self._thread.start()

    def left(self) -> float:
        return max(0.05, self.end - time.monotonic())

    def touch(self) -> None:
        self.heard = time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            now = time.monotonic()
            if self.cancel is not None and self.cancel.is_set():
                self.fired = "cancelled"
            elif now >= self.end:
                self.fired = "deadline"
            elif self.stall is not None and self.heard is not None and now - self.heard >= self.stall:
                self.fired = "stalled"
            else:
                continue
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return

    def stop(self) -> None:
        self._done.set()


def _httpx():
    """httpx, without its command-line module: httpx imports it when it can, and with it rich, pygments and click
    (about 10 MB a board never uses); a None entry in sys.modules makes that import fail, which httpx expects."""
    import sys

    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)
    import httpx

    return httpx


def _scrub(text: str, secret: str | None) -> str:
    """One line of a peer's text, clipped, with the token (should a peer echo it) replaced."""
    line = " ".join(str(text).split())
    if secret:
        line = line.replace(secret, "***")
    return line if len(line) <= 200 else line[:197] + "..."


def _transport_reason(exc: Exception) -> str:
    httpx = _httpx()

    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service" in text or "nodename" in text or "resolution" in text:
            return "host name not found"
        return "cannot connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "connection lost"
    return exc.__class__.__name__


class Peers:
    """The peers of one system.toml: their state, the experts they bring, and answers from them."""

    def __init__(self, configs: tuple[PeerConfig, ...] | list[PeerConfig], source: Path | None = None):
        self.source = source or Path("system.toml")
        self._peers = {c.name: _Peer(c, api=c.api or None) for c in configs}
        self.version = 0  # bumped whenever a hublab peer's expert list changes (the router reopens)

    def __bool__(self) -> bool:
        return bool(self._peers)

    @property
    def names(self) -> list[str]:
        return list(self._peers)

    def _token(self, peer: _Peer) -> str | None:
        env = peer.config.token_env
        return os.environ.get(env) or None if env else None

    # -- the catalog ----------------------------------------------------------------------------------------

    def attach(self, catalog: Catalog, discover: bool = True) -> Catalog:
        """Put the remote experts into `catalog`: TOML experts on a peer are checked against [[peer]], and each
        hublab peer's experts are added as EXPERT@PEER (discovered first when `discover`, in parallel)."""
        for name, cfg in list(catalog.models.items()):
            if cfg.peer and cfg.peer not in self._peers:
                import difflib

                close = difflib.get_close_matches(cfg.peer, self.names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else (
                    f"peers: {', '.join(self.names)}" if self._peers else "system.toml has no [[peer]] tables")
                catalog.errors.append(f"{cfg.source}: [expert] peer: no [[peer]] named {cfg.peer!r} in "
                                      f"{self.source}; {hint}")
                del catalog.models[name]
        if discover:
            self.refresh(force=True)
        for peer in self._peers.values():
            for name, cfg in peer.experts.items():
                if name in catalog.models:
                    catalog.errors.append(f"{self.source}: [[peer]] {peer.name}: its expert {cfg.peer_model!r} shows "
                                          f"as {name!r}, a name this board uses already; rename one of them")
                else:
                    catalog.models[name] = cfg
        return catalog

    def where(self, cfg: ModelConfig) -> dict:
        """Where an expert runs and whether it is up: {"where": "here"} or the peer, its api, up and why not."""
        if not cfg.peer:
            return {"where": "here", "up": True}
        peer = self._peers.get(cfg.peer)
        if peer is None:
            return {"where": cfg.peer, "up": False, "reason": f"no [[peer]] named {cfg.peer!r}"}
        out = {"where": peer.name, "url": peer.config.url, "api": peer.api, "up": peer.up, "model": cfg.peer_model}
        if peer.up is False:
            out["reason"] = peer.reason
        return out

    def status(self) -> list[dict]:
        """Every peer: url, api, up (None: not asked yet), why not, when last heard from, its experts here."""
        return [{"name": p.name, "url": p.config.url, "api": p.api, "up": p.up, "reason": p.reason or None,
                 "checked": p.checked_at or None, "experts": sorted(p.experts),
                 "token": f"${p.config.token_env}" if p.config.token_env else None,
                 "deadline_s": p.config.deadline} for p in self._peers.values()]

    def refresh(self, peers: list[str] | None = None, force: bool = False) -> dict[str, bool]:
        """Probe the named peers (all by default) whose last word is older than RECHECK_S (every one with force),
        in parallel, each bounded by its probe_timeout; a hublab peer's expert list is fetched when due. Returns
        up or down per peer asked."""
        chosen = [self._peers[n] for n in (peers if peers is not None else self.names) if n in self._peers]
        now = time.monotonic()
        stale = [p for p in chosen if force or p.up is None or now - p.seen >= RECHECK_S]
        if len(stale) == 1:
            self._check(stale[0])
        elif stale:
            threads = [threading.Thread(target=self._check, args=(p,), daemon=True) for p in stale]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return {p.name: bool(p.up) for p in chosen}

    def down(self, experts: list[ModelConfig]) -> dict[str, str]:
        """Of these experts, the remote ones whose peer is down now (probed when due): expert -> why."""
        needed = sorted({c.peer for c in experts if c.peer})
        if not needed:
            return {}
        self.refresh(needed)
        return {c.name: f"{c.peer} is down: {self._peers[c.peer].reason}" for c in experts
                if c.peer and c.peer in self._peers and not self._peers[c.peer].up}

    # -- probing ------------------------------------------------------------------------------------------

    def _check(self, peer: _Peer) -> None:
        with peer.lock:
            before = {n: (c.description, c.domain, tuple(c.keywords), c.threshold, c.examples)
                      for n, c in peer.experts.items()}
            try:
                if peer.config.token_env and not self._token(peer):
                    raise PeerError(f"peer {peer.name}: ${peer.config.token_env} is not set; export it with "
                                    f"{peer.name}'s token (token_env in {self.source})")
                if peer.api is None:
                    peer.api = self._detect(peer)
                else:
                    self._get_json(peer, PROBES[peer.api], peer.config.probe_timeout)
                if peer.api == "hublab" and time.monotonic() - peer.discovered_at >= REDISCOVER_S:
                    peer.experts = self._discover(peer)
                    peer.discovered_at = time.monotonic()
                self._heard(peer, True)
            except PeerError as exc:
                self._heard(peer, False, str(exc))
            after = {n: (c.description, c.domain, tuple(c.keywords), c.threshold, c.examples)
                     for n, c in peer.experts.items()}
            if after != before:
                self.version += 1

    def _heard(self, peer: _Peer, up: bool, reason: str = "") -> None:
        peer.up, peer.reason = up, reason
        peer.seen, peer.checked_at = time.monotonic(), time.time()
        if not up:
            peer.discovered_at = -math.inf  # fetched again when it comes back

    def _detect(self, peer: _Peer) -> str:
        """Which API the peer speaks: hublab (/health with a profile), ollama (/api/version), openai (/v1/models)."""
        timeout = peer.config.probe_timeout
        tried, said = [], []
        for api in ("hublab", "ollama", "openai"):
            try:
                doc = self._get_json(peer, PROBES[api], timeout)
            except PeerError as exc:
                if exc.kind != "answer":  # unreachable, or refusing us: no other path does better
                    raise
                tried.append(PROBES[api])
                said.append(str(exc).split(": ", 1)[-1])
                continue
            if api == "hublab" and isinstance(doc, dict) and {"status", "version", "profile"} <= set(doc):
                return api
            if api == "ollama" and isinstance(doc, dict) and isinstance(doc.get("version"), str):
                return api
            if api == "openai" and isinstance(doc, dict) and isinstance(doc.get("data"), list):
                return api
            tried.append(PROBES[api])
        raise PeerError(f"peer {peer.name} at {peer.config.url} answers none of {', '.join(tried)} as hublab, Ollama "
                        f"or an OpenAI-compatible server does ({said[0] if said else 'other documents'}); fix url, or "
                        "set api = \"hublab\", \"openai\" or \"ollama\"")

    def _discover(self, peer: _Peer) -> dict[str, ModelConfig]:
        """A hublab peer's own experts (GET /hublab/routing), as EXPERT@PEER configs; bad entries are skipped."""
        doc = self._get_json(peer, "/hublab/routing", max(5.0, 5 * peer.config.probe_timeout))
        rows = doc.get("experts") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise PeerError(f"peer {peer.name}: /hublab/routing has no experts list; is it a hublab agent? "
                            "set api to what it is")
        out: dict[str, ModelConfig] = {}
        for row in rows[:256]:
            cfg = self._remote_config(peer, row)
            if cfg is not None:
                out[cfg.name] = cfg
        return out

    def _remote_config(self, peer: _Peer, row: Any) -> ModelConfig | None:
        if not isinstance(row, dict):
            return None
        name = row.get("name")
        if not isinstance(name, str) or not _EXPERT_NAME.fullmatch(name):
            return None

        def text(value: Any, limit: int) -> str:
            return " ".join(value.split())[:limit] if isinstance(value, str) else ""

        def texts(value: Any, limit: int, n: int) -> tuple[str, ...]:
            items = [text(v, limit) for v in value] if isinstance(value, list) else []
            return tuple(dict.fromkeys(t for t in items if t))[:n]

        threshold = row.get("threshold")
        threshold = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) \
            and 0.0 <= threshold <= 1.0 else 0.0
        domain = text(row.get("domain"), 128)
        return ModelConfig(name=f"{name}@{peer.name}", source=self.source, type="expert", path=None,
                           description=text(row.get("description"), 300), inference=Inference(),
                           domain=domain if _EXPERT_NAME.fullmatch(domain or "-") else name,
                           keywords=list(texts(row.get("keywords"), 64, 64)), threshold=threshold,
                           examples=texts(row.get("examples"), 300, MAX_EXAMPLES), peer=peer.name, peer_model=name)

    # -- HTTP -----------------------------------------------------------------------------------------------

    def _client(self, peer: _Peer):
        httpx = _httpx()

        if peer.client is None:
            token = self._token(peer)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            # no proxies or .netrc from the environment: a peer is a board on this network, and its token goes to it.
            # Certificates are loaded for an https peer only (7.6 MB of CA store a plain-http front does not need; a
            # redirect never changes the scheme, see _open).
            https = peer.config.url.startswith("https:")
            peer.client = httpx.Client(base_url=peer.config.url, headers=headers, follow_redirects=False,
                                       trust_env=False, verify=https,
                                       limits=httpx.Limits(max_connections=16, max_keepalive_connections=4))
        return peer.client

    def _open(self, peer: _Peer, method: str, path: str, body: Any, watch: _Watch, connect: float):
        """Send a request and return the open (streaming) response once it is 2xx; redirects are followed on the
        peer's own host only (the token never leaves it); an error status is a PeerError with the peer's message."""
        httpx = _httpx()

        client = self._client(peer)
        base = httpx.URL(peer.config.url)
        url: Any = path
        name = peer.name
        for _ in range(MAX_REDIRECTS + 1):
            timeout = httpx.Timeout(watch.left(), connect=min(connect, watch.left()))
            try:
                request = client.build_request(method, url, json=body, timeout=timeout)
                response = client.send(request, stream=True)
            except httpx.ConnectTimeout:
                raise PeerError(f"peer {name} at {peer.config.url} did not take a connection within "
                                f"{timeout.connect:g} s; check it is running and reachable", "unreachable") from None
            except httpx.TimeoutException:
                if watch.cancel is not None and watch.cancel.is_set():
                    raise _Cancelled() from None
                raise PeerError(f"peer {name} did not answer {path} within {time.monotonic() - watch.start:.0f} s "
                                "(its deadline); raise deadline in its [[peer]] or check it", "unreachable") from None
            except httpx.TransportError as exc:
                raise PeerError(f"peer {name} at {peer.config.url} is unreachable ({_transport_reason(exc)}); check "
                                "it is running and the url in system.toml", "unreachable") from None
            if response.is_redirect:
                location = response.headers.get("location", "")
                response.close()
                try:
                    target = response.url.join(location)
                except (httpx.InvalidURL, ValueError):
                    target = None
                if target is None or (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port):
                    shown = f"{target.scheme}://{target.host}" if target is not None else quote(location, 60)
                    raise PeerError(f"peer {name} redirected {path} to {shown}, off its host {base.host}; refused "
                                    f"(the token goes to {base.host} only): set url to the server you mean",
                                    "refused")
                if method != "GET" and response.status_code not in (307, 308):
                    raise PeerError(f"peer {name} redirected {method} {path} with {response.status_code}, which "
                                    "drops the request body; set url to where it points")
                url = target
                continue
            if response.status_code in (401, 403):
                response.close()
                env = peer.config.token_env
                fix = (f"set ${env} to {name}'s token" if env else
                       f"add token_env = \"HUBLAB_PEER_{name.upper().replace('-', '_')}\" to its [[peer]] and export "
                       "that variable with its token")
                raise PeerError(f"peer {name} refused the token ({response.status_code}); {fix}", "refused")
            if response.status_code >= 400:
                message = self._error_text(peer, response)
                response.close()
                raise PeerError(f"peer {name}: {path} answered {response.status_code}: {message}")
            return response
        raise PeerError(f"peer {name}: more than {MAX_REDIRECTS} redirects for {path}; set url to where it points")

    def _error_text(self, peer: _Peer, response) -> str:
        data = b""
        try:
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > 65536:
                    break
        except Exception:  # noqa: BLE001 - the status says enough
            pass
        text = data[:65536].decode("utf-8", "replace")
        try:
            doc = json.loads(text)
            err = doc.get("error") if isinstance(doc, dict) else None
            text = err.get("message", "") if isinstance(err, dict) else err if isinstance(err, str) else text
        except ValueError:
            pass
        return _scrub(text or response.reason_phrase, self._token(peer)) or "no message"

    def _get_json(self, peer: _Peer, path: str, seconds: float) -> Any:
        """GET a JSON document, the whole exchange within `seconds`, at most MAX_JSON bytes."""
        httpx = _httpx()

        watch = _Watch(seconds, None)
        response = self._open(peer, "GET", path, None, watch, seconds)
        data = bytearray()
        try:
            watch.attach(response)
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_JSON:
                    raise PeerError(f"peer {peer.name}: {path} sent more than {MAX_JSON >> 20} MiB; refused (is url "
                                    "a hublab agent, llama-server or Ollama?)")
        except httpx.TransportError as exc:
            if watch.fired == "deadline":
                raise PeerError(f"peer {peer.name} did not finish {path} within {seconds:g} s", "unreachable") \
                    from None
            raise PeerError(f"peer {peer.name}: {path}: {_transport_reason(exc)}", "unreachable") from None
        finally:
            watch.stop()
            response.close()
        try:
            return json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            start = _scrub(bytes(data[:40]).decode("utf-8", "replace"), self._token(peer))
            raise PeerError(f"peer {peer.name}: {path} answered {kind}, not JSON ({start!r}...); check url points at a "
                            "hublab agent, llama-server, Ollama or an OpenAI-compatible server") from None

    # -- answers ------------------------------------------------------------------------------------------

    def stream(self, cfg: ModelConfig, prompt: str | list[dict], *, raw: bool = False, logprobs: bool = False,
               cancel: threading.Event | None = None, system_prompt: str | None = None, grammar: str | None = None,
               special: bool = True, sampler: dict | None = None, defaults: dict | None = None) -> Generation:
        """An answer from remote expert `cfg`, as Runtime.stream gives a local one: iterate for the pieces as the peer
        sends them, `.result` afterwards. `sampler`: what the question asked (None: not asked); `defaults`: the
        expert's own settings here, sent for an expert TOML of this board (a hublab peer's expert keeps its own).
        Raises PeerError (the peer is marked down when it could not be reached)."""
        peer = self._peers.get(cfg.peer)
        discovered = peer is not None and cfg.name in peer.experts
        asked = {k: v for k, v in (sampler or {}).items() if v is not None}
        if not discovered:
            mine = {k: v for k, v in (defaults or {}).items() if k in _SENT and v not in (None, [], "")}
            if mine.get("max_tokens") == 0:
                mine.pop("max_tokens")
            asked = {**mine, **asked}
            system_prompt = system_prompt if system_prompt is not None else cfg.inference.system_prompt or None
        gen = Generation(iter(()))
        gen._pieces = self._answer(gen, cfg, prompt, raw, logprobs, cancel, system_prompt, grammar, special,
                                   asked, set((sampler or {}).keys()) - {k for k, v in (sampler or {}).items()
                                                                          if v is None})
        return gen

    def _answer(self, gen: Generation, cfg: ModelConfig, prompt, raw: bool, logprobs: bool,
                cancel: threading.Event | None, system_prompt: str | None, grammar: str | None, special: bool,
                sampler: dict, explicit: set[str]) -> Iterator[str]:
        httpx = _httpx()

        peer = self._peers.get(cfg.peer)
        if peer is None:
            raise PeerError(f"{cfg.name}: no [[peer]] named {cfg.peer!r} in {self.source}")
        t0 = time.perf_counter()
        if peer.api is None:
            self.refresh([peer.name], force=True)
            if not peer.up:
                raise PeerError(peer.reason)
        api = peer.api
        if grammar and api == "ollama":
            raise PeerError(f"{cfg.name} runs on {peer.name}, an Ollama server, which takes no grammar; ask it "
                            "for free text or route the constrained question to another expert")
        if api == "openai":  # beyond OpenAI's own fields only what the question asked (llama-server takes them)
            sampler = {k: v for k, v in sampler.items() if k in _OPENAI or k in explicit}
        path, body = self._request(api, cfg, prompt, raw, logprobs, system_prompt, grammar, special, sampler)
        watch = _Watch(peer.config.deadline, cancel, peer.config.stall)
        try:
            response = self._open(peer, "POST", path, body, watch, peer.config.probe_timeout * 3)
        except _Cancelled:
            gen.result = GenerationResult(expert=cfg.name, text="", finish_reason="cancelled")
            return
        except PeerError as exc:
            if exc.kind != "answer":  # an error status for this question says nothing about the board
                self._heard(peer, False, str(exc))
            raise
        state = _Read(api, logprobs)
        try:
            watch.attach(response)
            for doc in _documents(response, api, peer):
                for piece in state.take(doc, peer):
                    watch.touch()
                    if state.ttft is None:
                        state.ttft = time.perf_counter() - t0
                    yield piece
                if state.done:
                    break
        except httpx.TransportError as exc:
            if not watch.fired:
                self._heard(peer, False, f"lost mid-answer ({_transport_reason(exc)})")
                raise PeerError(f"{cfg.name}: peer {peer.name} went away mid-answer ({_transport_reason(exc)}, "
                                f"{len(state.text)} characters in)") from None
        finally:
            watch.stop()
            response.close()
        # the watchdog shut the socket: a read then ends cleanly or with an error, either way it is the watchdog's
        if watch.fired == "cancelled" and not state.done:
            state.finish = "cancelled"
        elif watch.fired == "stalled" and not state.done:
            self._heard(peer, False, f"went silent mid-answer for {peer.config.stall:g} s")
            raise PeerError(f"{cfg.name}: peer {peer.name} went silent for {peer.config.stall:g} s mid-answer "
                            f"({len(state.text)} characters in); check the link to it, or raise stall in its [[peer]]")
        elif watch.fired == "deadline" and not state.done:
            raise PeerError(f"{cfg.name}: peer {peer.name} took longer than its deadline of {peer.config.deadline:g} s "
                            f"({len(state.text)} characters in); raise deadline in its [[peer]] or ask for fewer "
                            "tokens")
        if not state.done and state.finish != "cancelled":
            if cancel is not None and cancel.is_set():
                state.finish = "cancelled"
            else:
                # a stream without a length ends at the close: a killed peer looks like this
                self._heard(peer, False, "lost mid-answer (connection closed)")
                raise PeerError(f"{cfg.name}: peer {peer.name} went away mid-answer (connection closed before the "
                                f"answer's end, {len(state.text)} characters in)")
        self._heard(peer, True)
        seconds = time.perf_counter() - t0
        tokens = state.tokens or state.pieces  # a server that reports no usage: one piece is about one token
        ttft = state.ttft if state.ttft is not None else seconds
        gen.result = GenerationResult(
            expert=cfg.name, text=state.text, prompt_tokens=state.prompt_tokens, tokens=tokens,
            ttft_s=round(ttft, 4), seconds=round(seconds, 4),
            tokens_per_s=round((tokens - 1) / max(seconds - ttft, 1e-9), 2) if tokens > 1 else 0.0,
            finish_reason=state.finish, mean_token_prob=state.mean_prob() if logprobs else None)

    def _request(self, api: str, cfg: ModelConfig, prompt, raw: bool, logprobs: bool, system_prompt: str | None,
                 grammar: str | None, special: bool, sampler: dict) -> tuple[str, dict]:
        """The path and body of one answer in the peer's own API."""
        opts = {k: v for k, v in sampler.items() if v is not None and v != []}
        if opts.get("seed", 0) < 0:
            opts.pop("seed")
        if not raw:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            if system_prompt and not any(m.get("role") == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": system_prompt})
        text = prompt if isinstance(prompt, str) else "\n".join(m.get("content") or "" for m in prompt)
        if api == "ollama":
            names = {"max_tokens": "num_predict"}
            body: dict = {"model": cfg.peer_model, "stream": True,
                          "options": {names.get(k, k): v for k, v in opts.items()}}
            if raw:
                return "/api/generate", {**body, "prompt": text, "raw": True}
            return "/api/chat", {**body, "messages": messages}
        body = {"model": cfg.peer_model, "stream": True, "stream_options": {"include_usage": True}, **opts}
        if grammar:
            body["grammar"] = grammar  # llama-server's field, which hublab's OpenAI API takes too
        if api == "hublab":
            extra = {"token_prob": True} if logprobs else {}
            if raw and not special:
                extra["parse_special"] = False
            if extra:
                body["hublab"] = extra
        elif logprobs and not raw:
            body["logprobs"] = True
        if raw:
            return "/v1/completions", {**body, "prompt": text}
        return "/v1/chat/completions", {**body, "messages": messages}

    def close(self) -> None:
        for peer in self._peers.values():
            if peer.client is not None:
                peer.client.close()
                peer.client = None


class _Cancelled(Exception):
    """The asker went away before the peer answered."""


def _documents(response, api: str, peer: _Peer) -> Iterator[Any]:
    """The JSON documents of a streamed answer: SSE data (hublab, openai; "[DONE]" as the string) or NDJSON lines
    (ollama), each line at most MAX_LINE and the whole at most MAX_ANSWER bytes."""
    total, buf, data = 0, b"", []
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > MAX_ANSWER:
            raise PeerError(f"peer {peer.name} sent more than {MAX_ANSWER >> 20} MiB for one answer; refused")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if api == "ollama":
                if line.strip():
                    yield _parse(line, peer)
            elif not line:
                if data:
                    joined = b"\n".join(data)
                    data = []
                    yield "[DONE]" if joined.strip() == b"[DONE]" else _parse(joined, peer)
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip())
            # "event:", "id:", "retry:" and ":" comment lines carry nothing an answer needs
        if len(buf) > MAX_LINE:
            raise PeerError(f"peer {peer.name} sent a line over {MAX_LINE >> 20} MiB in an answer; refused")
    if api == "ollama" and buf.strip():
        yield _parse(buf, peer)


def _parse(raw: bytes, peer: _Peer) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        start = raw[:40].decode("utf-8", "replace")
        raise PeerError(f"peer {peer.name} sent an answer line that is not JSON ({start!r}...); check its api "
                        "in system.toml") from None


class _Read:
    """What a streamed answer said so far: text, counts, the finish, the sampled tokens' log-probabilities."""

    def __init__(self, api: str, logprobs: bool):
        self.api, self.logprobs = api, logprobs
        self.text, self.done, self.finish = "", False, "stop"
        self.prompt_tokens = self.tokens = self.pieces = 0
        self.ttft: float | None = None
        self.logprob_sum, self.logprob_n = 0.0, 0
        self.token_prob: float | None = None  # a hublab peer's own mean

    def mean_prob(self) -> float | None:
        if self.token_prob is not None:
            return self.token_prob
        return math.exp(self.logprob_sum / self.logprob_n) if self.logprob_n else None

    def take(self, doc: Any, peer: _Peer) -> list[str]:
        if doc == "[DONE]":
            self.done = True
            return []
        if not isinstance(doc, dict):
            raise PeerError(f"peer {peer.name} sent {quote(doc, 40)} where an answer's JSON object goes")
        if "error" in doc:
            err = doc["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise PeerError(f"peer {peer.name}: {_scrub(str(message), None)}")
        if self.api == "ollama":
            piece = (doc.get("message") or {}).get("content") if "message" in doc else doc.get("response")
            if doc.get("done"):
                self.done = True
                self.finish = "length" if doc.get("done_reason") == "length" else "stop"
                self.prompt_tokens = _count(doc.get("prompt_eval_count"))
                self.tokens = _count(doc.get("eval_count"))
        else:
            piece = None
            usage = doc.get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens = _count(usage.get("prompt_tokens"))
                self.tokens = _count(usage.get("completion_tokens"))
            extra = doc.get("hublab")
            if isinstance(extra, dict) and isinstance(extra.get("mean_token_prob"), (int, float)):
                self.token_prob = float(extra["mean_token_prob"])
            choices = doc.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                choice = choices[0]
                delta = choice.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if choice.get("finish_reason"):
                    self.finish = "length" if choice["finish_reason"] == "length" else "stop"
                probs = choice.get("logprobs")
                if isinstance(probs, dict) and isinstance(probs.get("content"), list):
                    for item in probs["content"]:
                        if isinstance(item, dict) and isinstance(item.get("logprob"), (int, float)):
                            self.logprob_sum += float(item["logprob"])
                            self.logprob_n += 1
        if not isinstance(piece, str) or not piece:
            return []
        self.text += piece
        self.pieces += 1
        return [piece]


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
