"""Bad config input: every hostile value in system.toml or a model TOML is one ConfigError line that names
the file and the key and quotes at most a few characters of the value; `ai config` refuses it without
touching the file; a model that failed to load, a missing models dir or a corrupt GGUF header is named
with its reason."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ggufs import write_model_toml
from hublab.runtime.config import ConfigError, load_model, load_system
from hublab.runtime.serve.device import Device
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError
from hublab.runtime.engine.memory import GGUFError, read_gguf

HUGE = "x" * (10 << 20)  # a 10 MB value


def one_line(message: str, limit: int = 600) -> str:
    assert "\n" not in message and "Traceback" not in message, message[:300]
    assert len(message) <= limit, f"{len(message)} characters: {message[:200]}..."
    return message


# (section, key, TOML value) that load_system must refuse
SYSTEM_BAD = [
    *[("moe", "keyword_weight", v) for v in ("nan", "inf", "-inf", "+nan", "-0.1", "1.5", '"x"', "true", "[0.5]")],
    *[("moe", "sure", v) for v in ("nan", "inf", "-inf", "2.0", "-1")],
    *[("moe", "routing", v) for v in ('"topk:0"', '"topk:x"', '"topk:-1"', '"threshold:nan"', '"threshold:inf"',
                                      '"threshold:2"', '"threshold:"', '"bogus"', "5", '["topk:2"]', '"topk:²"',
                                      '"topk:99999999999"', '"single:3"', '""')],
    *[("moe", "synthesis", v) for v in ('"nope"', "3", '"BEST"', '""')],
    *[("runtime", "threads", v) for v in ("-1", "1000", "1.5", "nan", '"4"')],
    *[("runtime", "keep_alive", v) for v in ("nan", "inf", "-inf", '"forever"', '"1e400"', '"999999999999h"',
                                             "[1]", "1e300")],
    *[("runtime", "max_memory", v) for v in ("-5", '"lots"', '"1.5XB"', "nan", "inf", "1.5")],
    *[("agent", "port", v) for v in ("0", "70000", "-1", "nan", "80.5")],
    *[("agent", "queue_size", v) for v in ("0", "-3", "100000", "nan", "inf")],
    *[("inference", "temperature", v) for v in ("nan", "inf", "-inf", "-1", "6")],
    *[("inference", "top_p", v) for v in ("nan", "1.5", "-0.1")],
    *[("inference", "min_p", v) for v in ("nan", "2")],
    *[("inference", "repeat_penalty", v) for v in ("nan", "-1", "11", "inf")],
    *[("inference", "max_tokens", v) for v in ("-1", "99999999999", "nan", "1.5")],
    *[("inference", "top_k", v) for v in ("-1", "nan")],
    *[("inference", "context_size", v) for v in ("-1", str(1 << 30))],
    *[("inference", "seed", v) for v in ("-2", str(1 << 40))],
    ("inference", "stop", '["x"]'),  # not a system-wide setting
    ("moe", "keyword_wieght", "0.5"),
    ("agent", "x" * 10_000, "1"),
    ("trust", "keys", '"not-a-list"'),
    ("registry", "url", "5"),
    ("moe", "keyword_weight", "9" * 5000),  # an integer too long for Python to convert
    ("moe", "keyword_weight", f'"{HUGE}"'),
    ("runtime", "models_dir", "[1, 2]"),
]


@pytest.mark.parametrize("section,key,value", SYSTEM_BAD, ids=[f"{s}.{k[:20]}={v[:20]}" for s, k, v in SYSTEM_BAD])
def test_system_toml_bad_value(tmp_path, section, key, value):
    path = tmp_path / "system.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_system(path)
    msg = one_line(str(err.value))
    assert str(path) in msg


SYSTEM_SYNTAX = ["[moe\nrouting = 1", "[moe]\nrouting = ", "moe = [[[", "\x00", "[moe]\n" + "a" * 100 + " == 3",
                 "[moe]\nrouting = 'topk:2'\nrouting = 'all'", "[[moe]]\nrouting = 'all'", "[unknown]\nx = 1",
                 "[moe]\n[moe]\n", "[moe]\nkeyword_weight = 0.5.5", "[moe]\nsure = 1e", '[moe]\nfallback = """']


@pytest.mark.parametrize("text", SYSTEM_SYNTAX)
def test_system_toml_bad_syntax(tmp_path, text):
    path = tmp_path / "system.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_system(path)
    one_line(str(err.value))


def test_system_toml_not_utf8(tmp_path):
    path = tmp_path / "system.toml"
    path.write_bytes(b"[moe]\nfallback = \"\xff\xfe\"\n")
    with pytest.raises(ConfigError) as err:
        load_system(path)
    assert "UTF-8" in one_line(str(err.value))


# (section, key, TOML value) that load_model must refuse in an otherwise valid expert TOML
MODEL_BAD = [
    *[("inference", "temperature", v) for v in ("nan", "inf", "-inf", "-0.5", "5.5")],
    *[("inference", "top_p", v) for v in ("nan", "inf", "1.01")],
    *[("inference", "min_p", v) for v in ("nan", "-1")],
    *[("inference", "repeat_penalty", v) for v in ("nan", "inf")],
    *[("inference", "max_tokens", v) for v in ("-5", "inf", str(1 << 40))],
    *[("inference", "context_size", v) for v in ("-1", str(1 << 40))],
    *[("inference", "seed", v) for v in ("-7", str(1 << 33))],
    *[("inference", "stop", v) for v in ('[""]', "[1]", '"x"')],
    ("inference", "system_prompt", "3"),
    *[("expert", "threshold", v) for v in ("nan", "inf", "-0.1", "1.1")],
    *[("expert", "scale", v) for v in ("nan", "inf", "-inf", "100")],
    *[("expert", "knowledge_min", v) for v in ("nan", "-2", "2", "inf")],
    *[("expert", "knowledge_shots", v) for v in ("-1", "9", "nan")],
    *[("expert", "knowledge_bias", v) for v in ("nan", "-1", "11", "inf")],
    *[("expert", "keywords", v) for v in ('[""]', "[1]", '"python"', '["  "]')],
    *[("expert", "examples", v) for v in ('[""]', "[3]", '["a", "A"]')],
    ("expert", "examples_file", '"../../etc/passwd"'),
    ("expert", "examples_file", '"missing.txt"'),
    ("expert", "temperature", "0.5"),  # a key in the wrong section
    ("model", "chat_format", '"klingon"'),
    ("model", "type", '"weird"'),
    ("model", "name", f'"{HUGE[:100_000]}"'),
    ("model", "name", '"bad name!"'),
    ("inference", "temperature", f'"{HUGE}"'),
]


def _expert_toml(path: Path, section: str, key: str, value: str) -> None:
    sections = {"model": ['name = "broken"', 'type = "expert"'], "expert": ['base = "tiny"'],
                "inference": []}
    sections[section] = [line for line in sections[section] if not line.startswith(f"{key} =")] + [f"{key} = {value}"]
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items())
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("section,key,value", MODEL_BAD, ids=[f"{s}.{k}={v[:20]}" for s, k, v in MODEL_BAD])
def test_model_toml_bad_value(tmp_path, section, key, value):
    path = tmp_path / "broken.toml"
    _expert_toml(path, section, key, value)
    with pytest.raises(ConfigError) as err:
        load_model(path)
    msg = one_line(str(err.value))
    assert str(path) in msg


def write_system(tmp_path: Path, models_dir) -> Path:
    """A system.toml in tmp_path: `models_dir`, the host profile."""
    config = tmp_path / "system.toml"
    config.write_text(f'[runtime]\nmodels_dir = "{models_dir}"\nprofile = "host"\n', encoding="utf-8")
    return config


def open_device(tmp_path: Path, models_dir) -> Device:
    return Device(Runtime(system=load_system(write_system(tmp_path, models_dir))))


@pytest.fixture
def device(tmp_path, tiny_models_dir):
    d = open_device(tmp_path, tiny_models_dir)
    yield d
    d.close()


# `ai config KEY VALUE` as typed at the shell: refused, and system.toml is byte for byte what it was
AI_CONFIG_BAD = [("keyword_weight", "nan"), ("keyword_weight", "inf"), ("keyword_weight", "-1"), ("sure", "NaN"),
                 ("temperature", "-1"), ("temperature", "nan"), ("top_p", "inf"), ("max_tokens", "-3"),
                 ("threads", "-1"), ("keep_alive", "inf"), ("keep_alive", "nan"), ("queue_size", "0"),
                 ("port", "70000"), ("routing", "topk:0"), ("synthesis", "nope"), ("max_memory", "-5"),
                 ("models_dir", "/nonexistent/models"), ("models_dir", "relative/missing"), ("nonsense", "1"),
                 ("temperature", HUGE), ("routing", HUGE), (HUGE[:100_000], "1")]


@pytest.mark.parametrize("key,value", AI_CONFIG_BAD, ids=[f"{k[:20]}={v[:12]}" for k, v in AI_CONFIG_BAD])
def test_ai_config_refuses_and_keeps_the_file(device, key, value):
    path = device.rt.system.path
    before = path.read_bytes()
    with pytest.raises(HublabError) as err:
        device.config(key, value)
    one_line(str(err.value))
    assert path.read_bytes() == before


def test_ai_config_model_value_refused_and_file_kept(device):
    source = device.config_of("alpha").source
    before = source.read_bytes()
    for key, value in (("temperature", "nan"), ("top_p", "2"), ("max_tokens", "-1"), ("seed", "-9")):
        with pytest.raises(HublabError) as err:
            device.config(key, value, "alpha")
        one_line(str(err.value))
    assert source.read_bytes() == before


def test_unknown_model_says_why_a_broken_toml_failed(tmp_path, tiny_models_dir):
    (tiny_models_dir / "experts" / "broken.toml").write_text(
        '[model]\nname = "broken"\n[expert]\nbase = "tiny"\n[inference]\ntemperature = nan\n', encoding="utf-8")
    d = open_device(tmp_path, tiny_models_dir)
    try:
        with pytest.raises(HublabError) as err:
            d.load("broken")
        msg = one_line(str(err.value))
        assert "broken.toml" in msg and "temperature" in msg and "finite" in msg
        with pytest.raises(HublabError) as err:  # another unknown name points at the failures
            d.load("nothing-like-it")
        assert "failed to load" in one_line(str(err.value))
    finally:
        d.close()


def test_unknown_model_says_the_models_dir_is_missing(tmp_path):
    d = open_device(tmp_path, "/nonexistent/hublab-models")
    try:
        with pytest.raises(HublabError) as err:
            d.info("general")
        msg = one_line(str(err.value))
        assert "/nonexistent/hublab-models" in msg and "not found" in msg
    finally:
        d.close()


def test_run_names_a_broken_expert_toml(tmp_path, tiny_models_dir, capsys, monkeypatch):
    from hublab.cli import main

    (tiny_models_dir / "experts" / "broken.toml").write_text(
        '[model]\nname = "broken"\n[expert]\nbase = "tiny"\nscale = inf\n', encoding="utf-8")
    monkeypatch.setenv("HUBLAB_CONFIG", str(write_system(tmp_path, tiny_models_dir)))
    assert main(["run", "broken", "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert "broken.toml" in one_line(err) and "scale" in err


# -- GGUF headers with absurd numbers: the file is named, not reported as a memory shortfall ----------

def _gguf(path: Path, kv: dict[str, tuple[int, bytes]], tensors: list[tuple[str, list[int], int]]) -> Path:
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv) + 1)
    out += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    for key, (vtype, raw) in kv.items():
        out += s(key) + struct.pack("<I", vtype) + raw
    for name, dims, ttype in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, 0)
    path.write_bytes(out + b"\0" * 64)
    return path


GGUF_BAD = {
    "huge-tensor": ({}, [("w", [1 << 40, 1 << 40], 0)]),
    "wrapping-tensor": ({}, [("w", [1 << 62, 8, 4, 2], 0)]),
    "five-dims": ({}, [("w", [1, 1, 1, 1, 1], 0)]),
    "zero-dims": ({}, [("w", [], 0)]),
    "block-count": ({"llama.block_count": (10, struct.pack("<Q", 1 << 40))}, []),
    "embedding": ({"llama.embedding_length": (10, struct.pack("<Q", 1 << 50))}, []),
    "context": ({"llama.context_length": (4, struct.pack("<I", 0xFFFFFFFF))}, []),
    "heads-negative": ({"llama.attention.head_count": (5, struct.pack("<i", -4))}, []),
    "unknown-type": ({}, [("w", [4], 999)]),
}


@pytest.mark.parametrize("case", list(GGUF_BAD))
def test_gguf_header_with_absurd_numbers_names_the_file(tmp_path, case):
    kv, tensors = GGUF_BAD[case]
    path = _gguf(tmp_path / f"{case}.gguf", kv, tensors)
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    msg = one_line(str(err.value))
    assert str(path.resolve()) in msg or str(path) in msg


def test_absurd_gguf_in_a_model_is_named_by_info(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    gguf = _gguf(models / "absurd.gguf", {"llama.block_count": (10, struct.pack("<Q", 1 << 40))}, [])
    write_model_toml(models / "absurd.toml", "absurd", gguf_path=gguf)
    d = open_device(tmp_path, models)
    try:
        with pytest.raises(HublabError) as err:
            d.info("absurd")
        msg = one_line(str(err.value))
        assert "absurd.gguf" in msg and "block_count" in msg
    finally:
        d.close()
