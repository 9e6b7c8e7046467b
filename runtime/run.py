"""`hublab run NAME PROMPT` and `hublab list`: one answer from an expert (or `moe`), and what is on disk."""
from __future__ import annotations

import json
import sys

from .config import SYSTEM_SCHEMA, request_fields
from .inputs import arg_float, arg_int


def add_run_arguments(parser) -> None:
    parser.add_argument("name", help="expert or model name, or 'moe' for a routed, synthesised answer")
    parser.add_argument("prompt", nargs="+", help="the question")
    parser.add_argument("--raw", action="store_true", help="complete the text as is (no chat template)")
    for name, (key, spec) in request_fields("run").items():  # --max-tokens, --temperature
        number = arg_int if spec.type is int else arg_float
        parser.add_argument(f"--{name.replace('_', '-')}", dest=key, type=number(*spec.bounds(request=True)),
                            help=spec.help)
    parser.add_argument("--routing", help="for moe: topk:K, threshold:T, single or all")
    parser.add_argument("--synthesis", choices=SYSTEM_SCHEMA["moe"]["synthesis"].choices,
                        help="for moe: best, weighted, voting, concatenate or summarize")
    parser.add_argument("--json", action="store_true", help="print one JSON document with the answer and stats")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against this JSON schema")
    shape.add_argument("--grammar", metavar="FILE", help="answer in this GBNF grammar (llama.cpp's; root rule root)")


def constraint_from(json_schema: str | None, grammar: str | None):
    """--json-schema FILE or --grammar FILE as a Constraint (runtime/engine/structured.py); a bad one is one line."""
    from .errors import HublabError
    from .engine import structured

    path = json_schema or grammar
    if path is None:
        return None
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise HublabError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    return structured.json_schema(text, path) if json_schema else structured.gbnf(text, path)


def run_cli(args) -> int:
    from .engine.runtime import Runtime
    from .errors import HublabError
    from .routing.context import ExpertContext
    from .routing.ensemble import Ensemble

    from .serve.device import MoeStream, check_moe_args, check_query, unknown_model_message

    prompt = " ".join(args.prompt)
    check_query(prompt)  # a blank prompt is refused here as `?` refuses it in the shell
    check_moe_args(args.routing, None)
    shape = constraint_from(args.json_schema, args.grammar)
    grammar = shape.grammar if shape is not None else None
    rt = Runtime.from_config(profile=args.profile)
    if args.name != "moe" and args.name not in rt.models:  # say why: a broken TOML, a missing models dir
        raise HublabError(unknown_model_message(args.name, list(rt.models), rt.catalog.errors))
    with rt:
        if args.name == "moe":
            ensemble = Ensemble(rt)
            show = MoeStream(None if args.json else lambda text: print(text, end="", flush=True),
                             args.synthesis or ensemble.synthesis, constrained=shape is not None)  # words as written
            result = ensemble.ask(prompt, routing=args.routing, synthesis=args.synthesis, on_event=show,
                             max_tokens=args.max_tokens, temperature=args.temperature, constraint=shape)
            doc = result.to_dict()
            show.finish(doc)
        else:
            gen = ExpertContext(rt).stream(args.name, prompt, raw=args.raw, max_tokens=args.max_tokens,
                                           temperature=args.temperature, grammar=grammar)
            for piece in gen:
                if not args.json:
                    print(piece, end="", flush=True)
            doc = gen.result.to_dict()
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print()
        if args.name != "moe":
            r = gen.result
            print(f"[{r.expert}: {r.tokens} tokens, {r.tokens_per_s:.1f} tok/s, first token {r.ttft_s * 1000:.0f} ms]",
                  file=sys.stderr)
    return 0


def add_list_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def list_cli(args) -> int:
    from .config import format_size
    from .engine.runtime import Runtime

    rt = Runtime.from_config(profile=args.profile)
    rows = rt.status()
    if args.json:
        print(json.dumps({"profile": rt.profile.name, "budget": rt.budget, "models": rows,
                          "errors": rt.catalog.errors}, indent=2))
        return 0
    print(f"{'NAME':<16} {'TYPE':<7} {'BASE':<14} {'QUANT':<7} {'SIZE':>10} {'NEEDS':>10}")
    for r in rows:
        if r.get("where", "here") != "here":  # an expert on another board: where, and whether it is up
            state = "up" if r.get("up") else f"down: {r.get('reason')}" if r.get("up") is False else "not asked yet"
            print(f"{r['name']:<16} {r['type']:<7} {'-':<14} on peer {r['where']} ({state})")
            continue
        if r["error"]:
            print(f"{r['name']:<16} {r['type']:<7} {r['base'] or '-':<14} error: {r['error']}")
            continue
        print(f"{r['name']:<16} {r['type']:<7} {r['base'] or '-':<14} {r['quant']:<7} "
              f"{format_size(r['size']) if r['size'] else '-':>10} {format_size(r['estimate']):>10}")
    print(f"\nboard {rt.profile.name}: model budget {format_size(rt.budget)}")
    for e in rt.catalog.errors:
        print(f"warning: {e}", file=sys.stderr)
    return 0
