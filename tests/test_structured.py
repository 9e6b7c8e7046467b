"""Structured output: JSON schemas, grammars and tool calls, from runtime/engine/structured.py through the engine's
constrained sampler to the OpenAI and Ollama APIs, driven with the official clients.

The tiny llama gives its byte tokens no output weight, so under a grammar (which allows only bytes where JSON
punctuation goes) it draws nearly uniformly among the allowed tokens: a fuzzer of the grammars, whose every
answer must parse and validate (checked with the jsonschema library, not with hublab's own validator)."""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from ggufs import write_model_toml, write_tiny_llama
from hublab.runtime.engine import structured as st
from hublab.runtime.serve.agent import Agent
from hublab.runtime.config import load_system
from hublab.runtime.serve.device import Device
from hublab.runtime.engine.runtime import Runtime
from hublab.runtime.errors import HublabError

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

SCHEMAS = {
    "enum": {"type": "object", "properties": {"room": {"enum": ["kitchen", "bedroom", "hall"]},
                                               "on": {"type": "boolean"}}, "required": ["room", "on"],
             "additionalProperties": False},
    "nested": {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"]}}, "required": ["name", "address"]}}, "required": ["person"]},
    "array": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                        "minItems": 1, "maxItems": 4}},
              "required": ["tags"]},
    "ranges": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "delta": {"type": "integer", "minimum": -40, "exclusiveMaximum": 7},
        "temp": {"type": "number", "minimum": -30, "maximum": 45},
        "share": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["age", "delta", "temp", "share"]},
    "optional": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "note": {"anyOf": [{"type": "string", "maxLength": 8},
                                                                     {"type": "null"}]},
                                                  "when": {"type": "string", "format": "date"}},
                 "required": ["id"]},
    "recursive": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"]}},
        "$ref": "#/$defs/node"},
}
LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Turn a light on or off",
    "parameters": {"type": "object", "properties": {"room": {"enum": ["kitchen", "hall"]}, "on": {"type": "boolean"},
                                                    "level": {"type": "integer", "minimum": 0, "maximum": 100}},
                   "required": ["room", "on"], "additionalProperties": False}}}
THERMO = {"type": "function", "function": {
    "name": "set_heat", "parameters": {"type": "object", "properties": {
        "celsius": {"type": "number", "minimum": 5, "maximum": 30}}, "required": ["celsius"]}}}


@pytest.fixture(scope="module")
def fuzz_gguf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("fuzz") / "fuzz.gguf", n_ctx=2048)


@pytest.fixture(scope="module")
def config(tmp_path_factory, fuzz_gguf):
    root = tmp_path_factory.mktemp("structured")
    models = root / "models"
    (models / "experts").mkdir(parents=True)
    write_model_toml(models / "tiny.toml", "tiny", gguf_path=fuzz_gguf, context_size=2048)
    for name in ("alpha", "beta"):
        write_model_toml(models / "experts" / f"{name}.toml", name, base="tiny", max_tokens=400,
                         extra=f'keywords = ["{name}"]\n')
    path = root / "system.toml"
    path.write_text(f'[runtime]\nmodels_dir = "{models}"\nprofile = "host"\nthreads = 1\n\n[moe]\nfallback = "alpha"\n'
                    'routing = "all"\n')
    return path


@pytest.fixture(scope="module")
def agent(config):
    device = Device(Runtime(system=load_system(config)))
    a = Agent(device, port=0, quiet=True).start()
    yield a
    a.stop()
    device.close()


@pytest.fixture(scope="module")
def oai(agent):
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def oll(agent):
    return ollama.Client(host=agent.url)


# ---------------------------------------------------------------------------------------------------
# The engine: every answer a random walk through the grammar, and valid

@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_answers_parse_and_validate(agent, name):
    rt = agent.device.rt
    grammar = st.json_schema(SCHEMAS[name]).grammar
    for seed in range(6):
        r = rt.generate("alpha", "x", grammar=grammar, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                        max_tokens=400)
        assert r.finish_reason == "stop", (name, seed, r.text)
        jsonschema.validate(json.loads(r.text), SCHEMAS[name])


def test_a_grammar_that_never_ends_stops_at_max_tokens(agent):
    r = agent.device.rt.generate("alpha", "x", grammar='root ::= "a" root', max_tokens=12)
    assert r.finish_reason == "length" and r.tokens == 12 and set(r.text) == {"a"}


def test_unconstrained_answers_are_unchanged(agent):
    rt = agent.device.rt
    free = rt.generate("alpha", "python rust", max_tokens=12)
    loose = rt.generate("alpha", "python rust", max_tokens=12, grammar="root ::= [^\\x00]*")
    assert free.text == loose.text  # a grammar every token passes keeps the greedy answer


def test_range_digits_are_exact():
    import re

    for lo, hi in ((0, 0), (0, 9), (3, 7), (10, 99), (7, 1234), (95, 105), (0, 120), (123, 456), (1, 1000)):
        rule = st._digits(lo, hi)
        rx = re.sub(r'"([0-9])"', r"\1", rule).replace(" ", "")
        assert all(bool(re.fullmatch(rx, str(n))) == (lo <= n <= hi) for n in range(0, 1300)), (lo, hi, rule)
        assert not re.fullmatch(rx, "0" + str(max(lo, 1)))  # no leading zeros


# ---------------------------------------------------------------------------------------------------
# Bad input: a one-line error naming the problem, before anything runs

BAD = [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
     "unsupported keyword 'not' at $.properties.a"),
    ({"oneOf": [{"type": "string"}]}, "unsupported keyword 'oneOf'"),
    ({"type": "integer", "multipleOf": 5}, "unsupported keyword 'multipleOf'"),
    ({"type": "string", "format": "email"}, "format 'email' is not kept"),
    ({"type": "strin"}, "not a JSON schema type"),
    ({"enum": []}, "enum must be a non-empty list"),
    ({"type": "integer", "minimum": 10, "maximum": 1}, "the range is empty"),
    ({"type": "number", "minimum": 0.5}, "whole-number"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 is over maxItems 1"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required names 'x'"),
    ({"$ref": "#/$defs/missing"}, "is not one of this schema's $defs"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"type": "string", "pattern": "(?=a)b"}, "cannot be turned into a grammar"),
    ({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
      "$ref": "#/$defs/n"}, "can never finish"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON schema object"),
]


def deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("schema,problem", [*BAD, (deep(40), "nested deeper than 32"),
                                            (deep(5000), "nested deeper than 32")])
def test_bad_schemas_are_named(schema, problem):
    with pytest.raises(st.StructureError, match=None) as exc:
        st.json_schema(schema)
    assert problem in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("grammar,problem", [
    ('root ::= "a" root', "can never finish"),
    ('root ::= x\nx ::= "(" x ")"', "can never finish"),
    ('root ::= "a" | foo', "rule foo is used but not defined"),
    ('start ::= "a"', "no rule named root"),
    ("root ::= " + '"a" ' * 40000, "over the"),
])
def test_bad_grammars_are_named(grammar, problem):
    with pytest.raises(st.StructureError) as exc:
        st.gbnf(grammar)
    assert problem in str(exc.value)


def test_llama_cpp_parse_errors_are_400s_that_say_what_it_said(oai):
    for grammar, said in (('root ::= "a" ((', "expecting ')'"), ('root ::= x\nx ::= x "a" | "b"', "left recursion")):
        with pytest.raises(openai.BadRequestError) as exc:
            oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                        extra_body={"grammar": grammar})
        assert said in str(exc.value)
    assert httpx.get(str(oai.base_url).replace("/v1/", "/health")).json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------
# OpenAI: response_format, grammar, tools, through the official client

def test_openai_response_format_json_schema_plain_and_streamed(oai):
    for name in ("enum", "ranges", "nested"):
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
        for model in ("alpha", "moe"):
            r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "alpha beta"}],
                                            response_format=fmt, temperature=1.0, seed=3, max_tokens=400)
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[name])
            stream = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "alpha beta"}],
                                                 response_format=fmt, temperature=1.0, seed=4, max_tokens=400,
                                                 stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    r = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_object"}, max_tokens=400)
    choice = r.choices[0]
    assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict)
    r = oai.completions.create(model="alpha", prompt="x", max_tokens=8, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_heat"}}])
def test_openai_tool_calls_validate(oai, choice):
    tools = [LIGHT, THERMO]
    for seed in range(4):
        r = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "alpha"}], tools=tools,
                                        tool_choice=choice, temperature=1.0, seed=seed, max_tokens=400)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
        call = msg.tool_calls[0]
        spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), spec)
        if isinstance(choice, dict):
            assert call.function.name == "set_heat"
    stream = oai.chat.completions.create(model="moe", messages=[{"role": "user", "content": "alpha beta"}],
                                         tools=tools, tool_choice="required", max_tokens=400, stream=True)
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name in ("set_light", "set_heat")
    json.loads(calls[0].function.arguments)


def test_openai_auto_answers_text_or_a_call_and_takes_tool_messages(oai):
    history = [{"role": "user", "content": "turn on the hall light"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "set_light", "arguments": '{"room": "hall", "on": true}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'}]
    for seed in range(6):
        r = oai.chat.completions.create(model="alpha", messages=history, tools=[LIGHT], temperature=1.0, seed=seed,
                                        max_tokens=60)
        msg = r.choices[0].message
        if msg.tool_calls:
            jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), LIGHT["function"]["parameters"])
        else:
            assert not msg.content.lstrip().startswith("{")


def test_a_call_is_rendered_as_tool_call_training_data_has_it(agent):
    from hublab.runtime.chat import render

    prompt = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": st.render_call("set_light", '{"room": "hall"}')}]
    assert '{"name": "set_light", "arguments": {"room": "hall"}}' in render("gemma", prompt).text


# ---------------------------------------------------------------------------------------------------
# Ollama: format and tools, through the official client

def test_ollama_format_schema_and_json(oll):
    for name in ("enum", "array", "optional"):
        for model in ("alpha", "moe"):
            r = oll.chat(model=model, messages=[{"role": "user", "content": "alpha"}], format=SCHEMAS[name],
                         options={"temperature": 1.0, "seed": 5, "num_predict": 400})
            jsonschema.validate(json.loads(r.message.content), SCHEMAS[name])
        parts = oll.generate(model="alpha", prompt="x", format=SCHEMAS[name], stream=True,
                             options={"temperature": 1.0, "seed": 6, "num_predict": 400})
        jsonschema.validate(json.loads("".join(p.response for p in parts)), SCHEMAS[name])
    r = oll.generate(model="alpha", prompt="x", format="json", options={"num_predict": 400})
    # any object: this model's random strings may run to num_predict (then the answer says length)
    assert r.done_reason == "length" or isinstance(json.loads(r.response), dict)


def test_ollama_tools_answer_message_tool_calls(oll):
    history = [{"role": "user", "content": "alpha"},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "set_heat",
                                                                                 "arguments": {"celsius": 20}}}]},
               {"role": "tool", "content": "ok", "tool_name": "set_heat"}]
    for stream, seed in ((False, 1), (False, 2), (True, 3), (True, 4)):
        out = oll.chat(model="alpha", messages=history, tools=[LIGHT, THERMO], stream=stream,
                       options={"temperature": 1.0, "seed": seed, "num_predict": 60})
        parts = list(out) if stream else [out]
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        text = "".join(p.message.content or "" for p in parts)
        if calls:  # auto: a call, or text that is not one
            assert len(calls) == 1 and not text
            spec = {"set_light": LIGHT, "set_heat": THERMO}[calls[0].function.name]["function"]["parameters"]
            jsonschema.validate(dict(calls[0].function.arguments), spec)
        else:
            assert not text.lstrip().startswith("{")
    r = httpx.post(oll._client.base_url.join("/api/chat"), json={
        "model": "alpha", "messages": [{"role": "user", "content": "alpha"}], "tools": [LIGHT], "stream": False,
        "hublab": {"tool_choice": "required"}, "options": {"temperature": 1.0, "num_predict": 400}}, timeout=60).json()
    call = r["message"]["tool_calls"][0]["function"]
    assert call["name"] == "set_light" and r["message"]["content"] == ""
    jsonschema.validate(call["arguments"], LIGHT["function"]["parameters"])


# ---------------------------------------------------------------------------------------------------
# No field silently ignored: every documented field of both APIs is honoured or a 400 that names it

MSG = [{"role": "user", "content": "alpha"}]
# OpenAI's documented /v1/chat/completions request fields, with a value hublab does not do: each is a 400 naming it
OPENAI_REFUSED = {"n": 2, "logprobs": True, "top_logprobs": 2, "frequency_penalty": 0.5, "presence_penalty": 0.5,
                  "logit_bias": {"5": 1}, "store": True, "metadata": {"a": "b"}, "service_tier": "flex",
                  "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "mp3"},
                  "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
                  "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto",
                  "parallel_tool_calls": "yes", "stream_options": {"include_obfuscation": True},
                  "response_format": {"type": "yaml"}, "tool_choice": "required", "made_up_field": 1}
# ... and with a value hublab honours (or whose effect it already has): each answers
OPENAI_HONOURED = {"n": 1, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
                   "store": False, "service_tier": "auto", "modalities": ["text"], "user": "u1",
                   "safety_identifier": "s", "prompt_cache_key": "k", "parallel_tool_calls": False, "seed": 7,
                   "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2, "stop": ["x"],
                   "max_tokens": 5, "max_completion_tokens": 5, "stream_options": {"include_usage": True},
                   "response_format": {"type": "text"}, "tool_choice": "none"}
OLLAMA_OPTIONS_REFUSED = {"typical_p": 0.5, "repeat_last_n": 32, "presence_penalty": 1.0, "frequency_penalty": 1.0,
                          "penalize_newline": False, "mirostat": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
                          "tfs_z": 0.5, "num_keep": 5, "num_batch": 64, "num_thread": 4, "num_gpu": 1, "main_gpu": 1,
                          "numa": True, "use_mmap": False, "use_mlock": True, "low_vram": True, "vocab_only": True,
                          "f16_kv": False, "made_up_option": 1}
OLLAMA_OPTIONS_HONOURED = {"seed": 3, "num_predict": 5, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "temperature": 0.5,
                           "repeat_penalty": 1.2, "stop": ["x"], "num_ctx": 512, "typical_p": 1.0, "repeat_last_n": 64,
                           "presence_penalty": 0, "frequency_penalty": 0, "mirostat": 0, "tfs_z": 1.0, "num_gpu": 0}
OLLAMA_CHAT_REFUSED = {"think": True, "made_up": 1}
OLLAMA_GENERATE_REFUSED = {"suffix": "y", "images": ["aGk="], "template": "{{ .Prompt }}", "context": [1, 2],
                           "think": "high"}
OLLAMA_MESSAGE_REFUSED = {"images": ["aGk="], "thinking": "hmm", "made_up": 1}


def test_every_documented_openai_field_is_honoured_or_named(agent):
    url = agent.url + "/v1/chat/completions"
    for field, value in OPENAI_REFUSED.items():
        r = httpx.post(url, json={"model": "alpha", "messages": MSG, "max_tokens": 4, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    for field, value in OPENAI_HONOURED.items():
        r = httpx.post(url, json={"model": "alpha", "messages": MSG, "max_tokens": 4, field: value})
        assert r.status_code == 200, (field, r.text)
    for field, value in {"echo": True, "best_of": 2, "suffix": "x", "logprobs": 3, "tools": [LIGHT]}.items():
        r = httpx.post(agent.url + "/v1/completions", json={"model": "alpha", "prompt": "x", field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    r = httpx.post(url, json={"model": "alpha", "messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert r.status_code == 400 and "messages[0].name" in r.json()["error"]["message"]


def test_every_documented_ollama_field_is_honoured_or_named(agent):
    chat, generate = agent.url + "/api/chat", agent.url + "/api/generate"
    base = {"model": "alpha", "messages": MSG, "stream": False}
    for field, value in OLLAMA_OPTIONS_REFUSED.items():
        r = httpx.post(chat, json={**base, "options": {"num_predict": 4, field: value}})
        assert r.status_code == 400 and f"options.{field}" in r.json()["error"], (field, r.text)
    r = httpx.post(chat, json={**base, "options": {**OLLAMA_OPTIONS_HONOURED, "num_predict": 4}})
    assert r.status_code == 200, r.text
    for field, value in OLLAMA_CHAT_REFUSED.items():
        r = httpx.post(chat, json={**base, field: value})
        assert r.status_code == 400 and field in r.json()["error"], (field, r.text)
    for field, value in OLLAMA_GENERATE_REFUSED.items():
        r = httpx.post(generate, json={"model": "alpha", "prompt": "x", "stream": False, field: value})
        assert r.status_code == 400 and field in r.json()["error"], (field, r.text)
    for field, value in OLLAMA_MESSAGE_REFUSED.items():
        r = httpx.post(chat, json={**base, "messages": [{"role": "user", "content": "x", field: value}]})
        assert r.status_code == 400 and f"messages[0].{field}" in r.json()["error"], (field, r.text)
    r = httpx.post(chat, json={**base, "think": False, "keep_alive": "5m", "format": "",
                               "options": {"num_predict": 4}})
    assert r.status_code == 200, r.text
    r = httpx.post(generate, json={"model": "alpha", "prompt": "x", "stream": False, "raw": True, "system": "s",
                                   "suffix": "", "template": "", "images": [], "options": {"num_predict": 4}})
    assert r.status_code == 200, r.text


def test_structure_errors_are_hublab_errors():
    assert issubclass(st.StructureError, HublabError)


def test_json_closing_reads_what_is_open():
    from hublab.runtime.engine.session import json_closing

    assert json_closing('{"items": [{"item": "9V", "coun') == '"}]}'
    assert json_closing('{"a": "x\\"]", "b": [1, 2') == "]}"   # brackets inside strings and escapes do not count
    assert json_closing('{"a": 1}') == "" and json_closing("plain text") == ""


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_document_longer_than_max_tokens_is_closed_in_time(agent, seed):
    """An array with no maxItems under a small max_tokens: the last tokens close the document instead of the limit
    cutting it, so it still parses and validates (the tiny model, sampled, would go on for ever)."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
              "required": ["items"]}
    c = st.json_schema(schema)
    r = agent.device.rt.generate("alpha", "list things", max_tokens=40, temperature=1.0, seed=seed,
                                 grammar=c.grammar)
    assert r.tokens <= 40
    jsonschema.validate(json.loads(r.text), schema)
