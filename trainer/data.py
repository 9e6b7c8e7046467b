"""Training data: read JSONL/JSON datasets in the common formats, mix them by ratio, and tokenize
conversations with the model's chat template so that only response tokens carry a loss.

Formats (detected from the first record, or named):
- ``alpaca``:   {"instruction", "input"?, "output", "system"?, "history"?}
- ``sharegpt``: {"conversations": [{"from": "human"|"gpt"|"system", "value"}]} or {"messages": [{"role", "content"}]}
- ``qa``:       {"question", "response"} or {"prompt", "response"}
- ``text``:     {"text"} (every token is trained); a ``.txt`` file is one text per line
and LlamaFactory's ``dataset_info.json`` registry, whose entries name a file, a formatting and columns.
Every local entry of LlamaFactory's own data/dataset_info.json loads: a pre-training entry
(``columns: {"prompt": "text"}``, no response column) gives text examples; sharegpt tool-call records keep
their ``tools`` and their function_call / observation turns (observation becomes the ``tool`` role);
ranking entries (DPO) train on the chosen answer; KTO entries keep only the records tagged desirable.

Every problem with the data is a one-line `DataError` naming the file and the line.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hublab.runtime import chat
from hublab.runtime.errors import HublabError

IGNORE = -100  # label of a token that carries no loss (prompt, padding)
FORMATS = ("auto", "alpaca", "sharegpt", "qa", "text")


class DataError(HublabError, ValueError):
    """A dataset is malformed; the message names the file, the line and the fix."""


@dataclass
class Example:
    """One training record: a conversation (messages) or a raw text, and where it came from."""
    source: str  # "file:line", for error messages
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    tools: str | None = None  # tool descriptions (JSON text) a tool-call conversation may use


@dataclass
class DataSpec:
    """One dataset in a mix: a file (or a registry entry) and its share of the training stream."""
    path: Path
    ratio: float = 1.0
    format: str = "auto"
    name: str = ""  # entry of a dataset_info.json registry when path is one
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Reading records

def read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a JSONL file or a JSON array file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; fix the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc.__class__.__name__}); save it as UTF-8 JSONL") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty; add one JSON record per line")
    if path.suffix == ".txt":  # plain text, one example per line (LlamaFactory's wiki_demo.txt)
        return [(n, {"text": line}) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array file (LlamaFactory's usual .json)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the syntax") from None
        line_of = _array_item_lines(text, len(items))
        records = list(zip(line_of, items))
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                                "write one JSON object per line") from None
    if not records:
        raise DataError(f"{path}: no records; add one JSON object per line")
    for number, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(rec).__name__}; "
                            "write one {...} object per line")
    return records


def _array_item_lines(text: str, n: int) -> list[int]:
    """Line on which each top-level item of a JSON array starts (for error messages)."""
    lines, depth, line, in_str, esc, expect = [], 0, 1, False, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if depth == 1 and expect and not ch.isspace() and ch not in ",]":
            lines.append(line)
            expect = False
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
            expect = depth == 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 1:
            expect = True
    lines += [line] * (n - len(lines))
    return lines[:n]


def detect_format(rec: dict) -> str | None:
    if "conversations" in rec or "messages" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "response" in rec and ("question" in rec or "prompt" in rec):
        return "qa"
    if "text" in rec:
        return "text"
    return None


_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system", "observation": "tool", "tool": "tool", "function": "tool",
         "function_call": "assistant"}


def _str(rec: dict, key: str, where: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing column '{key}'; add it to every record")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: column '{key}' is empty; give it text or drop the record")
    return value


def to_example(rec: dict, fmt: str, where: str, columns: dict[str, str] | None = None,
               tags: dict[str, str] | None = None) -> Example:
    """Turn one record into an Example; `columns`/`tags` rename fields as LlamaFactory's registry does."""
    col = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
           "history": "history", "messages": None, "text": "text"}
    col.update(columns or {})
    if fmt == "text":
        return Example(where, text=_str(rec, col["text"], where))
    if fmt == "qa":
        key = "question" if "question" in rec else "prompt"
        return Example(where, [{"role": "user", "content": _str(rec, key, where)},
                               {"role": "assistant", "content": _str(rec, "response", where)}])
    if fmt == "alpaca":
        if columns and "prompt" in columns and "response" not in columns and col["response"] not in rec:
            # a pre-training entry of a registry: the prompt column is the whole text
            return Example(where, text=_str(rec, col["prompt"], where))
        if col.get("chosen") and col["chosen"] in rec:  # ranking (DPO) entry: learn the chosen answer
            rec = {**rec, col["response"]: rec[col["chosen"]]}
        prompt = _str(rec, col["prompt"], where)
        query = _str(rec, col["query"], where, required=False)
        msgs = []
        system = _str(rec, col["system"], where, required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        history = rec.get(col["history"]) or []
        if not isinstance(history, list) or any(not (isinstance(h, list) and len(h) == 2) for h in history):
            raise DataError(f"{where}: column '{col['history']}' must be a list of [prompt, response] pairs")
        for q, a in history:
            msgs += [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
        msgs.append({"role": "user", "content": prompt + ("\n\n" + query if query.strip() else "")})
        msgs.append({"role": "assistant", "content": _str(rec, col["response"], where)})
        return Example(where, msgs)
    if fmt == "sharegpt":
        key = col["messages"] or ("conversations" if "conversations" in rec else "messages")
        turns = rec.get(key)
        if turns is None:
            raise DataError(f"{where}: missing column '{key}'; sharegpt records need a list of turns")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: column '{key}' must be a non-empty list of turns")
        t = {"role_tag": None, "content_tag": None}
        t.update(tags or {})
        mapping = dict(_ROLE)
        for tag, role in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system")):
            if (tags or {}).get(tag):
                mapping[tags[tag]] = role
        msgs = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: turn {i + 1} must be an object with role/content (or from/value)")
            role_key = t["role_tag"] or ("from" if "from" in turn else "role")
            content_key = t["content_tag"] or ("value" if "value" in turn else "content")
            role = mapping.get(str(turn.get(role_key, "")).lower())
            if role is None:
                raise DataError(f"{where}: turn {i + 1} has unknown role {turn.get(role_key)!r}; "
                                f"use one of {', '.join(sorted(_ROLE))}")
            content = turn.get(content_key)
            if not isinstance(content, str):
                raise DataError(f"{where}: turn {i + 1} is missing its '{content_key}' text")
            msgs.append({"role": role, "content": content})
        chosen = rec.get(col["chosen"]) if col.get("chosen") else None
        if chosen is not None:  # ranking (DPO) entry: the chosen answer ends the conversation
            text = chosen.get(t["content_tag"] or ("value" if "value" in chosen else "content")) \
                if isinstance(chosen, dict) else chosen
            if not isinstance(text, str):
                raise DataError(f"{where}: column '{col['chosen']}' must be a turn or a string")
            msgs.append({"role": "assistant", "content": text})
        system = rec.get(col["system"]) if col["system"] else None
        if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: conversation has no assistant turn; nothing to learn from it")
        tools = rec.get(col.get("tools") or "tools")
        if tools is not None and not isinstance(tools, str):
            tools = json.dumps(tools, ensure_ascii=False)
        return Example(where, msgs, tools=tools or None)
    raise DataError(f"{where}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def plain_texts(specs: list[DataSpec]) -> list[str]:
    """Every example of `specs` as plain text (a conversation's contents joined by newlines), e.g. to
    train a tokenizer on."""
    return [ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages)
            for spec in specs for ex in load_examples(spec)]


def load_examples(spec: DataSpec) -> list[Example]:
    """All examples of one dataset (a data file, or one entry of a dataset_info.json registry)."""
    path = Path(spec.path)
    if path.name == "dataset_info.json" or path.is_dir():
        return load_registry(path, spec.name)
    if spec.format not in FORMATS:
        raise DataError(f"{path}: unknown format {spec.format!r}; use one of {', '.join(FORMATS)}")
    records = read_records(path)
    fmt = spec.format
    if fmt == "auto":
        fmt = detect_format(records[0][1])
        if fmt is None:
            keys = ", ".join(sorted(records[0][1])) or "none"
            raise DataError(f"{path}:{records[0][0]}: cannot tell the format from columns ({keys}); expected "
                            "instruction/output, conversations, question/response, prompt/response or text")
    kto = spec.columns.get("kto_tag")
    return [to_example(rec, fmt, f"{path}:{line}", spec.columns, spec.tags) for line, rec in records
            if not kto or rec.get(kto) is not False]  # KTO: an undesirable answer is not one to imitate


def load_registry(path: Path, name: str) -> list[Example]:
    """One dataset of a LlamaFactory dataset_info.json (path may be the file or its directory)."""
    path = Path(path)
    info_path = path / "dataset_info.json" if path.is_dir() else path
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{info_path}: registry not found; fix the path") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{info_path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the syntax") from None
    if not isinstance(info, dict) or not info:
        raise DataError(f"{info_path}: expected an object of named datasets")
    if not name:
        raise DataError(f"{info_path}: name the dataset to use (one of {', '.join(sorted(info))})")
    if name not in info:
        raise DataError(f"{info_path}: no dataset named {name!r}; known: {', '.join(sorted(info))}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise DataError(f"{info_path}: entry {name!r} must be an object with file_name")
    if "file_name" not in entry:
        remote = next((k for k in ("hf_hub_url", "ms_hub_url", "script_url") if k in entry), None)
        if remote:
            raise DataError(f"{info_path}: entry {name!r} uses {remote}, which needs a hub; "
                            "download the data and give file_name instead")
        raise DataError(f"{info_path}: entry {name!r} has no file_name; add the data file's name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{info_path}: entry {name!r} formatting {formatting!r} unknown; use alpaca or sharegpt")
    columns = dict(entry.get("columns") or {})
    if formatting == "sharegpt":
        columns.setdefault("messages", "conversations")
    spec = DataSpec(info_path.parent / entry["file_name"], format=formatting, columns=columns,
                    tags=dict(entry.get("tags") or {}))
    return load_examples(spec)


# ---------------------------------------------------------------------------------------------------
# Splitting and mixing

def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the examples (at least one when there are two or more) for evaluation."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    return items[n_eval:], items[:n_eval]


def mix(datasets: list[list[Example]], ratios: list[float], seed: int, total: int | None = None) -> list[Example]:
    """Draw from several datasets so each gets its ratio of `total` (default: their combined size).

    A dataset smaller than its share is repeated (every example once before any twice), so an 80/20
    mix of a large conversation set and a small memory set really is 80/20.
    """
    rng = random.Random(seed)
    datasets = [d for d in datasets]
    norm = sum(ratios)
    if norm <= 0:
        raise DataError("dataset ratios must add up to more than 0")
    total = total if total is not None else sum(len(d) for d in datasets)
    out: list[Example] = []
    for data, ratio in zip(datasets, ratios):
        if not data:
            continue
        want = round(total * ratio / norm)
        drawn: list[Example] = []
        while len(drawn) < want:
            cycle = list(data)
            rng.shuffle(cycle)
            drawn += cycle[: want - len(drawn)]
        out += drawn
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------------
# Chat templates and tokenization

# The chat templates are defined once, in the runtime, and serve training, serving and exported GGUFs.
TEMPLATES = chat.TEMPLATES


def resolve_template(tokenizer, name: str = "auto", model_type: str = "", where: str = "template") -> str:
    """The Jinja chat template to use: the tokenizer's own for 'auto', else a named built-in one."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return own
        vocab = tokenizer.get_vocab()
        return TEMPLATES[chat.auto_format(model_type, lambda token: token in vocab)]
    if name not in TEMPLATES:
        raise DataError(f"{where}: unknown chat template {name!r}; use auto or one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def conversation(example: Example) -> list[dict]:
    """The messages a template renders: tool descriptions, when the record has them, join the system turn
    (runtime/chat.py's with_tools, which serving uses for a request with tools)."""
    if not example.tools:
        return example.messages
    return chat.with_tools(example.messages, example.tools)


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(example: Example, tokenizer, template: str, max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for one example; labels are IGNORE except on response tokens.

    The template is rendered turn by turn; the text each assistant turn adds is its response. Returns
    None when truncation to `max_len` leaves no response token.
    """
    def tok(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    if example.text is not None:
        ids = tok(example.text)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        ids = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        ids = ids[:max_len]
        labels = list(ids)
        if labels and bos is not None:
            labels[0] = IGNORE
        return (ids, labels) if len(ids) > 1 else None
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    msgs = conversation(example)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, msgs[:i], add_generation_prompt=True)
        full = _render(tokenizer, template, msgs[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{example.source}: the chat template does not render turns as prefixes of the "
                            "conversation; set template = \"gemma\", \"chatml\", \"llama3\" or \"alpaca\"")
        context = tok(prompt[len(done):])
        response = tok(full[len(prompt):])
        ids += context + response
        labels += [IGNORE] * len(context) + response
        done = full
    ids, labels = ids[:max_len], labels[:max_len]
    if not any(lab != IGNORE for lab in labels[1:]):
        return None
    return ids, labels


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    source: str


def encode_all(examples: list[Example], tokenizer, template: str, max_len: int) -> list[Encoded]:
    out = []
    for ex in examples:
        enc = encode(ex, tokenizer, template, max_len)
        if enc is not None:
            out.append(Encoded(enc[0], enc[1], ex.source))
    return out


def batches(items: list[Encoded], batch_size: int, pad_id: int, seed: int, shuffle: bool = True):
    """Endless (when shuffling) stream of padded (input_ids, labels, attention_mask) tensors.

    Examples of similar length go together (sorted within shuffled pools of 50 batches) so that
    little compute is spent on padding.
    """
    import torch

    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        if shuffle:
            rng.shuffle(order)
            pool = batch_size * 50
            order = [i for k in range(0, len(order), pool)
                     for i in sorted(order[k:k + pool], key=lambda j: len(items[j].ids))]
        groups = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        if shuffle:
            rng.shuffle(groups)
        for group in groups:
            width = max(len(items[j].ids) for j in group)
            ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, j in enumerate(group):
                n = len(items[j].ids)
                ids[row, :n] = torch.tensor(items[j].ids)
                labels[row, :n] = torch.tensor(items[j].labels)
                mask[row, :n] = 1
            yield ids, labels, mask
        if not shuffle:
            return


def load_mix(specs: list[DataSpec], eval_fraction: float, seed: int,
             total: int | None = None) -> tuple[list[Example], list[Example]]:
    """Train and eval examples from several datasets; each is split first so eval never sees train."""
    if not specs:
        raise DataError("no datasets given; add at least one [[data]] entry with a path")
    trains, evals = [], []
    for k, spec in enumerate(specs):
        tr, ev = split_eval(load_examples(spec), eval_fraction, seed + k)
        trains.append(tr)
        evals += ev
    if len(specs) == 1:
        return trains[0], evals
    return mix(trains, [s.ratio for s in specs], seed, total), evals


def as_dicts(examples: list[Example]) -> list[dict[str, Any]]:
    """Examples as sharegpt-style records (for writing a mixed dataset back out)."""
    return [{"text": e.text} if e.text is not None else
            {"messages": e.messages, **({"tools": e.tools} if e.tools else {})} for e in examples]
