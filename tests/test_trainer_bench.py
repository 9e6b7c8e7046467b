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
