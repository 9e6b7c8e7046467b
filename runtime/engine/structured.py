"""Structured output: what an answer must look like, as a llama.cpp grammar (GBNF) the sampler keeps to.

A `Constraint` is made once per request from what the request asked for, and checked before anything runs:

    json_schema(schema)       a JSON schema (OpenAI response_format json_schema, Ollama format, --json-schema)
    json_object()             any JSON object (OpenAI json_object, Ollama format "json")
    gbnf(text)                a grammar as llama-server takes it
    with_tools(tools, choice) a function call among `tools` (auto: a call or plain text, the format if any)

The JSON schema -> GBNF conversion is llama-cpp-python's (llama_cpp.llama_grammar.SchemaConverter). It skips
keywords it has no rule for (minimum, maximum, oneOf's exclusivity, formats it does not know...) without a
word, and an answer that ignores them is not valid; so every keyword is checked first against what the
conversion keeps, and anything else is refused with its path. Integer and number ranges (minimum, maximum)
are added here, on top of the converter, as digit rules. Bad input is a `StructureError` (a 400 over HTTP)
naming the problem: an invalid schema, an unsupported keyword, a schema nested past MAX_DEPTH, a grammar that
can never finish (no finite text satisfies its root), or one llama.cpp does not parse.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import HublabError
from ..inputs import quote

MAX_DEPTH = 32           # nesting of a schema's objects (past it: refused, before any recursion can overflow)
MAX_NODES = 2000         # subschemas in one schema
MAX_GRAMMAR = 64 << 10   # characters of GBNF, given or made
MAX_TOOLS = 64
CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'  # a JSON string's character
INT_DIGITS = 15          # an open-ended integer range stops at 15 digits, as the converter's own integers do

# Keywords the conversion keeps (with the checks below), and those that say nothing about the value.
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
             "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
HINTS = {"oneOf": "use anyOf (oneOf's exactly-one rule is not enforced)",
         "allOf": "merge the subschemas into one", "not": "list what is allowed instead",
         "multipleOf": "use an enum of the values", "patternProperties": "list the properties",
         "uniqueItems": "leave it out", "if": "use anyOf", "then": "use anyOf", "else": "use anyOf",
         "minProperties": "make the properties required", "maxProperties": "list the properties",
         "dependentRequired": "make the properties required", "dependentSchemas": "use anyOf",
         "propertyNames": "list the properties", "contains": "describe the items",
         "unevaluatedProperties": "use additionalProperties", "unevaluatedItems": "use items"}


class StructureError(HublabError):
    """A schema, grammar or tool list that cannot constrain an answer; the message names the problem."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def to_dict(self) -> dict:
        """As LlamaFactory's tool-call data (glaive) writes a tool, and as the prompt shows it."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class Constraint:
    """A grammar every token of an answer keeps to, and what the answer then is."""
    grammar: str                         # GBNF, root rule "root"
    kind: str                            # json_schema | json_object | grammar | tools
    schema: dict | None = None           # the answer validates against it (json_schema, json_object)
    tools: tuple[Tool, ...] = ()         # kind tools: the answer is one call of these, or (auto) text
    choice: str = "auto"                 # auto | required | a tool's name
    text: "Constraint | None" = field(default=None, compare=False)  # tools + auto: what a text answer keeps to

    def valid(self, text: str) -> bool:
        """Whether a finished answer is what was asked for (moe picks among valid answers only)."""
        if self.kind == "grammar":
            return True  # the grammar is the only definition; a finished answer kept to it
        if self.kind == "tools":
            call = parse_call(text, self)
            if call is not None:
                return True
            if self.choice != "auto":
                return False
            return self.text.valid(text) if self.text is not None else not text.lstrip().startswith("{")
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return validate(value, self.schema or {}) is None


# ---------------------------------------------------------------------------------------------------
# JSON schema -> grammar

def json_schema(schema: Any, where: str = "schema") -> Constraint:
    """A constraint from a JSON schema (an object), checked: a StructureError names what cannot be kept."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise StructureError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise StructureError(f"{where} must be a JSON schema object, got {quote(schema, 40)}")
    check_schema(schema, where)
    return Constraint(_convert(schema, where), "json_schema", schema=schema)


def json_object() -> Constraint:
    """Any JSON object."""
    schema = {"type": "object"}
    return Constraint(_convert(schema, "schema"), "json_object", schema=schema)


def gbnf(text: Any, where: str = "grammar") -> Constraint:
    """A constraint from a GBNF grammar (root rule `root`), checked for size and for a finite derivation;
    llama.cpp parses it when the answer starts."""
    if not isinstance(text, str) or not text.strip():
        raise StructureError(f"{where} must be a non-empty GBNF string, got {quote(text, 40)}")
    check_grammar(text, where)
    return Constraint(text, "grammar")


def from_format(value: Any, where: str = "format") -> Constraint | None:
    """Ollama's format (and the shell's `settings format=`): "json", a JSON schema object, or nothing."""
    if value == "json":
        return json_object()
    if isinstance(value, dict):
        return json_schema(value, where)
    if value in (None, ""):
        return None
    raise StructureError(f"{where} must be \"json\" or a JSON schema object, got {quote(value, 40)}")


def check_schema(schema: dict, where: str = "schema") -> None:
    """Refuse what the conversion cannot keep (see the module doc), naming the keyword and where it is."""
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            defs.update({f"#/{key}/{k}": v for k, v in schema[key].items()})
    count = [0]

    def walk(node: Any, path: str, depth: int) -> None:
        count[0] += 1
        if count[0] > MAX_NODES:
            raise StructureError(f"{where}: more than {MAX_NODES} subschemas; send a smaller schema")
        if depth > MAX_DEPTH:
            raise StructureError(f"{where}: nested deeper than {MAX_DEPTH} levels at {path}; flatten it (a "
                                 "recursive structure is written with $ref)")
        if not isinstance(node, dict):
            raise StructureError(f"{where}: {path} must be a schema object, got {quote(node, 40)}")
        for key in node:
            if key not in SUPPORTED and key not in ANNOTATIONS:
                hint = HINTS.get(key, "leave it out")
                raise StructureError(f"{where}: unsupported keyword {quote(key, 40)} at {path}; {hint}")
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        for k in kinds:
            if k not in TYPES:
                raise StructureError(f"{where}: {path}.type {quote(k, 40)} is not a JSON schema type; use one of "
                                     f"{', '.join(TYPES)}")
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise StructureError(f"{where}: {path}.enum must be a non-empty list (an empty one allows no value)")
        if "anyOf" in node:
            if not isinstance(node["anyOf"], list) or not node["anyOf"]:
                raise StructureError(f"{where}: {path}.anyOf must be a non-empty list of schemas")
            for i, sub in enumerate(node["anyOf"]):
                walk(sub, f"{path}.anyOf[{i}]", depth + 1)
        if "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or ref not in defs:
                raise StructureError(f"{where}: {path}.$ref {quote(ref, 60)} is not one of this schema's $defs "
                                     "(only local references #/$defs/NAME are followed)")
            if len(node.keys() - ANNOTATIONS - {"$defs", "definitions"}) > 1:
                raise StructureError(f"{where}: {path} has keywords beside $ref, which would be ignored; move them "
                                     "into the referenced schema")
        _check_lengths(node, path, where)
        _check_range(node, kinds, path, where)
        if "format" in node and node["format"] not in FORMATS:
            raise StructureError(f"{where}: {path}.format {quote(node['format'], 40)} is not kept; supported: "
                                 f"{', '.join(FORMATS[:4])} (or use a pattern)")
        if "pattern" in node and not isinstance(node["pattern"], str):
            raise StructureError(f"{where}: {path}.pattern must be a string")
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise StructureError(f"{where}: {path}.properties must be an object of schemas")
        for name, sub in props.items():
            walk(sub, f"{path}.properties.{name}", depth + 1)
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise StructureError(f"{where}: {path}.required must be a list of property names")
        missing = [r for r in required if r not in props]
        if missing:
            raise StructureError(f"{where}: {path}.required names {quote(missing[0], 40)}, which properties does "
                                 "not define: no answer could have it; add it to properties")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{path}.additionalProperties", depth + 1)
        elif extra is not None and not isinstance(extra, bool):
            raise StructureError(f"{where}: {path}.additionalProperties must be true, false or a schema")
        items = node.get("items")
        if isinstance(items, dict):
            walk(items, f"{path}.items", depth + 1)
        elif items is not None and not (isinstance(items, list) and "prefixItems" not in node):
            raise StructureError(f"{where}: {path}.items must be a schema")
        if isinstance(items, list) or "prefixItems" in node:
            tuple_items = items if isinstance(items, list) else node["prefixItems"]
            if not isinstance(tuple_items, list) or not tuple_items:
                raise StructureError(f"{where}: {path}.prefixItems must be a non-empty list of schemas")
            for i, sub in enumerate(tuple_items):
                walk(sub, f"{path}.prefixItems[{i}]", depth + 1)
        for key in ("$defs", "definitions"):
            if key in node:
                if not isinstance(node[key], dict):
                    raise StructureError(f"{where}: {path}.{key} must be an object of schemas")
                if path != "$":
                    raise StructureError(f"{where}: {path}.{key}: put $defs at the top of the schema")
                for name, sub in node[key].items():
                    walk(sub, f"$.{key}.{name}", depth + 1)

    walk(schema, "$", 0)


def _check_lengths(node: dict, path: str, where: str) -> None:
    for lo_key, hi_key in (("minLength", "maxLength"), ("minItems", "maxItems")):
        lo, hi = node.get(lo_key), node.get(hi_key)
        for key, value in ((lo_key, lo), (hi_key, hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise StructureError(f"{where}: {path}.{key} must be a non-negative integer")
        if lo is not None and hi is not None and lo > hi:
            raise StructureError(f"{where}: {path}: {lo_key} {lo} is over {hi_key} {hi}; no value can satisfy both")
    if ("minLength" in node or "maxLength" in node) and node.get("type") != "string":
        raise StructureError(f"{where}: {path}: minLength/maxLength need \"type\": \"string\" beside them")
    if ("minLength" in node or "maxLength" in node) and ("pattern" in node or "format" in node):
        raise StructureError(f"{where}: {path}: minLength/maxLength with a pattern or format is not kept; "
                             "put the length in the pattern")


def _check_range(node: dict, kinds: list, path: str, where: str) -> None:
    keys = [k for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in node]
    if not keys:
        return
    if kinds not in (["integer"], ["number"]):
        raise StructureError(f"{where}: {path}: {keys[0]} needs \"type\": \"integer\" or \"number\" beside it")
    for key in keys:
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) >= 10 ** 15:
            raise StructureError(f"{where}: {path}.{key} must be a number under 10^15 in size")
        if kinds == ["number"] and (key.startswith("exclusive") or value != int(value)):
            raise StructureError(f"{where}: {path}.{key} {value}: a number's range is kept with whole-number "
                                 "minimum/maximum only; use those, or type integer")
    lo, hi = _int_bounds(node)
    if lo is not None and hi is not None and lo > hi:
        raise StructureError(f"{where}: {path}: the range is empty (minimum above maximum); no value can satisfy it")


def _int_bounds(node: dict) -> tuple[int | None, int | None]:
    import math

    lo = hi = None
    if "minimum" in node:
        lo = math.ceil(node["minimum"])
    if "exclusiveMinimum" in node:
        lo = max(lo if lo is not None else -10 ** 16, math.floor(node["exclusiveMinimum"]) + 1)
    if "maximum" in node:
        hi = math.floor(node["maximum"])
    if "exclusiveMaximum" in node:
        hi = min(hi if hi is not None else 10 ** 16, math.ceil(node["exclusiveMaximum"]) - 1)
    return lo, hi


def _digits(lo: int, hi: int) -> str:
    """GBNF for the decimal integers lo..hi (0 <= lo <= hi), no leading zeros."""
    alts = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(hi, 10 ** n - 1)
        if a <= b:
            alts.append(_same_length(str(a), str(b)))
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def _same_length(a: str, b: str) -> str:
    """GBNF for the digit strings a..b of one length."""
    if not a:
        return '""'
    rest = len(a) - 1
    tail = f" [0-9]{{{rest}}}" if rest else ""
    if a[0] == b[0]:
        return f'"{a[0]}"' + (" " + _same_length(a[1:], b[1:]) if rest else "")
    if a[1:] == "0" * rest and b[1:] == "9" * rest:
        return f"[{a[0]}-{b[0]}]{tail}"
    alts = [f'"{a[0]}" ' + _same_length(a[1:], "9" * rest)] if rest else [f'"{a[0]}"']
    if int(a[0]) + 1 <= int(b[0]) - 1:
        alts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]{tail}")
    alts.append(f'"{b[0]}" ' + _same_length("0" * rest, b[1:]) if rest else f'"{b[0]}"')
    return "(" + " | ".join(alts) + ")"


def _integer_rule(lo: int | None, hi: int | None) -> str:
    top = 10 ** INT_DIGITS - 1
    lo = -top if lo is None else lo
    hi = top if hi is None else hi
    alts = []
    if hi >= 0:
        alts.append(_digits(max(lo, 0), hi))
    if lo < 0:
        alts.append('"-" ' + _digits(max(1, -hi), -lo))
    return " | ".join(alts)


def _number_rule(lo: int | None, hi: int | None) -> str:
    """Decimal numbers in [lo, hi] (whole-number bounds): the integral part's range, and a fraction only
    below the top of each side (hi.5 would be over hi). No exponent."""
    top = 10 ** INT_DIGITS - 1
    lo = -top if lo is None else lo
    hi = top if hi is None else hi
    frac = '("." [0-9]{1,15})?'

    def magnitude(a: int, b: int) -> str:  # 0 <= a <= b: a..b, a fraction allowed below b
        return f'"{b}"' if a == b else f'{_digits(a, b - 1)} {frac} | "{b}"'

    if lo >= 0:
        return magnitude(lo, hi)
    if hi < 0:
        return f'"-" ({magnitude(-hi, -lo)})'
    return f'{magnitude(0, hi)} | "-" ({magnitude(0, -lo)})'


def _convert(schema: dict, where: str) -> str:
    from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

    class Converter(SchemaConverter):
        """llama-cpp-python's converter, with integer and number ranges, unanchored patterns anchored (a match
        of the whole text also matches somewhere in it), and no raw control characters in strings (its char
        rule lets a newline through, which no JSON parser takes)."""

        def _add_primitive(self, name, rule):
            if name == "char":
                rule = BuiltinRule(CHAR_RULE, [])
            return super()._add_primitive(name, rule)

        def visit(self, node, name):
            kind = node.get("type")
            if kind in ("integer", "number") and any(
                    k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                lo, hi = _int_bounds(node)
                body = _integer_rule(lo, hi) if kind == "integer" else _number_rule(lo, hi)
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                return self._add_rule(rule_name, f"({body}) space")
            if "pattern" in node and isinstance(node["pattern"], str):
                pattern = node["pattern"]
                node = {**node, "pattern": ("" if pattern.startswith("^") else "^") + pattern
                        + ("" if pattern.endswith("$") else "$")}
            return super().visit(node, name)

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = json.loads(json.dumps(schema))
    if "$ref" in schema:  # the converter follows no $ref inside $defs when the root is a $ref itself
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, "anyOf": [{"$ref": schema["$ref"]}]}
    try:
        resolved = converter.resolve_refs(schema, "input")
        converter.visit(resolved, "")
        grammar = converter.format_grammar()
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise StructureError(f"{where}: cannot be turned into a grammar ({exc.__class__.__name__}: "
                             f"{quote(str(exc), 120)[1:-1]})") from None
    check_grammar(grammar, where)
    return grammar


# ---------------------------------------------------------------------------------------------------
# GBNF: size, and a finite derivation of root

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|::=|[a-zA-Z0-9_-]+|\{[^}]*\}|[()|*+?.]')


def check_grammar(text: str, where: str = "grammar") -> None:
    """Refuse a grammar over MAX_GRAMMAR characters, without a root rule, or whose root has no finite
    derivation (every way through it recurses for ever: generation could only stop at max_tokens).
    What llama.cpp parses differently (a syntax error) it says itself when the answer starts."""
    if len(text) > MAX_GRAMMAR:
        raise StructureError(f"{where} is {len(text)} characters of grammar, over the {MAX_GRAMMAR} allowed; "
                             "send a smaller schema or grammar")
    rules = _rules(text)
    if rules is None:
        return  # not something this reader follows: llama.cpp's parser names the problem
    if "root" not in rules:
        raise StructureError(f"{where}: no rule named root; the grammar starts at `root ::= ...`")
    used = {tok for body in rules.values() for tok in body if re.fullmatch(r"[a-zA-Z0-9_-]+", tok)}
    undefined = sorted(used - set(rules))
    if undefined:
        raise StructureError(f"{where}: rule {undefined[0]} is used but not defined; define it or fix the name")
    finite: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, body in rules.items():
            if name not in finite and _finite(body, finite):
                finite.add(name)
                changed = True
    if "root" not in finite:
        stuck = sorted(n for n in rules if n not in finite)
        raise StructureError(f"{where} can never finish: no finite text satisfies root (rules with no way out: "
                             f"{', '.join(stuck[:4])}); give each recursion an alternative that ends")


def _rules(text: str) -> dict[str, list] | None:
    """name -> the token list of its body, or None where the text is not plain GBNF as read here."""
    tokens, at = [], 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if not m:
            return None
        at = m.end()
        if not m.group().isspace() and not m.group().startswith("#"):
            tokens.append(m.group())
    rules: dict[str, list] = {}
    current = None
    for i, tok in enumerate(tokens):
        if i + 1 < len(tokens) and tokens[i + 1] == "::=":
            current = rules.setdefault(tok, [])
            if current:
                current.append("|")
            continue
        if tok == "::=":
            continue
        if current is None:
            return None
        current.append(tok)
    return rules


def _finite(body: list, finite: set[str]) -> bool:
    """Whether some alternative of `body` derives a finite text, given the rules known to."""
    pos = [0]

    def alternates() -> bool:
        ok = sequence()
        while pos[0] < len(body) and body[pos[0]] == "|":
            pos[0] += 1
            ok = sequence() or ok
        return ok

    def sequence() -> bool:
        ok = True
        while pos[0] < len(body) and body[pos[0]] not in ("|", ")"):
            item = atom()
            while pos[0] < len(body) and (body[pos[0]] in "*+?" or body[pos[0]].startswith("{")):
                op = body[pos[0]]
                pos[0] += 1
                if op in ("*", "?") or re.fullmatch(r"\{\s*0\s*(,.*)?\}", op):
                    item = True
            ok = ok and item
        return ok

    def atom() -> bool:
        tok = body[pos[0]]
        pos[0] += 1
        if tok == "(":
            ok = alternates()
            pos[0] += 1  # ")"
            return ok
        if tok[0] in '"[.':
            return True
        return tok in finite

    return alternates()


# ---------------------------------------------------------------------------------------------------
# Tools: a call is {"name": NAME, "arguments": {...}}, the shape LlamaFactory's tool-call data uses

def tools_from(tools: Any, where: str = "tools") -> list[Tool]:
    """OpenAI's (and Ollama's) tool list: [{"type": "function", "function": {name, description, parameters}}]."""
    if not isinstance(tools, list) or not tools:
        raise StructureError(f"{where} must be a non-empty list of {{\"type\": \"function\", \"function\": ...}}")
    if len(tools) > MAX_TOOLS:
        raise StructureError(f"{where}: {len(tools)} tools, over the {MAX_TOOLS} allowed")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
                tool.get("function"), dict):
            raise StructureError(f"{at} must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                 "\"parameters\"}}}} (only function tools are run)")
        unknown = set(tool) - {"type", "function"}
        if unknown:
            raise StructureError(f"{at}: unknown field {quote(sorted(unknown)[0], 40)}")
        fn = tool["function"]
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise StructureError(f"{at}.function: unknown field {quote(sorted(unknown)[0], 40)}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_.-]{1,64}", name):
            raise StructureError(f"{at}.function.name must be 1 to 64 letters, digits, _ . or -, got "
                                 f"{quote(name, 40)}")
        if any(t.name == name for t in out):
            raise StructureError(f"{at}: a second tool named {quote(name)}; tool names must differ")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise StructureError(f"{at}.function.description must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise StructureError(f"{at}.function.parameters must be a JSON schema object")
        check_schema(params, f"{at}.function.parameters")
        out.append(Tool(name, description, params))
    return out


def with_tools(tools: list[Tool], choice: Any = "auto", text: Constraint | None = None,
               where: str = "tool_choice") -> Constraint | None:
    """The constraint of an answer that may (auto), must (required) or must by name call a tool. auto: the
    answer is a call or text not starting with "{" (or, with `text`, what it allows); none: no constraint
    beyond `text`."""
    if isinstance(choice, dict):  # {"type": "function", "function": {"name": ...}}
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise StructureError(f"{where} must be auto, none, required or {{\"type\": \"function\", "
                                 "\"function\": {\"name\": NAME}}")
        choice = name
        if not any(t.name == name for t in tools):
            raise StructureError(f"{where} names {quote(name, 40)}, which tools does not define; use one of "
                                 f"{', '.join(t.name for t in tools)}")
    elif choice not in ("auto", "none", "required"):
        raise StructureError(f"{where} must be auto, none, required or {{\"type\": \"function\", \"function\": "
                             f"{{\"name\": NAME}}}}, got {quote(choice, 40)}")
    if choice == "none":
        return text
    chosen = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                        "required": ["name", "arguments"]} for t in chosen]}
    defs = {}
    for t in chosen:  # each tool's own $defs, which its $refs name, at the top where the converter looks
        defs.update(t.parameters.get("$defs") or {})
    if defs:
        calls["$defs"] = defs
    grammar = _convert(calls, "tools")
    if choice == "auto":
        other = _rename(text.grammar, "text") if text is not None else 'text ::= [^{ \\t\\r\\n] [^\\x00]*'
        grammar = _rename(grammar, "call") + "\n" + other + "\nroot ::= call | text"
        check_grammar(grammar, "tools")
    return Constraint(grammar, "tools", schema=None, tools=tuple(tools), choice=choice, text=text)


def _rename(grammar: str, prefix: str) -> str:
    """Every rule of `grammar` under `prefix`- (root becomes `prefix`), so two grammars join without clashes."""
    names = {m.group(1) for m in re.finditer(r"^([a-zA-Z0-9-]+)\s*::=", grammar, re.M)}

    def swap(m: re.Match) -> str:
        word = m.group(0)
        if word not in names:
            return word
        return prefix if word == "root" else f"{prefix}-{word}"

    # rename names outside string literals and character classes
    parts = re.split(r'("(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\])', grammar)
    return "".join(p if i % 2 else re.sub(r"[a-zA-Z0-9-]+", swap, p) for i, p in enumerate(parts))


def parse_call(text: str, constraint: Constraint) -> dict | None:
    """{"name", "arguments"} when `text` is a call of one of the constraint's tools, else None."""
    body = text.strip()
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    tool = next((t for t in constraint.tools if t.name == value["name"]), None)
    if tool is None or validate(value["arguments"], tool.parameters) is not None:
        return None
    return value


class CallStream:
    """The pieces of a streamed answer to a request with tools: text goes out as it comes, a call (an answer
    starting with "{") is held until it is whole, since it is sent as a tool call and not as text."""

    def __init__(self, constraint: Constraint, send):
        self.constraint, self.send = constraint, send
        self.held = ""
        self.mode = ""  # "" undecided, "text" or "call"

    def push(self, piece: str) -> None:
        if self.mode == "text":
            self.send(piece)
            return
        self.held += piece
        if self.mode == "" and self.held.strip():
            self.mode = "call" if self.held.lstrip().startswith("{") else "text"
            if self.mode == "text":
                self.send(self.held)
                self.held = ""

    def finish(self, text: str) -> dict | None:
        """The call the answer is, or None (then anything held, a JSON text answer say, is sent as text)."""
        call = parse_call(text, self.constraint)
        if call is None and self.held:
            self.send(self.held)
            self.held = ""
        return call


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def render_call(name: str, arguments: Any) -> str:
    """An assistant turn that calls a tool, as the model writes it (and as tool-call training data has it)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------
# Validation of the keywords check_schema lets through

def validate(value: Any, schema: dict, root: dict | None = None, path: str = "$") -> str | None:
    """None when `value` satisfies `schema` (within SUPPORTED), else where and why not."""
    root = schema if root is None else root
    if "$ref" in schema:
        ref = schema["$ref"]
        target = root
        if ref != "#":
            for part in ref.split("#", 1)[1].strip("/").split("/"):
                target = target[part]
        return validate(value, target, root, path)
    if "anyOf" in schema:
        if all(validate(value, sub, root, path) is not None for sub in schema["anyOf"]):
            return f"{path}: matches none of anyOf"
    if "const" in schema and not _same(value, schema["const"]):
        return f"{path}: not the const"
    if "enum" in schema and not any(_same(value, v) for v in schema["enum"]):
        return f"{path}: not one of the enum"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_is(value, k) for k in kinds):
            return f"{path}: not {' or '.join(kinds)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path}: under minimum"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path}: over maximum"
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return f"{path}: not over exclusiveMinimum"
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            return f"{path}: not under exclusiveMaximum"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            return f"{path}: length out of range"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{path}: does not match pattern"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return f"{path}: item count out of range"
        prefix = schema.get("prefixItems") or (schema.get("items") if isinstance(schema.get("items"), list) else [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items") if isinstance(schema.get("items"), dict) \
                else None
            if sub is not None:
                problem = validate(item, sub, root, f"{path}[{i}]")
                if problem:
                    return problem
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                return f"{path}: missing {name}"
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = props.get(name)
            if sub is None:
                if extra is False:
                    return f"{path}: unexpected {name}"
                sub = extra if isinstance(extra, dict) else None
            if sub is not None:
                problem = validate(item, sub, root, f"{path}.{name}")
                if problem:
                    return problem
    return None


def _is(value: Any, kind: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "boolean": isinstance(value, bool), "null": value is None,
            "integer": isinstance(value, int) and not isinstance(value, bool) or (
                isinstance(value, float) and value.is_integer()),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(kind, False)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
