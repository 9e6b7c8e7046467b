"""The demo experts' answer-from-what-you-are-shown training data (trainer/demo_data.with_shots), with the real
ONNX router's encoder that finds pack pairs on the device."""
from __future__ import annotations

import json

from hublab.runtime.paths import EMBEDDED_MODELS_DIR
from hublab.runtime.routing.router import Router
from hublab.trainer.demo_data import with_shots

PACK = [
    {"question": "How do I read a JSON file in Python?", "response": "Open it and call `json.load(f)`."},
    {"question": "How do I write JSON to a file in Python?", "response": "Call `json.dump(obj, f)`."},
    {"question": "How do I parse a JSON string in Python?", "response": "Call `json.loads(text)`."},
    {"question": "How tall is Mount Everest?", "response": "About 8,849 metres."},
]


def test_each_question_follows_its_closest_pairs_but_never_its_own(tmp_path):
    pack = tmp_path / "pack.jsonl"
    pack.write_text("".join(json.dumps(r) + "\n" for r in PACK))
    rows = [PACK[0], {"question": "What is the boiling point of water at sea level?", "response": "100 °C."}]
    own, far = with_shots(rows, pack, EMBEDDED_MODELS_DIR / "router", k=2, least=0.45)
    # the question's own pair is left out; the two other JSON pairs come before it as earlier turns
    asked = [m["content"] for m in own["messages"] if m["role"] == "user"]
    assert asked[-1] == PACK[0]["question"] and PACK[0]["question"] not in asked[:-1]
    assert set(asked[:-1]) == {PACK[1]["question"], PACK[2]["question"]}
    assert [m["role"] for m in own["messages"]] == ["user", "assistant"] * 3
    assert own["messages"][-1] == {"role": "assistant", "content": PACK[0]["response"]}
    # shown as the device shows them, each with its answer, the closest next to the question
    shown = dict(zip(asked[:-1], [m["content"] for m in own["messages"] if m["role"] == "assistant"][:-1]))
    assert all(shown[p["question"]] == p["response"] for p in PACK[1:3])
    router = Router.load(EMBEDDED_MODELS_DIR / "router", threads=1)
    q, a, b = router.embed([PACK[0]["question"], *asked[:2]])
    assert q @ a <= q @ b
    # a question no pair comes near (least 0.9 here) is asked bare, as on the device
    bare, = with_shots(rows[1:], pack, EMBEDDED_MODELS_DIR / "router", k=2, least=0.9)
    assert bare["messages"] == [{"role": "user", "content": rows[1]["question"]},
                                {"role": "assistant", "content": rows[1]["response"]}]
    assert len(far["messages"]) <= 6
