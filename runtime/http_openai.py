"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (plain or SSE).

`model` is an expert (or base) name, or "moe" for a routed, synthesised answer; an "hublab" object in
the request may set moe's routing and synthesis, and parse_special: false to tokenize special tokens in a
/v1/completions prompt as plain text (by default they are parsed, as llama-server does). The answer carries
an "hublab" object with the routing decision (moe) or the speed (an expert).
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from .device import MOE, Completion
from .http_common import ApiError, Request, Route, moe_fields, obj, sampler_fields


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
    data = [{"id": MOE, "object": "model", "created": int(req.agent.metrics.started), "owned_by": "hublab",
             "hublab": {"type": "moe", "experts": sorted(rt.experts)}}]
    for name, cfg in sorted(rt.models.items()):
        try:
            created = int(cfg.source.stat().st_mtime)
        except OSError:
            created = 0
        data.append({"id": name, "object": "model", "created": created, "owned_by": "hublab",
                     "hublab": {"type": cfg.type, "base": cfg.base or None, "domain": cfg.domain,
                                "loaded": rt.is_loaded(name)}})
    req.json({"object": "list", "data": data})


def chat(req: Request) -> None:
    body = req.body()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    prompt = [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages]
    _answer(req, body, prompt, chat=True)


def completions(req: Request) -> None:
    body = req.body()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)")
    _answer(req, body, prompt, chat=False)


def _answer(req: Request, body: dict, prompt: str | list[dict], chat: bool) -> None:
    """Generate for a chat or text completion, as one JSON answer or as SSE chunks ending in [DONE]."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: an expert name from /v1/models, or moe")
    opts = sampler(body)
    extra = body.get("hublab")
    if extra is not None and not isinstance(extra, dict):
        raise ApiError(400, "hublab must be an object such as {\"routing\": \"topk:2\"}")
    extra = extra or {}
    routing, synthesis = moe_fields(extra, "hublab.")
    stream_options = obj("stream_options", body.get("stream_options"))
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

    with req.generation(bases):
        done = device.complete(model, prompt, raw=not chat, cancel=req.cancel, routing=routing, synthesis=synthesis,
                               on_piece=send if stream else None, special=special, **opts)
        if req.ended:
            return
        if stream:
            send(None, _finish(done))
            if stream_options.get("include_usage"):
                req.sse(chunks.usage(done))
            req.sse("[DONE]")
            req.completed = not req.gone
        else:
            req.json(chunks.whole(done))


def _finish(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


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

    def first(self) -> dict:
        return {**self.head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}

    def piece(self, text: str | None, finish: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def usage(self, done: Completion) -> dict:
        return {**self.head, "choices": [], "usage": _usage(done)}

    def whole(self, done: Completion) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                      "finish_reason": _finish(done), "logprobs": None}
        else:
            choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": _finish(done)}
        return {**self.head, "object": self.kind, "choices": [choice], "usage": _usage(done), "hublab": done.hublab}


ROUTES = {
    "/v1/models": Route({"GET": models}),
    "/v1/chat/completions": Route({"POST": chat}),
    "/v1/completions": Route({"POST": completions}),
}
