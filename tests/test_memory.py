"""Memory estimates from GGUF headers, checked against hand computation and llama.cpp's real use."""
from ggufs import write_lora_adapter
from hublab.runtime.engine.memory import estimate_adapter, estimate_model, kv_cache_bytes, read_gguf


def test_header_facts_of_tiny_model(tiny_gguf):
    info = read_gguf(tiny_gguf)
    assert info.kind == "model" and info.arch == "llama" and info.n_layer == 2 and info.n_embd == 64
    assert info.n_head == 4 and info.n_head_kv == 2 and info.key_length == 16 and info.file_type == "F32"
    assert info.tensor_bytes <= tiny_gguf.stat().st_size


def test_kv_cache_formula(tiny_gguf):
    info = read_gguf(tiny_gguf)
    # context x layers x kv-heads x (key + value dims) x 2 bytes
    assert kv_cache_bytes(info, 128) == 128 * 2 * 2 * (16 + 16) * 2


def test_gemma_sliding_window_layers_keep_only_their_window(gemma_gguf):
    info = read_gguf(gemma_gguf)
    assert info.arch == "gemma3" and info.sliding_window == 512 and info.n_layer == 18
    per_token_layer = info.n_head_kv * (info.key_length + info.value_length) * 2
    # 3 global layers see the whole 4096 context; 15 sliding ones keep window + one micro-batch
    assert kv_cache_bytes(info, 4096) == per_token_layer * (3 * 4096 + 15 * 1024)


def test_adapter_estimate_is_its_tensor_bytes(tmp_path, tiny_gguf):
    a = read_gguf(write_lora_adapter(tiny_gguf, tmp_path / "a.gguf"))
    assert a.kind == "adapter" and estimate_adapter(a).total == a.tensor_bytes


MEASURE = """
import sys, psutil
from hublab.runtime.engine.hostcpu import load_llama
proc = psutil.Process()
before = proc.memory_info().rss
llm = load_llama(sys.argv[1], n_ctx=1024, n_threads=1, verbose=False, swa_full=False)
llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
print(proc.memory_info().rss - before)
"""


def test_estimate_covers_what_llama_cpp_really_allocates(gemma_gguf):
    """RSS of a fresh process grows by about the estimate when gemma loads and generates (+-15%)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MEASURE, str(gemma_gguf)], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    est = estimate_model(read_gguf(gemma_gguf), 1024).total
    assert 0.85 < est / grown < 1.15, (est, grown)


def test_tensor_type_table_matches_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    from hublab.runtime.engine.memory import TENSOR_TYPES

    assert {k: (name, block, size) for k, (name, block, size) in TENSOR_TYPES.items()} == {
        int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGML_QUANT_SIZES}


def test_drop_file_cache_gives_the_pages_back(tmp_path):
    """After a file was read into memory its cached pages go (util-linux's fincore counts them); readers still see
    the whole file, and a missing file is no error."""
    import os
    import shutil
    import subprocess

    from hublab.runtime.engine.memory import drop_file_cache

    f = tmp_path / "graph.onnx"
    with f.open("wb") as out:
        out.write(os.urandom(4 << 20))
        out.flush()
        os.fsync(out.fileno())  # dirty pages cannot be dropped
    data = f.read_bytes()

    def cached_pages() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(f)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    has_fincore = shutil.which("fincore") is not None
    if has_fincore:
        assert cached_pages() > 0
    drop_file_cache(f, tmp_path / "gone.npy")
    if has_fincore:
        assert cached_pages() == 0
    assert f.read_bytes() == data
