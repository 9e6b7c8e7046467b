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


# runtime/'s parts, lowest first: a module may import its own part and the parts below it, never one above.
# The top-level modules (config, paths, errors, inputs) sit under every part; run.py is a verb over all of them.
LAYERS = ["", "engine", "pkg", "routing", "serve"]
VERBS = {"run"}


def runtime_imports() -> list[tuple[str, str, str]]:
    """(file, its part, the part it imports) for every import between runtime modules, read with ast."""
    import ast

    found = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        parts = path.relative_to(ROOT / "runtime").with_suffix("").parts
        package = list(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("hublab.runtime"):
                target = node.module.split(".")[2:]
            else:
                continue
            names = [target] if node.module else [target + [a.name] for a in node.names]
            for name in names:
                part = name[0] if name and name[0] in LAYERS else ""
                found.append((str(path.relative_to(ROOT)), parts[0] if len(parts) > 1 else "", part))
    return found


def test_runtime_imports_only_go_down():
    found = runtime_imports()
    assert any(part == "engine" for _, own, part in found if own == "serve")  # the reader sees real imports
    upward = [(f, own, part) for f, own, part in found
              if Path(f).stem not in VERBS and LAYERS.index(part) > LAYERS.index(own)]
    assert not upward, f"imports that go up a layer ({' < '.join(LAYERS[1:])}): {upward}"
