"""A tiny real router encoder for tests: WordLevel tokenizer + an ONNX graph that mean-pools token vectors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ggufs import WORDS


def write_encoder_router(directory: Path, experts: list[str]) -> np.ndarray:
    """A tiny real router: a WordLevel tokenizer, an ONNX encoder that mean-pools token vectors over the
    attention mask and L2-normalises them (`embedding`), and a linear head (`probabilities`). Returns the
    token vector table so a test can compute an embedding by hand."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    directory.mkdir(parents=True)
    vocab = {"[UNK]": 0} | {w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    rng = np.random.default_rng(0)
    table = rng.standard_normal((len(vocab), 8)).astype(np.float32)
    head = rng.standard_normal((8, len(experts))).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["vectors"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf"], ["mask3"], axes=[2]),
        helper.make_node("Mul", ["vectors", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked"], ["summed"], axes=[1], keepdims=0),
        helper.make_node("ReduceSum", ["mask3"], ["count"], axes=[1], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["mean"]),
        helper.make_node("LpNormalization", ["mean"], ["embedding"], axis=-1, p=2),
        helper.make_node("MatMul", ["embedding", "head"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", len(experts)]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    (directory / "router.toml").write_text("[router]\nexperts = " + json.dumps(experts) + "\ntemperature = 1.0\n")
    return table
