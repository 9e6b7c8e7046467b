"""system.toml and model/expert TOMLs: every error names the file, the line/key and the fix."""
from dataclasses import asdict
from pathlib import Path

import pytest

from hublab.runtime.config import (MODEL_SCHEMA, SAMPLER, SEED_MAX, SYSTEM_SCHEMA, ConfigError, Inference, fill_markers,
                                   load_model, load_system, parse_duration, parse_routing, parse_size, scan_models,
                                   set_system_value, settings_markdown)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_system_toml_means_defaults(tmp_path):
    cfg = load_system(tmp_path / "absent.toml")
    assert cfg.routing == "topk:2" and cfg.synthesis == "best" and cfg.fallback == "general"
    assert cfg.host == "127.0.0.1" and cfg.port == 8780
    assert cfg.models_dir.name == "models"


def test_system_toml_values_and_relative_models_dir(tmp_path):
    p = write(tmp_path / "system.toml", '[runtime]\nmodels_dir = "m"\nmax_memory = "400MB"\nkeep_alive = "30s"\n'
                                        'threads = 2\n[moe]\nrouting = "threshold:0.3"\nsynthesis = "voting"\n')
    cfg = load_system(p)
    assert cfg.models_dir == tmp_path / "m"
    assert cfg.max_memory == 400 << 20 and cfg.keep_alive == 30 and cfg.threads == 2
    assert cfg.routing == "threshold:0.3" and cfg.synthesis == "voting"


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = write(tmp_path / "system.toml", "[runtime]\nthreds = 2\n")
    msg = error_of(load_system, p)
    assert f"{p}:2" in msg and "threds" in msg and "did you mean 'threads'" in msg


def test_unknown_section_suggests(tmp_path):
    p = write(tmp_path / "system.toml", "[agnet]\nport = 1\n")
    assert "did you mean [agent]" in error_of(load_system, p)


def test_wrong_type_names_expected_type(tmp_path):
    p = write(tmp_path / "system.toml", '[agent]\nport = "eighty"\n')
    msg = error_of(load_system, p)
    assert ":2: [agent] port" in msg and "expected an integer" in msg


def test_bad_choice_and_ranges(tmp_path):
    assert "pick one of" in error_of(load_system, write(tmp_path / "a.toml", '[moe]\nsynthesis = "magic"\n'))
    assert "keyword_weight" in error_of(load_system, write(tmp_path / "b.toml", "[moe]\nkeyword_weight = 2.0\n"))
    assert "topk" in error_of(load_system, write(tmp_path / "c.toml", '[moe]\nrouting = "topk:zero"\n'))
    assert "max_memory" in error_of(load_system, write(tmp_path / "d.toml", '[runtime]\nmax_memory = "lots"\n'))
    assert "keep_alive" in error_of(load_system, write(tmp_path / "e.toml", '[runtime]\nkeep_alive = "soon"\n'))
    assert "port" in error_of(load_system, write(tmp_path / "f.toml", "[agent]\nport = 70000\n"))


def test_toml_syntax_error_has_line(tmp_path):
    p = write(tmp_path / "system.toml", "[runtime]\nthreads = = 2\n")
    msg = error_of(load_system, p)
    assert str(p) in msg and "line 2" in msg


def test_set_system_value_validates_before_writing(tmp_path):
    p = write(tmp_path / "system.toml", "[runtime]\nthreads = 2\n")
    set_system_value(p, "moe", "routing", "topk:3")
    assert load_system(p).routing == "topk:3" and load_system(p).threads == 2
    before = p.read_text()
    with pytest.raises(ConfigError):
        set_system_value(p, "moe", "routing", "sometimes")
    assert p.read_text() == before


COMMENTED = """\
# hublab on the kitchen Pi -- edited by hand
[runtime]
profile   = "pi4-4gb"     # the 4 GB board
threads = 3               # one core left for the web server

# routing: see the README
[moe]
synthesis = 'voting'      # literal string, kept as written
routing = "topk:2"        # changed by `settings moe routing=...`

[trust]
keys = [
    # the lab's release key
]
"""


def test_set_system_value_keeps_comments_order_and_formatting(tmp_path):
    p = write(tmp_path / "system.toml", COMMENTED)
    set_system_value(p, "moe", "routing", "topk:3")          # settings moe routing=topk:3
    set_system_value(p, "trust", "keys", ["ab" * 32])        # pkg keygen --trust
    set_system_value(p, "agent", "port", 8781)               # a section the file did not have
    text = p.read_text()
    for line in COMMENTED.splitlines():
        if "#" in line:  # every comment, where it was
            assert line.split("#", 1)[1] in text
    assert 'routing = "topk:3"        # changed by `settings moe routing=...`' in text
    assert "profile   = \"pi4-4gb\"     # the 4 GB board" in text and "synthesis = 'voting'" in text
    order = [text.index(k) for k in ("[runtime]", "profile", "threads", "[moe]", "synthesis =", "routing =", "[trust]",
                                     "[agent]")]
    assert order == sorted(order)
    system = load_system(p)
    assert (system.routing, system.synthesis, system.threads, system.port) == ("topk:3", "voting", 3, 8781)
    assert system.trusted_keys == ["ab" * 32]


def test_models_dir_defaults_to_the_user_data_dir_over_the_embedded_set(tmp_path, monkeypatch):
    from hublab.runtime.config import EMBEDDED_MODELS_DIR

    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    system = load_system(tmp_path / "absent.toml")
    assert system.models_dir == tmp_path / "home" / "models" and system.defaults_dir == EMBEDDED_MODELS_DIR
    assert system.model_dirs == [EMBEDDED_MODELS_DIR]  # no user dir yet: the defaults alone, and no error
    assert "python" in scan_models(system.model_dirs).experts
    # the user's own "python" (a package, or a TOML of theirs) shadows the embedded one by name
    mine = write(system.models_dir / "experts" / "python.toml",
                 (EMBEDDED_MODELS_DIR / "experts" / "python.toml").read_text()
                 .replace("../demo/", f"{EMBEDDED_MODELS_DIR}/demo/").replace('max_tokens = 256', 'max_tokens = 7'))
    cat = scan_models(system.model_dirs)
    assert not cat.errors and cat.models["python"].source == mine and cat.models["python"].inference.max_tokens == 7
    assert cat.models["rust"].source.is_relative_to(EMBEDDED_MODELS_DIR)
    # an explicit models_dir is the whole model set
    explicit = load_system(write(tmp_path / "system.toml", f'[runtime]\nmodels_dir = "{tmp_path / "mine"}"\n'))
    assert explicit.defaults_dir is None and explicit.model_dirs == [tmp_path / "mine"]


def test_hublab_home_holds_config_and_caches_too(tmp_path, monkeypatch):
    """$HUBLAB_HOME is one root: system.toml (what `settings` writes), the signing key and caches go in it."""
    from hublab.runtime import config, paths
    from hublab.runtime.routing import embcache
    from hublab.runtime.pkg import signing

    for var in ("HUBLAB_CONFIG", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HUBLAB_HOME", str(tmp_path / "home"))
    home = tmp_path / "home"
    assert config.default_system_path() == home / "system.toml"
    assert signing.default_key_path() == home / "signing.key"
    assert embcache.cache_root() == paths.cache_home() == home / "cache"
    set_system_value(config.default_system_path(), "moe", "synthesis", "voting")
    assert load_system().synthesis == "voting" and (home / "system.toml").is_file()
    monkeypatch.delenv("HUBLAB_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.default_system_path() == tmp_path / "xdg" / "hublab" / "system.toml"


def test_parsers():
    assert parse_routing("topk:2") == ("topk", 2)
    assert parse_routing("threshold:0.25") == ("threshold", 0.25)
    assert parse_routing("single") == ("single", 0) and parse_routing("all") == ("all", 0)
    for bad in ("topk:0", "threshold:2", "best", "single:3"):
        with pytest.raises(ValueError):
            parse_routing(bad)
    assert parse_size("512MB") == 512 << 20 and parse_size("1.5GB") == int(1.5 * (1 << 30)) and parse_size(10) == 10
    assert parse_duration("5m") == 300 and parse_duration(0) == 0 and parse_duration(-1) == -1
    assert parse_duration("250ms") == 0.25


MODEL = '''[model]
name = "python"
type = "expert"

[inference]
max_tokens = 64
temperature = 0.2

[expert]
domain = "python"
keywords = ["python", "pip"]
threshold = 0.2
base = "tiny"
adapter = "python.gguf"
'''


def test_expert_toml_in_the_seed_shape(tmp_path):
    cfg = load_model(write(tmp_path / "python.toml", MODEL))
    assert cfg.is_expert and cfg.base == "tiny" and cfg.adapter == tmp_path / "python.gguf"
    assert cfg.inference.max_tokens == 64 and cfg.inference.temperature == 0.2 and cfg.inference.top_k == 40
    assert cfg.keywords == ["python", "pip"] and cfg.threshold == 0.2


@pytest.mark.parametrize("mutate, expect", [
    (lambda s: s.replace("temperature = 0.2", "temprature = 0.2"), "did you mean 'temperature'"),
    (lambda s: s.replace("temperature = 0.2", "temperature = 9.0"), "out of range"),
    (lambda s: s.replace("max_tokens = 64", "max_tokens = -1"), "out of range"),
    (lambda s: s.replace("max_tokens = 64", 'max_tokens = "many"'), "expected an integer"),
    (lambda s: s.replace('base = "tiny"\n', ""), "an adapter needs a base"),
    (lambda s: s.replace('name = "python"', 'name = "py thon"'), "not a valid name"),
    (lambda s: s.replace('name = "python"\n', ""), "missing key name"),
    (lambda s: s.replace('keywords = ["python", "pip"]', 'keywords = ["python", ""]'), "non-empty string"),
    (lambda s: s.replace("threshold = 0.2", "threshold = 1.5"), "out of range"),
    (lambda s: s.replace("[expert]", "[expertise]"), "did you mean [expert]"),
    (lambda s: s.replace('type = "expert"', 'type = "wizard"'), "pick one of"),
    (lambda s: s + '\n[model2]\n', "unknown section"),
    (lambda s: s.replace("[model]", "[runtime]").replace('type = "expert"\n', ""), "unknown section"),
])
def test_model_toml_errors(tmp_path, mutate, expect):
    p = write(tmp_path / "python.toml", mutate(MODEL))
    msg = error_of(load_model, p)
    assert str(p) in msg and expect in msg


def test_seed_tops_out_at_llama_cpps_32_bits_in_both_files(tmp_path):
    def seeded(seed: int) -> str:
        return MODEL.replace("temperature = 0.2", f"temperature = 0.2\nseed = {seed}")

    assert load_model(write(tmp_path / "ok.toml", seeded(SEED_MAX))).inference.seed == (1 << 32) - 1
    for path, load in ((write(tmp_path / "over.toml", seeded(SEED_MAX + 1)), load_model),
                       (write(tmp_path / "system.toml", f"[inference]\nseed = {SEED_MAX + 1}\n"), load_system)):
        msg = error_of(load, path)
        assert "[inference] seed" in msg and "out of range" in msg and "32-bit" in msg and str(SEED_MAX) in msg


def test_the_sampler_table_makes_the_inference_defaults_and_both_inference_sections(tmp_path):
    assert asdict(Inference()) == {key: spec.default for key, spec in SAMPLER.items()}
    assert MODEL_SCHEMA["inference"] is SAMPLER
    assert set(SYSTEM_SCHEMA["inference"]) == set(SAMPLER) - {"stop", "system_prompt", "min_tokens"}
    # system.toml [inference] holds only what was written there, typed as the table says
    assert load_system(write(tmp_path / "system.toml", "[inference]\ntemperature = 1\n")).inference == \
        {"temperature": 1.0}


def test_the_readme_tables_are_the_settings_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert fill_markers(readme, settings_markdown()) == readme, \
        "README.md's settings tables are stale: run .venv/bin/python -m hublab.runtime.config README.md"


def test_model_needs_a_path_or_a_base(tmp_path):
    p = write(tmp_path / "m.toml", '[model]\nname = "m"\n')
    assert "missing key path" in error_of(load_model, p)


def test_scan_keeps_good_models_and_reports_broken_ones(tmp_path):
    write(tmp_path / "base.toml", '[model]\nname = "tiny"\npath = "tiny.gguf"\n')
    write(tmp_path / "experts" / "python.toml", MODEL)
    write(tmp_path / "experts" / "broken.toml", "[model\nname = 'x'\n")
    write(tmp_path / "experts" / "orphan.toml", MODEL.replace('"python"', '"orphan"').replace('"tiny"', '"tinny"'))
    write(tmp_path / "experts" / "dup.toml", MODEL)
    write(tmp_path / "package.toml", "[package]\nname = 'not a model'\n")
    write(tmp_path / ".hublab" / "staging" / "python.toml", MODEL)  # a package install in progress
    cat = scan_models(tmp_path)
    assert set(cat.models) == {"tiny", "python"}
    assert set(cat.experts) == {"python"}
    joined = "\n".join(cat.errors)
    assert "broken.toml" in joined and "invalid TOML" in joined
    assert "orphan.toml" in joined and "did you mean 'tiny'" in joined
    assert "dup.toml" in joined and "already defined" in joined
    assert len(cat.errors) == 3


def test_scan_of_missing_dir_reports_it(tmp_path):
    cat = scan_models(tmp_path / "nope")
    assert not cat.models and "not found" in cat.errors[0]


def test_embedded_default_set_loads_clean():
    from hublab.runtime.config import EMBEDDED_MODELS_DIR

    cat = scan_models(EMBEDDED_MODELS_DIR)
    assert not cat.errors
    assert {"python", "rust", "system", "ai", "general"} <= set(cat.experts)
    assert all(cat.models[e].base == "gemma3-270m" for e in ("python", "rust", "system", "ai", "general"))
