"""Hostile registries: a fake OCI distribution server on loopback (stdlib http.server in a thread) serves a
real signed package with one fault at a time: wrong digests, truncated bodies, wrong Content-Length,
redirect loops, a huge manifest, a slow drip, 500s mid-download, auth challenges and redirects pointing at
another host. Install refuses with one line or resumes; it never installs bad bytes, never runs past its
timeouts, and never sends credentials to another origin."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hublab.runtime import pkg
from hublab.runtime.errors import HublabError
from hublab.runtime.pkg.registry import OCIRegistry

from test_pkg_support import base_package, snapshot, ws  # noqa: F401 - ws is a fixture

TIMEOUT = 1.0  # HUBLAB_REGISTRY_TIMEOUT in these tests
USER, PASSWORD = "hublab-user", "s3cret-pw"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class Fake:
    """The OCI API over a directory registry, with a fault switch and a log of every request."""

    def __init__(self, root: Path, host: str = "127.0.0.1"):
        self.root, self.fault, self.auth = root, "", ""
        self.log: list[tuple[str, str, dict]] = []
        self.blob_gets: dict[str, int] = {}
        self.other: "Fake | None" = None  # the server on another host (token realm, redirect target)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                fake.log.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                try:
                    fake.answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- content
    def manifest(self, name: str, tag: str) -> bytes | None:
        index = json.loads((self.root / "index.json").read_text())
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == f"{name}:{tag}":
                return (self.root / "blobs" / "sha256" / m["digest"].split(":")[1]).read_bytes()
        return None

    def blob(self, digest: str) -> bytes | None:
        p = self.root / "blobs" / "sha256" / digest.split(":", 1)[1]
        return p.read_bytes() if p.is_file() else None

    def is_file_blob(self, digest: str) -> bool:
        """A package file (not package.toml, the config): where download faults are injected."""
        index = json.loads((self.root / "index.json").read_text())
        for m in index["manifests"]:
            doc = json.loads(self.blob(m["digest"]))
            if any(layer["digest"] == digest for layer in doc["layers"]):
                return True
        return False

    @staticmethod
    def send(h, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def answer(self, h) -> None:
        f, path = self.fault, h.path.split("?")[0]
        if path == "/token":  # this server as a token realm
            if f == "token-refuses-anonymous" and "authorization" not in {k.lower() for k in h.headers}:
                return self.send(h, 401, b'{"errors": [{"message": "login"}]}')
            return self.send(h, 200, b'{"token": "tok-123"}')
        if path.startswith("/other/"):  # this server as a redirect target holding the blob
            body = self.other_blob or b""
            return self.send(h, 200, body)
        if self.auth == "basic" and h.headers.get("Authorization") != BASIC:
            return self.send(h, 401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth == "bearer-elsewhere" and h.headers.get("Authorization") != "Bearer tok-123":
            realm = f"{self.other.url}/token"
            return self.send(h, 401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake",scope="x"'})
        if path == "/v2/":
            return self.send(h, 200, b"{}")
        if path == "/v2/_catalog":
            if f == "catalog-garbage":
                return self.send(h, 200, b"<html>not json</html>")
            if f == "catalog-elsewhere":
                return self.send(h, 200, b'{"repositories": ["tiny"]}',
                                 {"Link": f'<{self.other.url}/v2/_catalog?n=1>; rel="next"'})
            return self.send(h, 200, b'{"repositories": ["tiny"]}')
        m = re.fullmatch(r"/v2/([a-z0-9._/-]+)/(manifests|blobs)/(.+)", path)
        if not m:
            return self.send(h, 404, b"{}")
        name, kind, ref = m.groups()
        if kind == "manifests":
            body = self.manifest(name, ref)
            if body is None:
                return self.send(h, 404, b'{"errors": [{"message": "manifest unknown"}]}')
            if f == "huge-manifest":
                return self.send(h, 200, b'{"schemaVersion": 2, "x": "' + b"a" * (8 << 20) + b'"}')
            if f == "manifest-500":
                return self.send(h, 500, b'{"errors": [{"message": "' + b"boom " * 1000 + b'"}]}')
            if f == "manifest-not-json":
                return self.send(h, 200, b"<html>hello</html>")
            if f == "manifest-deep":
                return self.send(h, 200, b"[" * 100_000)
            if f == "manifest-bad-digest":
                return self.send(h, 200, body.replace(b'"sha256:', b'"sha256:zz', 1))
            if f == "manifest-bad-size":
                return self.send(h, 200, re.sub(rb'"size":\d+', b'"size":-5', body, count=1))
            if f == "manifest-drip":
                return self._drip(h, body, 0.3)
            if f == "redirect-loop":
                return self.send(h, 302, b"", {"Location": h.path})
            return self.send(h, 200, body, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        body = self.blob(ref)
        if body is None:
            return self.send(h, 404, b"{}")
        n = self.blob_gets[ref] = self.blob_gets.get(ref, 0) + 1
        faulty = self.is_file_blob(ref) and h.command == "GET"
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        start = int(rng.group(1)) if rng else 0
        if faulty and f == "blob-500":
            return self.send(h, 500, b'{"errors": [{"message": "storage down"}]}')
        if faulty and f == "blob-404":
            return self.send(h, 404, b"{}")
        if faulty and f == "wrong-digest":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if faulty and f == "wrong-digest-and-size":
            body = body + b"extra"
        if faulty and f == "short-length":
            return self.send(h, 200, body, length=len(body) // 2)
        if faulty and f in ("truncated", "cut-then-500", "cut-once") and (f != "cut-once" or n == 1):
            if f == "cut-then-500" and n > 1:
                return self.send(h, 500, b"{}")
            part = body[start:start + max(1, (len(body) - start) // 2)]
            h.send_response(206 if start else 200)
            if start:
                h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            h.send_header("Content-Length", str(len(body) - start))
            h.end_headers()
            h.wfile.write(part)
            h.wfile.flush()
            h.close_connection = True
            return
        if faulty and f == "long-length":
            h.send_response(200)
            h.send_header("Content-Length", str(len(body) + 1000))
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True
            return
        if faulty and f == "redirect-loop":
            return self.send(h, 302, b"", {"Location": h.path})
        if faulty and f == "redirect-elsewhere":
            self.other.other_blob = body
            return self.send(h, 307, b"", {"Location": f"{self.other.url}/other/{ref}"})
        if faulty and f == "drip":
            return self._drip(h, body, 0.25)
        if faulty and f == "range-ignored" and start:
            return self.send(h, 200, body)
        if faulty and f == "bad-content-range" and n == 1:
            part = body[: len(body) // 2]
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(part)
            h.close_connection = True
            return
        if faulty and f == "bad-content-range" and start:
            return self.send(h, 206, body[start:], {"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"})
        if start:
            return self.send(h, 206, body[start:], {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        return self.send(h, 200, body)

    other_blob: bytes | None = None

    @staticmethod
    def _drip(h, body: bytes, every: float) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(0, len(body), 8):
            h.wfile.write(body[i:i + 8])
            h.wfile.flush()
            time.sleep(every)


@pytest.fixture
def published(ws, monkeypatch):  # noqa: F811
    """A signed package `tiny` in ws's directory registry, and the sha256 of each of its files."""
    monkeypatch.setenv("HUBLAB_REGISTRY_TIMEOUT", str(TIMEOUT))
    src = base_package(ws.root / "src", quants=("q4_k_m",))
    pkg.build(src, key=ws.key)
    pkg.publish(src, str(ws.registry))
    files = {p.relative_to(src / "q4_k_m").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (src / "q4_k_m").iterdir()}
    return ws, files


@pytest.fixture
def fake(published):
    ws, _ = published
    f = Fake(ws.registry)
    f.other = Fake(ws.registry, host="127.0.0.2")
    yield f
    f.other.close()
    f.close()


def install(ws, fake, **kw):  # noqa: F811
    return pkg.install("tiny", fake.url, models_dir=ws.models, profile="host", **kw)


def refused(ws, fake, budget: float = 20.0) -> str:  # noqa: F811
    before = snapshot(ws.models)
    t0 = time.monotonic()
    with pytest.raises(HublabError) as err:
        install(ws, fake)
    assert time.monotonic() - t0 < budget
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600 and "Traceback" not in msg, msg[:300]
    assert snapshot(ws.models) == before  # nothing installed, nothing lost
    return msg


def installed_right(published) -> None:
    ws, files = published
    got = snapshot(ws.models)
    for name, digest in files.items():
        if name.endswith(".gguf"):
            assert any(k.endswith(name) and v == digest for k, v in got.items()), (name, got)
    report = pkg.verify(models_dir=ws.models)
    assert not report.problems if hasattr(report, "problems") else True


REFUSED = ["wrong-digest", "wrong-digest-and-size", "short-length", "truncated", "cut-then-500", "long-length",
           "redirect-loop", "huge-manifest", "manifest-500", "manifest-not-json", "manifest-deep",
           "manifest-bad-digest", "manifest-bad-size", "blob-500", "blob-404", "drip", "manifest-drip",
           "bad-content-range"]


@pytest.mark.parametrize("fault", REFUSED)
def test_a_faulty_registry_is_refused_and_nothing_changes(published, fake, fault):
    ws, _ = published
    fake.fault = fault
    msg = refused(ws, fake)
    assert "tiny" in msg or fake.url in msg or "registry" in msg


def test_faults_end_within_their_timeouts(published, fake):
    ws, _ = published
    for fault, budget in (("drip", 4 * TIMEOUT * 2 + 5), ("manifest-drip", TIMEOUT + 4)):
        fake.fault = fault
        t0 = time.monotonic()
        refused(ws, fake, budget=budget)
        assert time.monotonic() - t0 < budget


def test_a_download_cut_once_is_resumed_in_the_same_run(published, fake):
    ws, _ = published
    fake.fault = "cut-once"
    install(ws, fake)
    ranges = [h.get("range") for m, p, h in fake.log if "/blobs/" in p and h.get("range")]
    assert ranges and all(r.startswith("bytes=") and r != "bytes=0-" for r in ranges)
    installed_right(published)


def test_a_download_cut_off_resumes_on_the_next_run(published, fake):
    ws, _ = published
    fake.fault = "cut-then-500"
    refused(ws, fake)
    fake.fault, fake.log = "", []
    install(ws, fake)
    assert any(h.get("range") for m, p, h in fake.log if "/blobs/" in p)  # it continued, not restarted
    installed_right(published)


def test_a_server_ignoring_range_starts_over_and_installs(published, fake):
    ws, _ = published
    fake.fault = "cut-once"
    fake.blob_gets.clear()
    fake.fault = "range-ignored"
    # a partial from an earlier cut: then the server answers Range with the whole blob (200)
    fake_cut = Fake(ws.registry)
    fake_cut.fault = "cut-then-500"
    try:
        with pytest.raises(HublabError):
            pkg.install("tiny", fake_cut.url, models_dir=ws.models, profile="host")
    finally:
        fake_cut.close()
    install(ws, fake)
    installed_right(published)


def test_credentials_never_go_to_a_token_realm_on_another_host(published, fake, monkeypatch):
    ws, _ = published
    monkeypatch.setenv("HUBLAB_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", PASSWORD)
    fake.auth = "bearer-elsewhere"
    install(ws, fake)  # the realm hands out a token without credentials: the install works
    installed_right(published)
    realm_requests = [h for m, p, h in fake.other.log if p.startswith("/token")]
    assert realm_requests and not any("authorization" in h for h in realm_requests)


def test_a_realm_on_another_host_that_wants_the_password_is_refused(published, fake, monkeypatch):
    ws, _ = published
    monkeypatch.setenv("HUBLAB_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", PASSWORD)
    fake.auth = "bearer-elsewhere"
    fake.other.fault = "token-refuses-anonymous"
    msg = refused(ws, fake)
    assert "HUBLAB_REGISTRY_AUTH_HOSTS" in msg
    assert not any("authorization" in h for m, p, h in fake.other.log)
    # listed by the user, the realm gets the login
    monkeypatch.setenv("HUBLAB_REGISTRY_AUTH_HOSTS", "127.0.0.2")
    install(ws, fake)
    assert any(h.get("authorization") == BASIC for m, p, h in fake.other.log)


def test_a_redirect_to_another_host_carries_no_credentials(published, fake, monkeypatch):
    ws, _ = published
    monkeypatch.setenv("HUBLAB_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", PASSWORD)
    fake.auth, fake.fault = "basic", "redirect-elsewhere"
    install(ws, fake)
    installed_right(published)
    assert any(h.get("authorization") == BASIC for m, p, h in fake.log)  # the registry got the login
    assert fake.other.log and not any("authorization" in h for m, p, h in fake.other.log)


@pytest.mark.parametrize("fault", ["catalog-garbage", "catalog-elsewhere"])
def test_a_bad_catalog_is_one_line(published, fake, fault, monkeypatch):
    monkeypatch.setenv("HUBLAB_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", PASSWORD)
    fake.fault = fault
    reg = OCIRegistry(fake.url)
    try:
        with pytest.raises(HublabError) as err:
            reg.names()
    finally:
        reg.close()
    assert "\n" not in str(err.value)
    assert not any("authorization" in h for m, p, h in fake.other.log)


@pytest.mark.parametrize("url", ["http://[::1", "http://h:99999", "ftp://x", "http://", "http://u:p@host/x",
                                 "http://h:abc"])
def test_a_bad_registry_url_is_one_line(ws, url):  # noqa: F811
    with pytest.raises(HublabError) as err:
        pkg.install("tiny", url, models_dir=ws.models, profile="host")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", ["abc", "-1", "0", "nan", "99999"])
def test_a_bad_registry_timeout_is_one_line(ws, monkeypatch, value):  # noqa: F811
    monkeypatch.setenv("HUBLAB_REGISTRY_TIMEOUT", value)
    with pytest.raises(HublabError) as err:
        OCIRegistry("http://127.0.0.1:9")
    assert "HUBLAB_REGISTRY_TIMEOUT" in str(err.value)
