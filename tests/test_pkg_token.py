"""Bearer-token auth against a real registry: docker-registry with `auth: token` trusts a certificate
made here, and a small token server (the part Docker Hub, GHCR or Harbor run) hands out ES256 JWTs
after checking Basic credentials. The client must follow the WWW-Authenticate challenge to it."""
from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from hublab.runtime import pkg
from hublab.runtime.errors import HublabError

from test_pkg_support import FIXTURES, base_package, run_registry, ws  # noqa: F401

SERVICE, ISSUER = "hublab-test-registry", "hublab-test-token-server"  # as in fixtures/registry-token.yml
USER, PASSWORD = "robot", "token-test-pw"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _cert_and_key():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.DER), cert.public_bytes(serialization.Encoding.PEM)


def _jwt(key, cert_der: bytes, claims: dict) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class TokenServer:
    """GET /token?service=..&scope=.. with Basic auth -> {"token": JWT granting the scopes}."""

    def __init__(self):
        self.key, self.cert_der, self.cert_pem = _cert_and_key()
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok = auth == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                server.requests.append({"scope": q.get("scope", []), "authorized": ok})
                if not ok:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in q.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                now = int(time.time())
                token = _jwt(server.key, server.cert_der, {
                    "iss": ISSUER, "sub": USER, "aud": q.get("service", [""])[0], "exp": now + 300,
                    "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access})
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    tokens = TokenServer()
    work = tmp_path_factory.mktemp("oci-token")
    (work / "root.pem").write_bytes(tokens.cert_pem)
    env = {"REGISTRY_AUTH_TOKEN_REALM": tokens.url, "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE": str(work / "root.pem")}
    try:
        with run_registry(work, FIXTURES / "registry-token.yml", env) as url:
            yield url, tokens
    finally:
        tokens.close()


def _sorted_actions(scope: str) -> str:
    head, _, actions = scope.rpartition(":")
    return f"{head}:{','.join(sorted(actions.split(',')))}"


def test_bearer_token_auth_publish_search_install(ws, token_registry, monkeypatch):
    url, tokens = token_registry
    remote = f"{url}/team"
    src = base_package(ws.root / "src")
    pkg.build(src, key=ws.key)
    with pytest.raises(HublabError, match="login refused by .*/token \\(HTTP 401\\)"):
        pkg.publish(src, remote)
    monkeypatch.setenv("HUBLAB_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("HUBLAB_REGISTRY_PASSWORD", PASSWORD)
    r = pkg.publish(src, remote)
    assert r.uploaded_blobs == 5
    assert [p["name"] for p in pkg.search("tiny", remote)] == ["tiny"]
    assert pkg.install("tiny", remote, profile="pi4-4gb").variant == "q4_k_m" and pkg.verify().ok
    # the registry names a scope's actions in no fixed order ("pull,push" or "push,pull")
    scopes = {_sorted_actions(s) for req in tokens.requests if req["authorized"] for s in req["scope"]}
    assert {"repository:team/tiny:pull,push", "repository:team/tiny:pull", "registry:catalog:*"} <= scopes
    # A token handed in directly (HUBLAB_REGISTRY_TOKEN) is used as is; a bad one is refused.
    monkeypatch.delenv("HUBLAB_REGISTRY_USERNAME")
    monkeypatch.setenv("HUBLAB_REGISTRY_TOKEN", "not-a-jwt")
    with pytest.raises(HublabError, match="login refused"):
        pkg.install("tiny", remote, profile="host")
