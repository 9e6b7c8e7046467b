"""Property-based bad input (Hypothesis): system.toml and model TOMLs, package manifests, OCI manifests and
API request bodies built from the keys we know and values of every type and size. Whatever comes in, the
answer is the parsed thing or our one-line error: never a traceback, never a 5xx."""
from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hublab.runtime.serve.agent import Agent
from hublab.runtime.config import MODEL_SCHEMA, SYSTEM_SCHEMA, ConfigError, load_model, load_system, toml_value
from hublab.runtime.serve.device import Device
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.pkg.manifest import ManifestError, parse_manifest
from hublab.runtime.pkg.registry import RegistryError, parse_oci

from test_agent import long_gguf, write_device  # noqa: F401 - long_gguf is a fixture

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 0.5, 1e308, -0.0, 2 ** 32]),
    st.text(max_size=40), st.sampled_from(["", " ", "topk:2", "topk:0", "threshold:nan", "5m", "-1", "nan", "inf",
                                           "best", "all", "x" * 5000, "\udcff", "\x00", "1e999", "512MB", "-5GB"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=12)


def one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and len(message) < 2000, message[:300]


def toml_of(value) -> str | None:
    """`value` written as TOML, or None when TOML cannot say it (null, tables inside lists...)."""
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, list):
        parts = [toml_of(v) for v in value]
        return None if any(p is None for p in parts) else "[" + ", ".join(parts) + "]"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return None  # not encodable as a UTF-8 file
    return toml_value(value)


def toml_doc(schema: dict[str, dict], extra_keys: bool = True):
    """A TOML document over `schema`'s sections and keys (plus a few unknown ones), values of any type."""
    def section(name: str):
        keys = st.sampled_from(sorted(schema[name]) + (["nope", "x" * 300] if extra_keys else []))
        return st.dictionaries(keys, json_values, max_size=5)

    return st.fixed_dictionaries({}, optional={name: section(name) for name in schema})


def write_toml(path: Path, doc: dict, head: str = "") -> bool:
    lines = [head] if head else []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = toml_of(value)
            if text is None:
                return False
            lines.append(f"{json.dumps(key)} = {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return True


def load_or_one_error(load, path: Path, doc: dict):
    """`load(path)` of `doc` written as TOML; None when it is not writable as TOML or refused with one line."""
    if not write_toml(path, doc):
        return None
    try:
        return load(path)
    except ConfigError as exc:
        one_line(str(exc))
        return None


@SETTINGS
@given(doc=toml_doc(SYSTEM_SCHEMA))
def test_any_system_toml_loads_or_is_one_config_error(tmp_path, doc):
    system = load_or_one_error(load_system, tmp_path / "system.toml", doc)
    if system is None:
        return
    for value in (system.keyword_weight, system.sure, system.keep_alive):
        assert math.isfinite(value)  # whatever loads is usable


@SETTINGS
@given(doc=toml_doc({k: v for k, v in MODEL_SCHEMA.items()}))
def test_any_model_toml_loads_or_is_one_config_error(tmp_path, doc):
    doc = {"model": {"name": "m", "path": "m.gguf"}, **doc} if "model" not in doc else doc
    cfg = load_or_one_error(load_model, tmp_path / "m.toml", doc)
    if cfg is None:
        return
    inf = cfg.inference
    for value in (inf.temperature, inf.top_p, inf.min_p, inf.repeat_penalty, cfg.threshold, cfg.scale,
                  cfg.knowledge_min, cfg.knowledge_bias):
        assert math.isfinite(value)


PACKAGE_KEYS = ["name", "version", "category", "description", "license", "requires", "files", "variants", "models",
                "experts", "path", "role", "size", "sha256", "quant", "nope"]
package_tables = st.dictionaries(st.sampled_from(PACKAGE_KEYS), json_values, max_size=6)
package_docs = st.dictionaries(st.sampled_from(["package", "files", "variants", "nope"]),
                               st.one_of(package_tables, st.lists(package_tables, max_size=3)),
                               max_size=3)


@SETTINGS
@given(doc=package_docs)
def test_any_package_manifest_parses_or_is_one_manifest_error(doc):
    lines = []
    for section, value in doc.items():
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(value, list) else f"[{section}]")
            for key, v in table.items():
                text = toml_of(v)
                if text is None:
                    return
                lines.append(f"{key} = {text}")
    try:
        parse_manifest("\n".join(lines).encode("utf-8"), "package.toml")
    except (ManifestError, ConfigError) as exc:
        one_line(str(exc))


@SETTINGS
@given(doc=st.one_of(json_values, st.fixed_dictionaries({"schemaVersion": st.sampled_from([2, 2, "2", None])},
                                                         optional={"config": json_values, "layers": json_values,
                                                                   "annotations": json_values,
                                                                   "mediaType": json_values})))
def test_any_oci_manifest_parses_or_is_one_registry_error(doc):
    try:
        raw = json.dumps(doc).encode()
    except ValueError:
        return
    try:
        parse_oci(raw, "fake registry tiny:1")
    except RegistryError as exc:
        one_line(str(exc))


# ---------------------------------------------------------------------------------------------------
# API bodies: any JSON object made of the fields each endpoint reads

@pytest.fixture(scope="module")
def agent(tmp_path_factory, tiny_gguf, tiny_adapters, long_gguf):  # noqa: F811
    config = write_device(tmp_path_factory.mktemp("props"), tiny_gguf, tiny_adapters, long_gguf)
    a = Agent(Device(Runtime(system=load_system(config))), port=0, quiet=True, request_timeout=5.0).start()
    yield a
    a.stop()
    a.device.close()


small_tokens = st.one_of(st.integers(min_value=1, max_value=6), json_values)  # never a long valid generation
messages = st.one_of(json_values, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", 5]),
                                                                  "content": json_values}), max_size=3))
models = st.sampled_from(["alpha", "moe", "plain", "tiny", "router", "nope", "", 5, None, "alpha:latest"])
OPENAI = st.fixed_dictionaries({"model": models, "max_tokens": small_tokens}, optional={
    "messages": messages, "prompt": json_values, "temperature": json_values, "top_p": json_values,
    "top_k": json_values, "min_p": json_values, "seed": json_values, "stop": json_values, "stream": json_values,
    "stream_options": json_values, "repeat_penalty": json_values,
    "hublab": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "routing": json_values, "synthesis": json_values, "parse_special": json_values}))})
OLLAMA = st.fixed_dictionaries({"model": models, "options": st.one_of(json_values, st.fixed_dictionaries(
    {"num_predict": small_tokens}, optional={"temperature": json_values, "num_ctx": json_values, "seed": json_values,
                                             "top_k": json_values, "stop": json_values}))}, optional={
    "messages": messages, "prompt": json_values, "system": json_values, "raw": json_values, "stream": json_values,
    "keep_alive": json_values, "hublab": json_values, "input": json_values, "format": json_values})
HUBLAB = st.fixed_dictionaries({"max_tokens": small_tokens}, optional={
    "query": json_values, "routing": json_values, "synthesis": json_values, "name": json_values, "stream": json_values})


def _post(agent, path: str, body: dict) -> None:
    try:
        raw = json.dumps(body).encode()  # NaN and Infinity go out as written: the agent must refuse them
    except (ValueError, UnicodeEncodeError):
        return
    if b"\\ud" in raw:
        raw = raw.replace(b"\\udcff", b"\\ufffd")
    r = httpx.post(agent.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        doc = r.json()
        message = doc["error"] if isinstance(doc["error"], str) else doc["error"]["message"]
        one_line(message)


@SETTINGS
@given(body=OPENAI, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_any_openai_body_is_answered_or_a_4xx(agent, body, path):
    _post(agent, path, body)


@SETTINGS
@given(body=OLLAMA, path=st.sampled_from(["/api/chat", "/api/generate", "/api/embed", "/api/show"]))
def test_any_ollama_body_is_answered_or_a_4xx(agent, body, path):
    _post(agent, path, body)


@SETTINGS
@given(body=HUBLAB, path=st.sampled_from(["/hublab/route", "/hublab/ask", "/hublab/load", "/hublab/settings"]))
def test_any_hublab_body_is_answered_or_a_4xx(agent, body, path):
    if path == "/hublab/ask":
        body = {**body, "stream": False}
    _post(agent, path, body)
