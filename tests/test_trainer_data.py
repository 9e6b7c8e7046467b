"""Dataset loading, mixing, templates and response-only labels on a real (tiny) tokenizer."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from trainer_tiny import tiny_hf, write_jsonl  # noqa: F401

from hublab.trainer import data as D


@pytest.fixture(scope="module")
def tok(tiny_hf):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf)


RECORDS = {
    "alpaca": {"instruction": "Name a fruit", "input": "red", "output": "An apple.", "system": "Be brief."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                   {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    "question": {"question": "What is 2+2?", "response": "Four."},
    "prompt": {"prompt": "What is 2+2?", "response": "Four."},
    "text": {"text": "Plain text is trained on every token."},
}


@pytest.mark.parametrize("kind", list(RECORDS))
def test_formats_are_detected_and_only_responses_are_labelled(tmp_path, tok, kind):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [RECORDS[kind]] * 3)
    examples = D.load_examples(D.DataSpec(path))
    assert len(examples) == 3 and examples[0].source == f"{path}:1"
    template = D.resolve_template(tok, "chatml")
    ids, labels = D.encode(examples[0], tok, template, 256)
    assert len(ids) == len(labels)
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE])
    if kind == "text":
        assert "every token" in learned
    else:
        want = {"alpaca": "An apple.", "sharegpt": "Goodbye.", "messages": "Hello.", "question": "Four.",
                "prompt": "Four."}[kind]
        assert want.replace(" ", "") in learned.replace(" ", "")
        prompt_words = {"alpaca": "fruit", "sharegpt": "Bye", "messages": "Hi", "question": "2+2",
                        "prompt": "2+2"}[kind]
        assert prompt_words not in learned  # the prompt carries no loss


def test_gemma_template_renders_turns(tok):
    ex = D.Example("x:1", [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}])
    text = tok.apply_chat_template(ex.messages, chat_template=D.TEMPLATES["gemma"], tokenize=False)
    assert text.endswith("<start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n")


def test_llamafactory_registry(tmp_path, tok):
    write_jsonl(tmp_path / "mem.jsonl", [{"q": "Who am I?", "a": "You are Ada.", "h": []}] * 4)
    (tmp_path / "conv.json").write_text(json.dumps([RECORDS["sharegpt"]] * 2))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "memory": {"file_name": "mem.jsonl", "columns": {"prompt": "q", "response": "a", "history": "h"}},
        "conv": {"file_name": "conv.json", "formatting": "sharegpt", "columns": {"messages": "conversations"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}},
        "remote": {"hf_hub_url": "someone/data"}}))
    mem = D.load_examples(D.DataSpec(tmp_path / "dataset_info.json", name="memory"))
    assert mem[0].messages[-1] == {"role": "assistant", "content": "You are Ada."}
    conv = D.load_examples(D.DataSpec(tmp_path, name="conv"))
    assert len(conv) == 2 and conv[0].messages[0]["role"] == "user"
    with pytest.raises(D.DataError, match="hf_hub_url"):
        D.load_examples(D.DataSpec(tmp_path / "dataset_info.json", name="remote"))
    with pytest.raises(D.DataError, match="no dataset named 'nope'; known: conv, memory, remote"):
        D.load_examples(D.DataSpec(tmp_path / "dataset_info.json", name="nope"))


def test_mix_follows_ratios_and_eval_never_sees_train(tmp_path):
    big = write_jsonl(tmp_path / "conv.jsonl", [{"question": f"c{i}", "response": "x"} for i in range(200)])
    small = write_jsonl(tmp_path / "mem.jsonl", [{"question": f"m{i}", "response": "y"} for i in range(10)])
    train, ev = D.load_mix([D.DataSpec(big, 0.8), D.DataSpec(small, 0.2)], eval_fraction=0.1, seed=1, total=500)
    counts = Counter(e.messages[0]["content"][0] for e in train)
    assert counts == {"c": 400, "m": 100}  # 80/20 even though memory is 20x smaller (it repeats)
    train_q = {e.messages[0]["content"] for e in train}
    assert ev and not train_q & {e.messages[0]["content"] for e in ev}


def test_batches_pad_and_mask(tok):
    items = [D.Encoded([1, 2, 3], [D.IGNORE, 2, 3], "a"), D.Encoded([1, 2], [D.IGNORE, 2], "b")]
    ids, labels, mask = next(D.batches(items, 2, pad_id=0, seed=0, shuffle=False))
    assert ids.shape == (2, 3) and mask.sum() == 5 and (labels[mask == 0] == D.IGNORE).all()


@pytest.mark.parametrize("content,fmt,message", [
    ("", "auto", r"empty\.jsonl: file is empty"),
    ('{"question": "q", "response": "r"}\n{"question": "q"', "auto", r"bad\.jsonl:2: invalid JSON"),
    ('{"question": "q", "response": "r"}\n{"question": "q"}\n', "auto", r"bad\.jsonl:2: missing column 'response'"),
    ('{"instruction": "q", "output": "r"}\n{"instruction": "q", "output": ""}\n', "auto",
     r"bad\.jsonl:2: column 'output' is empty"),
    ('{"foo": 1}\n', "auto", r"bad\.jsonl:1: cannot tell the format"),
    ('[1, 2]\n', "auto", r"bad\.jsonl:1: expected a JSON object"),
    ('{"text": "x"}\n', "csv", r"unknown format 'csv'"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}\n', "auto", r"bad\.jsonl:1: turn 1 has unknown role"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, content, fmt, message):
    name = "empty.jsonl" if not content else "bad.jsonl"
    (tmp_path / name).write_text(content)
    with pytest.raises(D.DataError, match=message) as err:
        D.load_examples(D.DataSpec(tmp_path / name, format=fmt))
    assert "\n" not in str(err.value)


def test_unknown_template_is_an_error(tok):
    with pytest.raises(D.DataError, match="unknown chat template 'vicuna'"):
        D.resolve_template(tok, "vicuna")


def test_tool_call_data_renders_as_serving_renders_a_tool_request(tiny_hf, tmp_path):
    """A glaive tool-call record (LlamaFactory's shape) trains on exactly the text hublab serve puts before and
    writes after: the tools in the system turn, the call as the {"name", "arguments"} object the grammar makes,
    the tool's result as a tool turn. Rendered with the template the runtime uses, through the tiny tokenizer."""
    from transformers import AutoTokenizer

    from hublab.runtime import chat
    from hublab.runtime.serve import http_openai
    from hublab.runtime.engine import structured

    tools = [{"name": "set_light", "description": "Turn a light on or off",
              "parameters": {"type": "object", "properties": {"room": {"type": "string"}, "on": {"type": "boolean"}},
                             "required": ["room", "on"]}}]
    call = {"name": "set_light", "arguments": {"room": "kitchen", "on": True}}
    record = {"conversations": [{"from": "human", "value": "Turn on the kitchen light"},
                                {"from": "function_call", "value": json.dumps(call)},
                                {"from": "observation", "value": '{"ok": true}'},
                                {"from": "gpt", "value": "Done: the kitchen light is on."}],
              "tools": json.dumps(tools)}
    ex = D.load_examples(D.DataSpec(write_jsonl(tmp_path / "glaive.jsonl", [record])))[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    template = chat.TEMPLATES["gemma"]
    trained = D._render(tokenizer, template, D.conversation(ex)[:3], add_generation_prompt=False)

    # the same conversation as an OpenAI request with tools, as http_openai and Device.complete render it
    served = http_openai._messages([
        {"role": "user", "content": "Turn on the kitchen light"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "set_light", "arguments": json.dumps(call["arguments"])}}]}])
    prompt = chat.with_tools(served[:1], [structured.Tool(**t).to_dict() for t in tools])
    assert chat.render("gemma", prompt).text + structured.render_call("set_light", call["arguments"]) in trained
    assert trained == D._render(tokenizer, template, chat.with_tools(served, json.dumps(tools)),
                                add_generation_prompt=False)
    ids, labels = D.encode(ex, tokenizer, template, 512)
    learned = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE])
    assert '"name": "set_light"' in learned and "Done" in learned  # the call is a response the expert learns
