"""hublab's own routes: what `hublab shell --remote` uses (the Device methods over HTTP) under /hublab/,
plus /health and /metrics. JSON in and out, errors in OpenAI's shape; /hublab/ask streams SSE events.

    GET  /health                    status, version, profile, loaded models
    GET  /metrics                   Prometheus text: requests, tokens, tokens/s, queue depth, memory
    GET  /hublab/experts            models and experts (size, quant, loaded, memory estimate; where each runs, up)
    GET  /hublab/routing            this board's experts as a front routes them: description, domain, keywords,
                                    examples (runtime/engine/peers.py reads it)
    POST /hublab/load, /unload      {"name": ...}
    POST /hublab/route              {"query": ..., "routing": optional} -> every score and the selection
    POST /hublab/ask                {"query": ..., "stream": true, "format": "json" or a schema} -> SSE of the
                                    ensemble's progress events
    GET|POST /hublab/settings       routing and synthesis (POST sets and saves them to system.toml)
    GET  /hublab/info?name=   GET /hublab/stats   POST /hublab/config   POST /hublab/benchmark
"""
from __future__ import annotations

from .http_common import ApiError, Request, Route, moe_fields, sampler_fields, text_field
from ..engine.structured import from_format


def _name(body: dict) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "name is required: a model or expert name from /hublab/experts")
    return text_field("name", name)


def _query(body: dict, what: str) -> str:
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, f"query is required: the question to {what}")
    return query


def _moe(body: dict) -> tuple[str | None, str | None]:
    return moe_fields(body)


def _max_tokens(body: dict, default: int | None = None) -> int | None:
    return sampler_fields(body, "hublab").get("max_tokens", default)


def experts(req: Request) -> None:
    req.json(req.agent.device.list())


def routing(req: Request) -> None:
    req.json(req.agent.device.routing())


def load(req: Request) -> None:
    req.json(req.agent.device.load(_name(req.body())))


def unload(req: Request) -> None:
    device = req.agent.device
    name = _name(req.body())
    with req.generation([device.base_of(name)]):  # after the base's running generation, not during it
        req.json(device.unload(name))


def route(req: Request) -> None:
    body = req.body()
    req.json(req.agent.device.route(_query(body, "route"), _moe(body)[0]))


def ask(req: Request) -> None:
    body = req.body()
    query = _query(body, "answer")
    routing, synthesis = _moe(body)
    max_tokens = _max_tokens(body)
    device = req.agent.device
    stream = body.get("stream", True)
    shape = from_format(body.get("format"), "format")  # "json" or a JSON schema, as Ollama's format
    with req.generation(device.ask_bases(query, routing, synthesis)):
        result = device.ask(query, routing=routing, synthesis=synthesis, cancel=req.cancel, max_tokens=max_tokens,
                            constraint=shape,
                            on_event=(lambda kind, data: req.sse(data, event=kind)) if stream else None)
        if not stream and not req.cancel.is_set():
            req.json(result)
        elif stream:
            req.completed = not req.gone and result["finish_reason"] != "cancelled"


def settings(req: Request) -> None:
    if req.command == "GET":
        req.json(req.agent.device.settings())
        return
    routing, synthesis = _moe(req.body())
    req.json(req.agent.device.settings(routing=routing, synthesis=synthesis))


def info(req: Request) -> None:
    req.json(req.agent.device.info((req.query.get("name") or [None])[0]))


def stats(req: Request) -> None:
    gate = req.agent.gate
    req.json(req.agent.device.stats() | {"queue": {"waiting": gate.waiting, "running": gate.running,
                                                   "capacity": gate.size}})


def config(req: Request) -> None:
    body = req.body()
    key = body.get("key")
    if not isinstance(key, str) or not key or "value" not in body:
        raise ApiError(400, "key and value are required, e.g. {\"key\": \"keep_alive\", \"value\": \"10m\"}")
    text_field("key", key, 64)
    req.json(req.agent.device.config(key, body["value"], text_field("name", body.get("name"))))


def benchmark(req: Request) -> None:
    body = req.body()
    device = req.agent.device
    name = device.benchmark_target(text_field("name", body.get("name")))
    with req.generation([device.base_of(name)]):
        req.json(device.benchmark(name, max_tokens=_max_tokens(body, 64), cancel=req.cancel))


def health(req: Request) -> None:
    req.json(req.agent.device.health() | {"queue": req.agent.gate.waiting})


def metrics(req: Request) -> None:
    req.send(200, req.agent.metrics.render(req.agent).encode(), "text/plain; version=0.0.4; charset=utf-8")


ROUTES = {
    "/health": Route({"GET": health}),
    "/metrics": Route({"GET": metrics}),
    "/hublab/experts": Route({"GET": experts}),
    "/hublab/routing": Route({"GET": routing}),
    "/hublab/load": Route({"POST": load}),
    "/hublab/unload": Route({"POST": unload}),
    "/hublab/route": Route({"POST": route}),
    "/hublab/ask": Route({"POST": ask}),
    "/hublab/settings": Route({"GET": settings, "POST": settings}),
    "/hublab/info": Route({"GET": info}),
    "/hublab/stats": Route({"GET": stats}),
    "/hublab/config": Route({"POST": config}),
    "/hublab/benchmark": Route({"POST": benchmark}),
}
