"""Board profiles: every shipped profile loads, detection from the device tree and memory, overrides."""
import subprocess
import sys
from pathlib import Path

import pytest

from hublab.runtime.config import ConfigError
from hublab.runtime.engine.profiles import active_profile, board_profiles, detect_board, host_profile, load_profile_file

BOARDS = {"pi-zero-2w", "pi3b", "pi4-1gb", "pi4-2gb", "pi4-4gb", "pi4-8gb", "pi5-2gb", "pi5-4gb", "pi5-8gb",
          "pi5-16gb"}


def test_every_board_has_a_valid_profile():
    profiles = board_profiles()
    assert BOARDS <= set(profiles)
    for p in profiles.values():
        assert 0 < p.model_budget < p.ram and 0 < p.max_model_size <= p.model_budget
        assert p.threads >= 1 and p.default_context >= 256 and p.preferred_quants
    assert profiles["pi-zero-2w"].ram == 512 << 20
    assert profiles["pi5-8gb"].dotprod and not profiles["pi4-8gb"].dotprod


@pytest.mark.parametrize("model, mem_kib, expect", [
    ("Raspberry Pi Zero 2 W Rev 1.0", 427_000, "pi-zero-2w"),
    ("Raspberry Pi 3 Model B Plus Rev 1.3", 948_000, "pi3b"),
    ("Raspberry Pi 4 Model B Rev 1.1", 948_000, "pi4-1gb"),
    ("Raspberry Pi 4 Model B Rev 1.4", 3_884_000, "pi4-4gb"),
    ("Raspberry Pi 4 Model B Rev 1.4", 7_998_000, "pi4-8gb"),
    ("Raspberry Pi 5 Model B Rev 1.0", 8_245_000, "pi5-8gb"),
    ("Raspberry Pi 5 Model B Rev 1.0", 16_350_000, "pi5-16gb"),
    ("Raspberry Pi 5 Model B Rev 1.0", 4_045_000, "pi5-4gb"),
])
def test_detection_from_device_tree_and_meminfo(model, mem_kib, expect):
    assert detect_board(board_profiles(), model, mem_kib * 1024).name == expect


def test_not_a_pi_gives_none_and_host_profile_is_computed():
    assert detect_board(board_profiles(), "QEMU Virtual Machine", 8 << 30) is None
    host = host_profile()
    assert host.name == "host" and host.model_budget > 0 and host.cores >= 1


def test_named_profile_and_unknown_name():
    assert active_profile("pi4-4gb").name == "pi4-4gb"
    assert active_profile("host").name == "host"
    with pytest.raises(ConfigError, match="did you mean 'pi4-4gb'"):
        active_profile("pi4-4g")


def test_profile_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\nname = "bad"\nram = "lots"\n')
    with pytest.raises(ConfigError, match="ram"):
        load_profile_file(bad)
    bad.write_text('[profile]\nname = "bad"\nrams = "1GB"\n')
    with pytest.raises(ConfigError, match="did you mean 'ram'"):
        load_profile_file(bad)


def test_profile_command_shows_the_active_one_and_honours_overrides(tmp_path):
    hublab = str(Path(sys.executable).parent / "hublab")
    env_cfg = tmp_path / "system.toml"
    env_cfg.write_text('[runtime]\nprofile = "pi3b"\n')
    out = subprocess.run([hublab, "--config", str(env_cfg), "profile"], capture_output=True, text=True, check=True)
    assert "pi3b" in out.stdout
    out = subprocess.run([hublab, "--config", str(env_cfg), "--profile", "pi5-8gb", "profile", "--json"],
                         capture_output=True, text=True, check=True)
    assert '"name": "pi5-8gb"' in out.stdout
    bad = subprocess.run([hublab, "--profile", "pi9", "profile"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "unknown profile" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_micro_batch_per_board(tmp_path, tiny_models_dir):
    """A 512 MB board reads prompts 64 tokens at a time: llama.cpp's compute buffer (rows of logits over the
    vocabulary) is sized for that; the others 128-256. The runtime loads with it and says what was reserved."""
    from hublab.runtime.serve.device import Device
    from hublab.runtime.engine.runtime import Runtime

    boards = board_profiles()
    assert boards["pi-zero-2w"].ubatch == 64 and boards["pi3b"].ubatch == 128 and boards["pi5-8gb"].ubatch == 256
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\nname = "bad"\nram = "1GB"\nmodel_budget = "500MB"\nmax_model_size = "1GB"\n'
                   "ubatch = 2\n")
    with pytest.raises(ConfigError, match=r"bad.toml: \[profile\] ubatch: 2 is out of range; give 8 to 4096"):
        load_profile_file(bad)
    sizes = {}
    for name in ("pi-zero-2w", "pi5-8gb"):
        with Runtime(models_dir=tiny_models_dir, profile=name, threads=1) as rt:
            base = rt.load("tiny")
            assert base.llama.context_params.n_ubatch == min(boards[name].ubatch, base.n_ctx)
            info = Device(rt).info()
            assert info["ubatch"] == boards[name].ubatch and info["compute_reserved"]["tiny"] > 0
            sizes[name] = base.compute_reserved
    assert sizes["pi-zero-2w"] < sizes["pi5-8gb"]
