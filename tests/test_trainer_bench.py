"""`hublab bench ab` on the tiny real base + adapter experts from conftest."""
from __future__ import annotations

import json

import pytest

from hublab.cli import main as hublab_main
from hublab.trainer.bench import load_questions, mentions


def test_mentions_are_whole_words():
    assert mentions("Go and go, but not django or gopher", ["go"]) == 2


def test_ab_writes_summary_and_answers(tiny_models_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "say the word", "terms": ["the", "python"]}\nplain question line\n')
    out = tmp_path / "results"
    rc = hublab_main(["bench", "ab", "--questions", str(q), "--expert", "alpha", "--models-dir",
                      str(tiny_models_dir), "--out", str(out), "--max-tokens", "8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["model"] == "tiny" and summary["expert"]["model"] == "alpha"
    assert summary["questions"] == 2 and summary["expert"]["tokens_per_s"] > 0
    answers = [json.loads(line) for line in (out / "answers_expert.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and answers[0]["terms"] == ["the", "python"]
    assert answers[0]["mentions"] == mentions(answers[0]["answer"], ["the", "python"])
    assert json.loads(capsys.readouterr().out)["hit_rate_gain"] == summary["hit_rate_gain"]


def test_bad_question_file(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question": "ok"}\n{"terms": ["x"]}\n')
    with pytest.raises(Exception, match=r"q\.jsonl:2: missing column 'question'"):
        load_questions(tmp_path / "q.jsonl")


def test_questions_from_training_datasets(tmp_path):
    """The formats the trainer reads are question files too: a record's first user turn is its question."""
    alpaca = [{"instruction": "Name a list method.", "input": "", "output": "append"},
              {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob", "terms": ["hi"]}]
    (tmp_path / "a.json").write_text(json.dumps(alpaca, indent=2))
    assert load_questions(tmp_path / "a.json") == [{"question": "Name a list method.", "terms": []},
                                                   {"question": "Say hi\n\nto Bob", "terms": ["hi"]}]
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "What is pip?"},
                                                                    {"from": "gpt", "value": "a tool"}]}) + "\n"
                                      + json.dumps({"question": "What is Rust?", "response": "a language"}) + "\n")
    assert [r["question"] for r in load_questions(tmp_path / "s.jsonl")] == ["What is pip?", "What is Rust?"]
    (tmp_path / "n.json").write_text('[{"nothing": 1}]')
    with pytest.raises(Exception, match=r"n\.json:1: missing column 'question'"):
        load_questions(tmp_path / "n.json")
