"""The distribution's layout: import names, no shadowing of PyPI's `packaging`, a fast CLI."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packaging_dir_does_not_shadow_pypi_packaging():
    # `python -m ...` from the repo root puts the root on sys.path; packaging/ must not win.
    out = subprocess.run([sys.executable, "-c", "import packaging.version, packaging; print(packaging.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert "site-packages" in out.stdout
    assert not (ROOT / "packaging" / "__init__.py").exists()


def test_import_names_map_to_repo_folders():
    import hublab.runtime
    import hublab.shell
    import hublab.trainer

    assert Path(hublab.runtime.__file__).parent == ROOT / "runtime"
    assert Path(hublab.shell.__file__).parent == ROOT / "shell"
    assert Path(hublab.trainer.__file__).parent == ROOT / "trainer"


def test_runtime_imports_without_torch():
    code = ("import sys; import hublab.runtime.engine.runtime, hublab.runtime.config, hublab.runtime.engine.profiles; "
            "assert 'torch' not in sys.modules, 'runtime imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_fast_and_lists_verbs():
    hublab = Path(sys.executable).parent / "hublab"
    out = subprocess.run([str(hublab), "--help"], capture_output=True, text=True, check=True)
    for verb in ("shell", "run", "profile", "serve", "pkg", "train", "export"):
        assert verb in out.stdout
    # lazy imports: no llama.cpp, onnxruntime or torch is imported to print help
    code = "import sys; from hublab import cli; assert not {'llama_cpp','torch','onnxruntime'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
