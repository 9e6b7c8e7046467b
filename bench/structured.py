"""Structured output, one run: validity through the official clients, speed against unconstrained decoding and
against llama-server on the same schema and prompts; prints one JSON document (issue 29's goals beside it).

Validity: `hublab serve` in-process on the demo experts; every expert and `moe` answers PROMPTS prompts for each of
the five schemas (enums, nested objects, arrays, integer and number ranges, required/optional fields) through
the `openai` client (response_format json_schema) and the `ollama` client (format), and tool requests
(tool_choice required) through `openai`; an answer counts when it parses and validates (jsonschema).
Speed: greedy, 1 thread, the general expert: decode tokens/s of the same prompts constrained and unconstrained
(hublab's own ratio), and llama-server (built from the pinned llama-cpp-python's vendored llama.cpp, as
bench/vs_llama_server.py builds it) with json_schema on the same prompts, the same adapter.

    .venv/bin/python bench/structured.py [--prompts 50] [--speed-prompts 10] [--tokens 96] [--no-llama-server]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

EXPERTS = ["python", "rust", "system", "ai", "general"]
ROOMS = ["kitchen", "bedroom", "living room", "hall", "bathroom"]
SCHEMAS = {
    "light": {"type": "object", "properties": {
        "room": {"enum": ROOMS}, "on": {"type": "boolean"},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["room", "on"],
        "additionalProperties": False},
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                     "country": {"type": "string", "maxLength": 40}},
                    "required": ["city"]}}, "required": ["name", "age", "address"]},
    "shopping": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 6, "items": {
        "type": "object", "properties": {"item": {"type": "string", "maxLength": 30},
                                         "count": {"type": "integer", "minimum": 1, "maximum": 20}},
        "required": ["item", "count"]}}}, "required": ["items"]},
    "climate": {"type": "object", "properties": {
        "room": {"enum": ROOMS}, "celsius": {"type": "number", "minimum": 5, "maximum": 30},
        "mode": {"enum": ["heat", "cool", "auto", "off"]}}, "required": ["celsius", "mode"]},
    "answer": {"type": "object", "properties": {
        "answer": {"type": "string", "maxLength": 200}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "sources": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3},
        "topic": {"anyOf": [{"enum": ["python", "rust", "linux", "ai", "other"]}, {"type": "null"}]}},
        "required": ["answer", "confidence"]},
}
TEMPLATES = {
    "light": ["Turn {on} the {room} light.", "Please switch the {room} lights {on}.", "{on} the lamp in the {room}.",
              "Set the {room} light {on} at {n} percent.", "Could you make the {room} light {on}?"],
    "person": ["{name} is {n} years old and lives in {city}.", "Describe {name}, aged {n}, from {city}.",
               "Who is {name}? {name} is {n} and lives in {city}.", "Record {name}, {n}, {city}.",
               "My neighbour {name} from {city} turned {n}."],
    "shopping": ["Add {n} {thing} to the shopping list.", "We need {n} {thing} and some bread.",
                 "Buy {thing}, {n} of them.", "Shopping: {n} {thing}, milk.", "Put {thing} on the list ({n})."],
    "climate": ["Set the {room} to {n} degrees.", "Heat the {room} to {n} C.", "Cool the {room} down to {n}.",
                "Make the {room} {n} degrees warm.", "Thermostat in the {room}: {n}."],
    "answer": ["What is {topic}?", "Explain {topic} briefly.", "Why does {topic} matter?", "How do I use {topic}?",
               "Give one fact about {topic}."],
}
FILL = {"on": ["on", "off"], "room": ROOMS, "name": ["Ana", "John", "Mei", "Olu", "Sara"],
        "city": ["Oslo", "Lima", "Pune", "Leeds", "Kyoto"], "thing": ["eggs", "apples", "batteries", "soap", "rice"],
        "topic": ["pip", "cargo", "systemd", "overfitting", "the moon", "a list comprehension", "a kernel module",
                  "gradient descent", "photosynthesis", "a borrow checker"]}
TOOLS = [{"type": "function", "function": {"name": "set_light", "description": "Turn a light on or off",
                                           "parameters": SCHEMAS["light"]}},
         {"type": "function", "function": {"name": "set_climate", "description": "Set a room's thermostat",
                                           "parameters": SCHEMAS["climate"]}},
         {"type": "function", "function": {"name": "add_to_list", "description": "Add items to the shopping list",
                                           "parameters": SCHEMAS["shopping"]}}]


def prompts(schema: str, n: int) -> list[str]:
    out = []
    for i in range(n):
        t = TEMPLATES[schema][i % len(TEMPLATES[schema])]
        out.append(t.format(n=[3, 12, 21, 45, 7, 60][i % 6], **{k: v[(i // 5 + i) % len(v)] for k, v in FILL.items()}))
    return out


def validity(agent_url: str, n: int, tokens: int) -> dict:
    import jsonschema
    import ollama
    import openai

    oai = openai.OpenAI(base_url=agent_url + "/v1", api_key="none", max_retries=0, timeout=300)
    oll = ollama.Client(host=agent_url, timeout=300)
    table: dict = {}
    for model in [*EXPERTS, "moe"]:
        row = table.setdefault(model, {})
        for name, schema in SCHEMAS.items():
            counts = {"openai": [0, 0], "ollama": [0, 0]}
            for i, q in enumerate(prompts(name, n)):
                msgs = [{"role": "user", "content": q}]
                for client in ("openai", "ollama"):
                    if client == "openai":
                        r = oai.chat.completions.create(model=model, messages=msgs, max_tokens=tokens, temperature=0,
                                                        response_format={"type": "json_schema", "json_schema": {
                                                            "name": name, "schema": schema, "strict": True}})
                        text = r.choices[0].message.content
                    else:
                        text = oll.chat(model=model, messages=msgs, format=schema,
                                        options={"temperature": 0, "num_predict": tokens}).message.content
                    counts[client][1] += 1
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        counts[client][0] += 1
                    except (ValueError, jsonschema.ValidationError):
                        print(f"invalid: {model} {name} {client}: {text[:120]!r}", file=sys.stderr)
            row[name] = {c: f"{ok}/{total}" for c, (ok, total) in counts.items()}
        ok = total = 0
        for q in [p for s in ("light", "climate", "shopping") for p in prompts(s, max(1, n // 3))]:
            r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], tools=TOOLS,
                                            tool_choice="required", max_tokens=tokens, temperature=0)
            total += 1
            calls = r.choices[0].message.tool_calls or []
            spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
            try:
                jsonschema.validate(json.loads(calls[0].function.arguments), spec[calls[0].function.name])
                ok += 1
            except (IndexError, ValueError, jsonschema.ValidationError):
                print(f"invalid call: {model}: {r.choices[0].message}", file=sys.stderr)
        row["tool_calls"] = {"openai": f"{ok}/{total}"}
        print(f"{model}: {json.dumps(row)}", file=sys.stderr)
    return table


def speed(rt, n: int, tokens: int, llama_server: bool) -> dict:
    """Decode tokens/s on the general expert, greedy, 1 thread: unconstrained, constrained (the `answer` schema,
    free text inside JSON), and llama-server with json_schema on the same prompts."""
    from hublab.runtime.engine import structured as st

    qs = prompts("answer", n)
    grammar = st.json_schema(SCHEMAS["answer"]).grammar
    rates: dict[str, list[float]] = {"free": [], "constrained": [], "llama_server": []}
    rt.generate("general", "warm up", max_tokens=4)
    for q in qs:  # alternated, so both see the same machine load
        for kind, g in (("free", None), ("constrained", grammar)):
            r = rt.generate("general", q, grammar=g, temperature=0, max_tokens=tokens, seed=1)
            if r.tokens > 8:
                rates[kind].append(r.tokens_per_s)
    out = {"prompts": len(qs), "tokens": tokens,
           "hublab_free_tps": round(statistics.median(rates["free"]), 2),
           "hublab_constrained_tps": round(statistics.median(rates["constrained"]), 2)}
    out["constrained_vs_free"] = round(out["hublab_constrained_tps"] / out["hublab_free_tps"], 3)
    if llama_server:
        out.update(_llama_server(rt, qs, tokens))
        if out.get("llama_server_constrained_tps"):
            out["constrained_vs_llama_server"] = round(out["hublab_constrained_tps"] /
                                                       out["llama_server_constrained_tps"], 3)
    return out


def _llama_server(rt, qs: list[str], tokens: int) -> dict:
    import vs_llama_server as ls

    from hublab.runtime.engine.hostcpu import llama_server_flags

    binary = ls.build_llama_server()
    base = rt.config("gemma3-270m").path
    adapter = rt.config("general").adapter
    port = ls.free_port()
    proc = subprocess.Popen([str(binary), "-m", str(base), "--lora", str(adapter), "--port", str(port), "-t", "1",
                             "-c", "2048", "--no-webui", *llama_server_flags()], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        ls.wait_ready(url + "/health", proc)
        rates, free = [], []
        for q in qs:
            for schema in (SCHEMAS["answer"], None):
                body = {"prompt": ls.turn(q), "n_predict": tokens, "temperature": 0, "cache_prompt": False,
                        "lora": [{"id": 0, "scale": 1.0}], **({"json_schema": schema} if schema else {})}
                t = httpx.post(url + "/completion", json=body, timeout=300).json()["timings"]
                if t["predicted_n"] > 8:
                    (rates if schema else free).append(t["predicted_per_second"])
        return {"llama_server_constrained_tps": round(statistics.median(rates), 2),
                "llama_server_free_tps": round(statistics.median(free), 2),
                "llama_server_constrained_vs_free": round(statistics.median(rates) / statistics.median(free), 3)}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=50, help="prompts per schema, model and client (goal: >= 50)")
    ap.add_argument("--speed-prompts", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--no-validity", action="store_true")
    args = ap.parse_args()
    from hublab.runtime.serve.agent import Agent
    from hublab.runtime.serve.device import Device
    from hublab.runtime.engine.runtime import Runtime

    t0 = time.perf_counter()
    rt = Runtime(threads=1)
    device = Device(rt)
    agent = Agent(device, port=0, quiet=True).start()
    try:
        doc = {"speed": speed(rt, args.speed_prompts, args.tokens, not args.no_llama_server)}
        if not args.no_validity:
            doc["validity"] = validity(agent.url, args.prompts, args.tokens)
    finally:
        agent.stop()
        device.close()
    doc["goals"] = {"valid": "100 % over >= 50 prompts x >= 5 schemas per expert and moe, both clients",
                    "constrained_vs_free": ">= 0.8", "constrained_vs_llama_server": ">= 1.0"}
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
