"""The Ollama-compatible routes, so Ollama clients (the `ollama` library, Open WebUI, most local-LLM tools)
reach hublab as they reach Ollama. `model` is an expert or base name (a ":latest" tag is accepted), "moe"
for a routed answer, or "router" for embeddings from the router's sentence encoder. Embeddings answer for
every listed name, as Ollama's do, and always come from that encoder (/api/show says so in model_info).

    GET    /api/version                {"version"}
    GET    /api/tags                   every model, plus moe (and router when there is one)
    GET    /api/ps                     what is loaded, with memory and expires_at (from keep_alive)
    POST   /api/show                   {"model"} -> details, parameters, modelfile, capabilities
    POST   /api/chat                   {"model", "messages", "stream" (default true), "options", "keep_alive",
                                        "format", "tools"} -> message (.tool_calls for a call)
    POST   /api/generate               {"model", "prompt", "system", "raw", "stream", "options", "keep_alive",
                                        "format"}
    POST   /api/embed                  {"model", "input": text or [texts]} -> {"embeddings"}
    POST   /api/embeddings             {"model", "prompt"} -> {"embedding"} (the older endpoint)
    POST   /api/pull                   {"model": package[:tag]} install from the configured registry; NDJSON progress
    DELETE /api/delete                 {"model": package or a model it provides}

Streams are NDJSON, one object a line, the last with "done": true and Ollama's counters (durations in
nanoseconds). Options: the sampler settings of config.SAMPLER under their Ollama names (num_predict -1 = until
the context is full; num_ctx: prompt + answer must fit, at most the model's context_size); Ollama's other
documented options are taken where hublab already does what they ask (typical_p 1, mirostat 0, ...) and
are a 400 naming them otherwise, as is any field hublab does not honour (CHAT_FIELDS, GENERATE_FIELDS,
OPTIONS). format ("json" or a JSON schema) and tools hold the answer to it (runtime/engine/structured.py). keep_alive: a
duration ("5m", seconds, 0 = unload right after the answer, negative = keep); without it the model
stays [runtime] keep_alive. An empty prompt or message list only loads the model (or unloads it with
keep_alive 0). Errors are `{"error": "..."}` with a 4xx status.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from hublab import __version__

from ..config import parse_duration, request_fields
from .device import MOE, ROUTER, Completion, UnknownModel, unknown_model_message
from ..errors import HublabError
from ..engine import structured
from .http_common import (ApiError, Field, Request, Route, check_fields, iso_time, moe_fields, nothing, object_field,
                          only, sampler_fields, text_field)
from ..inputs import finite

NEVER = "9999-12-31T23:59:59Z"  # expires_at of a model kept loaded until unloaded (keep_alive < 0)
UNLIMITED = 1 << 30  # num_predict -1/-2: the context is the limit

_HONOURED = Field()
_TEXT_ONLY = "hublab's models take text only; leave it out"
COMMON_FIELDS = {"model": _HONOURED, "name": _HONOURED, "stream": _HONOURED, "options": _HONOURED,
                 "keep_alive": _HONOURED, "format": _HONOURED, "hublab": _HONOURED,
                 "think": Field(only(False), "hublab's models do not think apart from the answer; leave it out")}
CHAT_FIELDS = {**COMMON_FIELDS, "messages": _HONOURED, "tools": _HONOURED}
GENERATE_FIELDS = {**COMMON_FIELDS, "prompt": _HONOURED, "system": _HONOURED, "raw": _HONOURED,
                   "images": Field(nothing, _TEXT_ONLY),
                   "suffix": Field(only(""), "fill-in-the-middle is not supported; send raw: true with the prompt "
                                   "formatted"),
                   "template": Field(only(""), "the model's own template is used; send raw: true with the prompt "
                                     "formatted"),
                   "context": Field(nothing, "token history is not kept; send the conversation to /api/chat")}
MESSAGE_FIELDS = {"role": _HONOURED, "content": _HONOURED, "tool_calls": _HONOURED, "tool_name": _HONOURED,
                  "images": Field(nothing, _TEXT_ONLY),
                  "thinking": Field(only(""), "hublab's models do not think apart from the answer; leave it out")}
_PER_BOARD = "set per board by the profile and [runtime] settings (ai config); leave it out"
_NEVER = lambda value: False  # noqa: E731 - a documented option hublab has no use for: any value is refused
OPTIONS = {  # Ollama's documented options beyond config.SAMPLER's (request_fields("ollama"))
    "typical_p": Field(only(1, 1.0), "locally typical sampling runs at 1 (off); leave it out"),
    "repeat_last_n": Field(only(64), "the repeat penalty looks at the last 64 tokens; leave it out"),
    "presence_penalty": Field(only(0, 0.0), "use repeat_penalty instead"),
    "frequency_penalty": Field(only(0, 0.0), "use repeat_penalty instead"),
    "penalize_newline": Field(only(True), "the repeat penalty counts newlines as any token"),
    "mirostat": Field(only(0), "mirostat sampling is not run; use temperature, top_k, top_p, min_p"),
    "mirostat_tau": Field(_NEVER, "mirostat sampling is not run; leave it out"),
    "mirostat_eta": Field(_NEVER, "mirostat sampling is not run; leave it out"),
    "tfs_z": Field(only(1, 1.0), "tail-free sampling is not run; leave it out"),
    "num_keep": Field(_NEVER, "the context is never shifted, so nothing is kept across a shift; leave it out"),
    "num_batch": Field(_NEVER, _PER_BOARD),
    "num_thread": Field(_NEVER, "threads are [runtime] threads (ai config threads N); leave it out"),
    "num_gpu": Field(only(0), "hublab runs on the CPU"),
    "main_gpu": Field(only(0), "hublab runs on the CPU"),
    "numa": Field(only(False), _PER_BOARD),
    "use_mmap": Field(only(True), "models are always memory-mapped"),
    "use_mlock": Field(only(False), "models are not locked in memory"),
    "low_vram": Field(only(False), "hublab runs on the CPU"),
    "vocab_only": Field(only(False), "leave it out"),
    "f16_kv": Field(only(True), "leave it out"),
}


# ---------------------------------------------------------------------------------------------------
# Reading requests

def _model(body: dict) -> str:
    model = body.get("model") or body.get("name")  # older clients send "name"
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "model is required: a name from /api/tags (an expert, moe or router)")
    text_field("model", model, 256)
    model = model.strip()
    return model[: -len(":latest")] if model.endswith(":latest") else model


def _options(body: dict) -> dict[str, Any]:
    """Ollama options -> Device.complete keyword arguments (checked: a bad value is a 400). num_predict -1 (or -2)
    is no limit but the context; num_ctx caps this request's prompt + answer, within the model's context_size."""
    options = object_field("options", body.get("options"))  # e.g. {"temperature": 0.7, "num_predict": 64}
    check_fields(options, {**{name: _HONOURED for name in request_fields("ollama")}, **OPTIONS}, "options.")
    predict = options.get("num_predict")
    unlimited = finite(predict) and predict in (-1, -2)
    if finite(predict) and predict == 0:
        raise ApiError(400, "options.num_predict must be positive, or -1 for no limit; got 0")
    out = sampler_fields({k: v for k, v in options.items() if not (unlimited and k == "num_predict")}, "ollama",
                         "options.")
    if unlimited:
        out["max_tokens"] = UNLIMITED
    if "context_size" in out:
        out["num_ctx"] = out.pop("context_size")
    return out


def _keep_alive(body: dict) -> float | None:
    value = body.get("keep_alive")
    if value is None or value == "":
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ApiError(400, f"keep_alive: {exc}") from None


def _constraint(body: dict, chat: bool) -> structured.Constraint | None:
    """format ("json", or a JSON schema) and tools (chat): what the answer must look like. With tools the model
    may answer text or call one; Ollama has no tool_choice, hublab.tool_choice is OpenAI's."""
    out = structured.from_format(body.get("format"), "format")
    tools = body.get("tools") if chat else None
    choice = object_field("hublab", body.get("hublab")).get("tool_choice")  # hublab's own: as OpenAI's tool_choice
    if tools:
        return structured.with_tools(structured.tools_from(tools), choice or "auto", out, "hublab.tool_choice")
    if choice is not None:
        raise ApiError(400, "hublab.tool_choice needs tools: send the tools it may call")
    return out


def _messages(body: dict) -> list[dict]:
    """Ollama messages as the chat template takes them: an assistant's tool_calls are the JSON object the model
    writes for a call (runtime/chat.py), a tool's result a `tool` turn saying which tool returned it."""
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "messages must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        check_fields(m, MESSAGE_FIELDS, f"messages[{i}].")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ApiError(400, "messages[].content must be a string")
        content = content or ""
        calls = m.get("tool_calls")
        if calls:
            if m["role"] != "assistant" or not isinstance(calls, list):
                raise ApiError(400, f"messages[{i}].tool_calls: a list, on an assistant message only")
            rendered = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ApiError(400, f"messages[{i}].tool_calls[{j}] must be {{function: {{name, arguments}}}}")
                rendered.append(structured.render_call(fn["name"], fn.get("arguments") or {}))
            content = "\n".join(([content] if content else []) + rendered)
        name = m.get("tool_name")
        if name is not None:
            if m["role"] != "tool" or not isinstance(name, str):
                raise ApiError(400, f"messages[{i}].tool_name: a string, on a tool message only")
            content = f"{name} returned: {content}"
        out.append({"role": m["role"], "content": content})
    return out


def _chat_model(req: Request, model: str) -> None:
    """Only experts, bases and moe answer; an embedding or unknown name says what to use instead."""
    if model == ROUTER:
        raise ApiError(400, "router is an embedding model (use /api/embed); chat with an expert or moe")
    if model != MOE:
        _known(req, model, [MOE])


def _known(req: Request, model: str, extra: list[str]) -> None:
    """UnknownModel unless `model` is a model of the device; the message's known names include `extra`."""
    rt = req.agent.device.rt
    if model not in rt.models:
        raise UnknownModel(unknown_model_message(model, [*rt.models, *extra], rt.catalog.errors))


# ---------------------------------------------------------------------------------------------------
# Describing models

def _digest(path: str | Path) -> str:
    """sha256 of a model's TOML: changes when the model's definition does, as an Ollama digest would."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _parameter_size(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _details(info: dict | None) -> dict:
    """Ollama's details of a GGUF model from Device.info (None: its files are missing)."""
    info = info or {}
    arch = info.get("arch") or ""
    return {"parent_model": info.get("base") or "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None, "parameter_size": _parameter_size(info.get("parameters")),
            "quantization_level": info.get("quant") or ""}


def _other_details(family: str, fmt: str, families: list[str] | None = None) -> dict:
    """Details of what is not one GGUF: moe (its experts as families) and the router (ONNX)."""
    return {"parent_model": "", "format": fmt, "family": family, "families": families or [family],
            "parameter_size": "", "quantization_level": ""}


def _info(req: Request, name: str) -> dict | None:
    try:
        return req.agent.device.info(name)
    except HublabError:
        return None  # a model whose files are missing is still listed, as `ai list` lists it


def _router_file(req: Request):
    path = req.agent.device.router_dir() / "model.onnx"
    return path if path.is_file() else None


def _entry(name: str, size: int, modified: float, digest: str, details: dict) -> dict:
    return {"name": name, "model": name, "modified_at": iso_time(modified), "size": size, "digest": digest,
            "details": details}


# ---------------------------------------------------------------------------------------------------
# Routes

def running_text(req: Request) -> None:
    req.send(200, b"hublab is running (Ollama API under /api, OpenAI API under /v1)\n", "text/plain; charset=utf-8")


def version(req: Request) -> None:
    req.json({"version": __version__})


def tags(req: Request) -> None:
    device = req.agent.device
    rows = device.list()["models"]
    models = []
    for row in rows:
        source = device.rt.models[row["name"]].source
        modified = source.stat().st_mtime if source.exists() else 0
        if row["where"] != "here":  # on another board: its API as the format, and where it is, whether it is up
            models.append(_entry(row["name"], 0, modified, "", _other_details("remote", row.get("api") or "unknown"))
                          | {"hublab": {k: row.get(k) for k in ("where", "up", "reason", "model") if k in row}})
            continue
        models.append(_entry(row["name"], row["size"] or 0, modified, _digest(source),
                             _details(_info(req, row["name"]))) | {"hublab": {"where": "here", "up": True}})
    moe_details = _other_details("moe", "hublab", sorted(device.rt.experts))
    models.insert(0, _entry(MOE, sum(r["size"] or 0 for r in rows), time.time(), "", moe_details))
    router = _router_file(req)
    if router is not None:
        models.append(_entry(ROUTER, router.stat().st_size, router.stat().st_mtime,
                             _digest(router.with_name("router.toml")),
                             _other_details("router", "onnx")))
    req.json({"models": models})


def ps(req: Request) -> None:
    device = req.agent.device
    models = []
    for row in device.running():
        info = _info(req, row["name"])
        models.append({"name": row["name"], "model": row["name"], "size": row["memory"], "size_vram": 0,
                       "digest": _digest(info["source"]) if info else "", "details": _details(info),
                       "expires_at": NEVER if row["expires"] is None else iso_time(row["expires"]),
                       "context_length": row["context"]})
    req.json({"models": models})


def show(req: Request) -> None:
    model = _model(req.body())
    device = req.agent.device
    if model == MOE:
        s = device.settings()
        req.json({"modelfile": "", "parameters": f"routing {s['routing']}\nsynthesis {s['synthesis']}", "template": "",
                  "details": _other_details("moe", "hublab", sorted(device.rt.experts)),
                  "model_info": {"hublab.type": "moe", "hublab.experts": sorted(device.rt.experts),
                                 "hublab.routing": s["routing"], "hublab.synthesis": s["synthesis"],
                                 "hublab.fallback": s["fallback"], "hublab.router": s["router"],
                                 **_embedding_info(req)},
                  "capabilities": _capabilities(req), "modified_at": iso_time()})
        return
    if model == ROUTER:
        router = _router_file(req)
        if router is None:
            raise UnknownModel(f"no router at {device.router_dir()}; install a router package or set [moe] router")
        req.json({"modelfile": "", "parameters": "", "template": "", "details": _other_details("router", "onnx"),
                  "model_info": {"hublab.type": "router", "hublab.path": str(router.parent)},
                  "capabilities": ["embedding"], "modified_at": iso_time(router.stat().st_mtime)})
        return
    info = device.info(model)  # an unknown name is a 404 with the closest one
    inference = info["inference"]
    parameters = _parameters(inference)
    modelfile = [f"# hublab {info['type']} {model}: {info['source']}", f"FROM {info['file']}"]
    if info["adapter"]:
        modelfile.append(f"ADAPTER {info['adapter']}")
    modelfile += [f"PARAMETER {line}" for line in parameters]
    if inference.get("system_prompt"):
        modelfile.append(f'SYSTEM """{inference["system_prompt"]}"""')
    arch = info["arch"] or "llama"
    req.json({"modelfile": "\n".join(modelfile) + "\n", "parameters": "\n".join(parameters), "template": "",
              "system": inference.get("system_prompt") or "", "details": _details(info),
              "model_info": {"general.architecture": arch, "general.parameter_count": info["parameters"],
                             f"{arch}.context_length": info["trained_context"], "hublab.type": info["type"],
                             "hublab.base": info["base"], "hublab.domain": info["domain"],
                             "hublab.context_size": info["context_size"], "hublab.keywords": info["keywords"],
                             **_embedding_info(req)},
              "capabilities": _capabilities(req),
              "modified_at": iso_time(device.rt.models[model].source.stat().st_mtime)})


def _capabilities(req: Request) -> list[str]:
    """A text model completes; it embeds too (with the router's encoder) when there is a router."""
    return ["completion", "embedding"] if _router_file(req) is not None else ["completion"]


def _embedding_info(req: Request) -> dict:
    """Where a text model's embeddings come from: the router's encoder, not the model itself."""
    router = _router_file(req)
    return {"hublab.embedding": f"router encoder ({router.parent})"} if router is not None else {}


def _parameters(inference: dict) -> list[str]:
    """A model's [inference] as Ollama's PARAMETER lines."""
    lines = []
    for ollama, (ours, spec) in request_fields("ollama").items():
        value = inference.get(ours)
        if spec.type is list:
            lines += [f'{ollama} "{s}"' for s in value or []]
        elif value not in (None, "") and not (ours == "context_size" and not value):
            lines.append(f"{ollama} {value}")
    return lines


def chat(req: Request) -> None:
    body = req.body()
    check_fields(body, CHAT_FIELDS)
    _answer(req, body, _messages(body), chat=True)


def generate(req: Request) -> None:
    body = req.body()
    check_fields(body, GENERATE_FIELDS)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise ApiError(400, "system must be a string")
    _answer(req, body, prompt, chat=False)


def _answer(req: Request, body: dict, prompt: str | list[dict], chat: bool) -> None:
    """Generate for /api/chat or /api/generate: NDJSON lines (the default) or one JSON answer."""
    t0 = time.perf_counter()
    model = _model(body)
    _chat_model(req, model)
    opts = _options(body)
    shape = _constraint(body, chat)
    keep = _keep_alive(body)
    stream = body.get("stream", True) is not False
    raw = not chat and bool(body.get("raw"))
    system = None if chat else body.get("system")
    lines = _Lines(model, chat)
    device = req.agent.device
    if not prompt:
        _load_only(req, model, keep, lines)
        return
    extra = object_field("hublab", body.get("hublab"))
    check_fields(extra, {"routing": _HONOURED, "synthesis": _HONOURED, "tool_choice": _HONOURED}, "hublab.")
    routing, synthesis = moe_fields(extra, "hublab.")
    bases = device.bases_for(model, prompt, routing, synthesis)

    def send(piece: str) -> None:
        req.ndjson(lines.piece(piece))

    calls = structured.CallStream(shape, send) if shape is not None and shape.kind == "tools" else None
    with req.generation(bases):
        done = device.complete(model, prompt, raw=raw, system=system, cancel=req.cancel, routing=routing,
                               synthesis=synthesis, on_piece=(calls.push if calls else send) if stream else None,
                               constraint=shape, **opts)
        device.keep(bases, keep)
        if req.ended:
            return
        call = calls.finish(done.text) if calls else None
        last = lines.last(done, time.perf_counter() - t0, whole=not stream, call=call)
        if stream:
            req.ndjson(last)
            req.completed = not req.gone
        else:
            req.json(last)


def _load_only(req: Request, model: str, keep: float | None, lines: "_Lines") -> None:
    """An empty prompt: load the model (Ollama's preload), or unload it when keep_alive is 0."""
    device = req.agent.device
    if model == MOE:
        raise ApiError(400, "model moe needs a prompt to route; load experts by name")
    bases = [device.base_of(model)]
    with req.generation(bases):
        if keep == 0:
            device.keep(bases, 0)
            reason = "unload"
        else:
            device.load(model)
            device.keep(bases, keep)
            reason = "load"
    req.json(lines.empty(reason))


class _Lines:
    """The documents of one Ollama answer: streamed pieces and the last one with the counters."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat

    def _doc(self, text: str, done: bool) -> dict:
        doc: dict[str, Any] = {"model": self.model, "created_at": iso_time()}
        if self.chat:
            doc["message"] = {"role": "assistant", "content": text}
        else:
            doc["response"] = text
        doc["done"] = done
        return doc

    def piece(self, text: str) -> dict:
        return self._doc(text, False)

    def empty(self, reason: str) -> dict:
        return self._doc("", True) | {"done_reason": reason}

    def last(self, done: Completion, seconds: float, whole: bool, call: dict | None = None) -> dict:
        """The closing document; `whole`: a non-streamed answer, which carries the text in it; `call`: the
        answer is this tool call (message.tool_calls, no text)."""
        ns = 1_000_000_000
        doc = self._doc(done.text if whole and call is None else "", True)
        if call is not None:
            doc["message"]["tool_calls"] = [{"function": {"name": call["name"], "arguments": call["arguments"]}}]
        return doc | {
            "done_reason": "length" if done.finish_reason == "length" else "stop",
            "total_duration": int(seconds * ns), "load_duration": int(done.load_s * ns),
            "prompt_eval_count": done.prompt_tokens, "prompt_eval_duration": int(done.prompt_s * ns),
            "eval_count": done.tokens, "eval_duration": int(max(0.0, done.seconds - done.load_s - done.prompt_s) * ns),
            "hublab": done.hublab}


def embed(req: Request) -> None:
    body = req.body()
    t0 = time.perf_counter()
    model = _embedding_model(req, _model(body))
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "input must be a string or a non-empty list of strings")
    vectors, tokens = req.agent.device.embed(texts)
    req.json({"model": model, "embeddings": vectors, "total_duration": int((time.perf_counter() - t0) * 1e9),
              "load_duration": 0, "prompt_eval_count": tokens})


def embeddings(req: Request) -> None:
    body = req.body()
    _embedding_model(req, _model(body))
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (the text to embed)")
    vectors, _ = req.agent.device.embed([prompt])
    req.json({"embedding": vectors[0]})


def _embedding_model(req: Request, model: str) -> str:
    """Every listed name embeds, as Ollama embeds with any model it serves: tools that embed with their chat
    model work. The vectors always come from the router's encoder (/api/show says so)."""
    if model not in (ROUTER, MOE):
        _known(req, model, [MOE, ROUTER])
    return model


def pull(req: Request) -> None:
    body = req.body()
    ref = body.get("model") or body.get("name")
    if not isinstance(ref, str) or not ref.strip():
        raise ApiError(400, "model is required: a package name[:tag] in the configured registry")
    ref = ref.strip()
    stream = body.get("stream", True) is not False
    req.agent.device.check_package(ref)  # a refusal (signature, fit, not found) is a 4xx, not a stream
    if not stream:
        req.json({"status": "success", "hublab": req.agent.device.pull(ref)})
        return
    req.ndjson({"status": "pulling manifest"})
    shown = {"label": "", "at": 0.0}

    def progress(label: str, done: int, total: int) -> None:
        now = time.monotonic()
        # a line per file and a few a second: a client's progress bar needs no more
        if label != shown["label"] or done >= total or now - shown["at"] >= 0.2:
            shown.update(label=label, at=now)
            req.ndjson({"status": f"pulling {label}", "total": total, "completed": done})

    result = req.agent.device.pull(ref, progress)
    req.ndjson({"status": "success", "hublab": result})
    req.completed = not req.gone


def delete(req: Request) -> None:
    device = req.agent.device
    name = _model(req.body())
    bases = [device.base_of(n) for n in device.package_models(name)]
    with req.generation(bases):  # after any answer running on them
        req.json({"status": "success", "hublab": device.delete(name)})


ROUTES = {
    "/": Route({"GET": running_text}, "ollama"),
    "/api/version": Route({"GET": version}, "ollama"),
    "/api/tags": Route({"GET": tags}, "ollama"),
    "/api/ps": Route({"GET": ps}, "ollama"),
    "/api/show": Route({"POST": show}, "ollama"),
    "/api/chat": Route({"POST": chat}, "ollama"),
    "/api/generate": Route({"POST": generate}, "ollama"),
    "/api/embed": Route({"POST": embed}, "ollama"),
    "/api/embeddings": Route({"POST": embeddings}, "ollama"),
    "/api/pull": Route({"POST": pull}, "ollama"),
    "/api/delete": Route({"DELETE": delete}, "ollama"),
}
