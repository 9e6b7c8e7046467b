"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (plain or SSE).

`model` is an expert (or base) name, or "moe" for a routed, synthesised answer; an "hublab" object in
the request may set moe's routing and synthesis, and parse_special: false to tokenize special tokens in a
/v1/completions prompt as plain text (by default they are parsed, as llama-server does). The answer carries
an "hublab" object with the routing decision (moe) or the speed (an expert).

Structured output (runtime/engine/structured.py): response_format json_object or json_schema, llama-server's grammar
(GBNF) and json_schema fields, and tools with tool_choice auto, required, none or a named function; a call comes
back as message.tool_calls (finish_reason tool_calls), and assistant tool_calls and tool messages are taken in
the conversation. Every documented field is either honoured or a 400 naming it (CHAT_FIELDS, COMPLETION_FIELDS).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..engine import structured
from ..config import request_fields
from .device import MOE, Completion
from .http_common import (ApiError, Field, Request, Route, check_fields, moe_fields, nothing, object_field, only,
                          sampler_fields)

_HONOURED = Field()
_ZERO = only(0, 0.0)
COMMON_FIELDS: dict[str, Field] = {
    **{name: _HONOURED for name in request_fields("openai")},
    "model": _HONOURED, "stream": _HONOURED, "stream_options": _HONOURED, "hublab": _HONOURED,
    "response_format": _HONOURED, "grammar": _HONOURED, "json_schema": _HONOURED,  # the last two: llama-server's
    "user": _HONOURED, "safety_identifier": _HONOURED,  # who asks: answers are the same for everyone
    "n": Field(only(1), "hublab writes one choice per request; send n 1 or leave it out"),
    "frequency_penalty": Field(_ZERO, "hublab's sampler has repeat_penalty; use that instead"),
    "presence_penalty": Field(_ZERO, "hublab's sampler has repeat_penalty; use that instead"),
    "logit_bias": Field(nothing, "token biases are not applied; leave it out"),
}
CHAT_FIELDS: dict[str, Field] = {
    **COMMON_FIELDS, "messages": _HONOURED, "max_completion_tokens": _HONOURED, "tools": _HONOURED,
    "tool_choice": _HONOURED,
    "parallel_tool_calls": Field(only(True, False), "true or false (an answer makes at most one call either way)"),
    "logprobs": Field(only(False), "token log-probabilities are not returned; leave it out"),
    "top_logprobs": Field(only(0), "token log-probabilities are not returned; leave it out"),
    "store": Field(only(False), "hublab stores no completions"),
    "metadata": Field(nothing, "kept only with store, which hublab does not do"),
    "prompt_cache_key": _HONOURED,  # every expert's prompt prefix is cached anyway
    "service_tier": Field(only("auto", "default"), "one tier runs here; send auto or leave it out"),
    "modalities": Field(only(["text"]), "hublab's models write text only"),
    "audio": Field(nothing, "hublab's models write text only"),
    "prediction": Field(nothing, "predicted outputs are not used; leave it out"),
    "reasoning_effort": Field(nothing, "hublab's models do not reason apart from the answer; leave it out"),
    "verbosity": Field(nothing, "leave it out; ask for brevity in the prompt"),
    "web_search_options": Field(lambda value: False, "hublab does not search the web; leave it out"),
    "functions": Field(nothing, "the deprecated functions field is not taken; send tools"),
    "function_call": Field(nothing, "the deprecated function_call field is not taken; send tool_choice"),
}
COMPLETION_FIELDS: dict[str, Field] = {
    **COMMON_FIELDS, "prompt": _HONOURED,
    "best_of": Field(only(1), "hublab writes one candidate; send 1 or leave it out"),
    "echo": Field(only(False), "the prompt is not echoed; leave it out"),
    "logprobs": Field(only(0), "token log-probabilities are not returned; leave it out"),
    "suffix": Field(only(""), "fill-in-the-middle is not supported; leave it out"),
}
MESSAGE_FIELDS = {"role": _HONOURED, "content": _HONOURED, "tool_calls": _HONOURED, "tool_call_id": _HONOURED,
                  "name": Field(nothing, "participant names are not shown to the model; leave it out"),
                  "refusal": Field(nothing, "leave it out"), "audio": Field(nothing, "hublab's models take text only")}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def sampler(body: dict) -> dict:
    """OpenAI request fields -> Device.complete keyword arguments (checked, so a bad one is a 400)."""
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return sampler_fields(body, "openai")


def _text_of(content: Any) -> str:
    """An OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(t, str) for t in parts):
            raise ApiError(400, "messages[].content text parts need a string text")
        return "".join(parts)
    raise ApiError(400, "messages[].content must be a string or a list of text parts")


def models(req: Request) -> None:
    rt = req.agent.device.rt
    rt.refresh_peers()  # whether each board is up, as of now
    data = [{"id": MOE, "object": "model", "created": int(req.agent.metrics.started), "owned_by": "hublab",
             "hublab": {"type": "moe", "experts": sorted(rt.experts)}}]
    for name, cfg in sorted(rt.models.items()):
        try:
            created = int(cfg.source.stat().st_mtime)
        except OSError:
            created = 0
        data.append({"id": name, "object": "model", "created": created, "owned_by": cfg.peer or "hublab",
                     "hublab": {"type": cfg.type, "base": cfg.base or None, "domain": cfg.domain,
                                "loaded": rt.is_loaded(name), **rt.peers.where(cfg)}})
    req.json({"object": "list", "data": data})


def chat(req: Request) -> None:
    body = req.body()
    check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    _answer(req, body, _messages(messages), chat=True)


def _messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as the chat template takes them: a call an assistant made is the JSON object the model
    writes for one (runtime/chat.py), a tool's result a `tool` turn saying which tool returned it."""
    out, names = [], {}
    for i, m in enumerate(messages):
        check_fields(m, MESSAGE_FIELDS, f"messages[{i}].")
        role = ROLES.get(m["role"])
        if role is None:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role'][:40]!r}")
        content = _text_of(m.get("content"))
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise ApiError(400, f"messages[{i}].tool_calls: a list, on an assistant message only")
            rendered = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ApiError(400, f"messages[{i}].tool_calls[{j}] must be {{id, type: function, function: "
                                        "{name, arguments}}")
                names[call.get("id")] = fn["name"]
                rendered.append(structured.render_call(fn["name"], fn.get("arguments") or {}))
            content = "\n".join(([content] if content else []) + rendered)
        if role == "tool":
            name = names.get(m.get("tool_call_id"))
            content = f"{name} returned: {content}" if name else content
        elif m.get("tool_call_id") is not None:
            raise ApiError(400, f"messages[{i}].tool_call_id: on a tool message only")
        out.append({"role": role, "content": content})
    return out


def completions(req: Request) -> None:
    body = req.body()
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)")
    _answer(req, body, prompt, chat=False)


def constraint(body: dict, chat: bool) -> structured.Constraint | None:
    """What the answer must look like: response_format, llama-server's grammar or json_schema (one of them), and
    tools with tool_choice (chat only). None: free text."""
    fmt = body.get("response_format")
    given = [k for k in ("grammar", "json_schema") if body.get(k) is not None]
    out = None
    if fmt is not None:
        out = response_format(fmt)
        if out is not None and given:
            raise ApiError(400, f"response_format and {given[0]}: send one of them")
    if len(given) > 1:
        raise ApiError(400, "grammar and json_schema: send one of them")
    if given == ["grammar"]:
        out = structured.gbnf(body["grammar"], "grammar")
    elif given == ["json_schema"]:
        out = structured.json_schema(body["json_schema"], "json_schema")
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice needs tools: send the tools it may call")
        return out
    if not chat:
        raise ApiError(400, "tools: /v1/completions writes text; send tools to /v1/chat/completions")
    return structured.with_tools(structured.tools_from(tools), "auto" if choice is None else choice, text=out)


def response_format(fmt) -> structured.Constraint | None:
    """OpenAI's response_format: text, json_object (llama-server: with an optional schema) or json_schema."""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                            "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\"}}")
    kind = fmt["type"]
    allowed = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}[kind]
    extra = sorted(set(fmt) - allowed)
    if extra:
        raise ApiError(400, f"response_format.{extra[0][:40]}: not a field of a {kind} response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        if fmt.get("schema") is not None:
            return structured.json_schema(fmt["schema"], "response_format.schema")
        return structured.json_object()
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(400, "response_format.json_schema must be {\"name\", \"schema\": {...}, \"strict\"}")
    check_fields(spec, {"name": Field(), "schema": Field(), "description": Field(),
                        "strict": Field(only(True, False), "true or false (the answer keeps to the schema "
                                        "either way)")}, "response_format.json_schema.")
    return structured.json_schema(spec["schema"], "response_format.json_schema.schema")


def _answer(req: Request, body: dict, prompt: str | list[dict], chat: bool) -> None:
    """Generate for a chat or text completion, as one JSON answer or as SSE chunks ending in [DONE]."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: an expert name from /v1/models, or moe")
    opts = sampler(body)
    shape = constraint(body, chat)
    extra = body.get("hublab")
    if extra is not None and not isinstance(extra, dict):
        raise ApiError(400, "hublab must be an object such as {\"routing\": \"topk:2\"}")
    extra = extra or {}
    check_fields(extra, {"routing": Field(), "synthesis": Field(), "parse_special": Field(),
                         "token_prob": Field(only(True, False), "true or false")}, "hublab.")
    routing, synthesis = moe_fields(extra, "hublab.")
    stream_options = object_field("stream_options", body.get("stream_options"))
    check_fields(stream_options, {"include_usage": Field(), "include_obfuscation": Field(
        only(False), "streamed chunks carry no obfuscation padding")}, "stream_options.")
    special = extra.get("parse_special", True)
    if not isinstance(special, bool):
        raise ApiError(400, "hublab.parse_special must be true or false")
    stream = bool(body.get("stream"))
    chunks = _Chunks(model, chat)
    device = req.agent.device
    bases = device.bases_for(model, prompt, routing, synthesis)  # an unknown model is a 404 here

    def send(piece: str | None, finish: str | None = None) -> None:
        if chat and not req.stream_kind:
            req.sse(chunks.first())  # a chat stream opens with the assistant's role
        req.sse(chunks.piece(piece, finish))

    calls = structured.CallStream(shape, send) if shape is not None and shape.kind == "tools" else None
    with req.generation(bases):
        done = device.complete(model, prompt, raw=not chat, cancel=req.cancel, routing=routing, synthesis=synthesis,
                               on_piece=(calls.push if calls else send) if stream else None, special=special,
                               constraint=shape, token_prob=extra.get("token_prob", False) and model != MOE, **opts)
        if req.ended:
            return
        call = calls.finish(done.text) if calls else None
        if stream:
            if call is not None:
                if not req.stream_kind:
                    req.sse(chunks.first(content=None))
                req.sse(chunks.call(call))
            send(None, _finish(done, call))
            if stream_options.get("include_usage"):
                req.sse(chunks.usage(done))
            req.sse("[DONE]")
            req.completed = not req.gone
        else:
            req.json(chunks.whole(done, call))


def _finish(done: Completion, call: dict | None = None) -> str:
    if call is not None:
        return "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def _tool_call(call: dict, index: int | None = None) -> dict:
    doc = {"id": structured.call_id(), "type": "function",
           "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
    return doc if index is None else {"index": index, **doc}


def _usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.tokens,
            "total_tokens": done.prompt_tokens + done.tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


class _Chunks:
    """The documents of one OpenAI answer: stream chunks (one id, one created time) and the whole answer."""

    def __init__(self, model: str, chat: bool):
        self.chat = chat
        self.kind = "chat.completion" if chat else "text_completion"
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "object": self.kind + (".chunk" if chat else ""), "created": int(time.time()), "model": model}

    def first(self, content: str | None = "") -> dict:
        return {**self.head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": content},
                                          "finish_reason": None}]}

    def call(self, call: dict) -> dict:
        return {**self.head, "choices": [{"index": 0, "delta": {"tool_calls": [_tool_call(call, 0)]},
                                          "finish_reason": None}]}

    def piece(self, text: str | None, finish: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def usage(self, done: Completion) -> dict:
        return {**self.head, "choices": [], "usage": _usage(done), "hublab": done.hublab}

    def whole(self, done: Completion, call: dict | None = None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": done.text} if call is None else {
                "role": "assistant", "content": None, "tool_calls": [_tool_call(call)]}
            choice = {"index": 0, "message": message, "finish_reason": _finish(done, call), "logprobs": None}
        else:
            choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": _finish(done)}
        return {**self.head, "object": self.kind, "choices": [choice], "usage": _usage(done), "hublab": done.hublab}


ROUTES = {
    "/v1/models": Route({"GET": models}),
    "/v1/chat/completions": Route({"POST": chat}),
    "/v1/completions": Route({"POST": completions}),
}
