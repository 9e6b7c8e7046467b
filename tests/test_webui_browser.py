"""The WebUI in a real browser (Debian's chromium through chromium-driver, driven by selenium): upload a
tiny dataset, start a tiny training on the tiny Llama, watch the loss plot grow, export the adapter GGUF and
download it. A screenshot per view (and one at phone width) is saved and its path printed."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from trainer_tiny import QA, tiny_hf  # noqa: F401
from test_webui_support import webui  # noqa: F401

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromium-driver (apt)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(what, timeout: float = 120, every: float = 0.3):
    end = time.time() + timeout
    while time.time() < end:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_upload_train_watch_export_download(browser, webui, tmp_path_factory):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    client, _, ws = webui
    shots = tmp_path_factory.mktemp("screenshots")
    paths = []

    def shot(name):
        path = shots / f"{name}.png"
        browser.save_screenshot(str(path))
        paths.append(path)

    find = browser.find_element
    browser.get(client.url + "/")
    _wait(lambda: find(By.ID, "train-fields").find_elements(By.TAG_NAME, "input"))

    # Datasets: a bad file is refused with its row, a good one is saved and inspected
    bad = tmp_path_factory.mktemp("up") / "bad.jsonl"
    bad.write_text('{"question": "q", "response": "a"}\n{"question": "q2"}\n')
    find(By.ID, "upload-file").send_keys(str(bad))
    find(By.ID, "upload-btn").click()
    _wait(lambda: "row 2: missing column 'response'" in find(By.ID, "upload-msg").text)
    good = bad.with_name("facts.jsonl")
    good.write_text("".join(f'{{"question": "{q["question"]}", "response": "{q["response"]}"}}\n' for q in QA[:16]))
    find(By.ID, "upload-file").send_keys(str(good))
    find(By.ID, "upload-btn").click()
    _wait(lambda: "saved datasets/facts.jsonl: 16 records" in find(By.ID, "upload-msg").text)
    assert not (ws / "datasets" / "bad.jsonl").exists()
    row = _wait(lambda: [r for r in find(By.ID, "dataset-table").find_elements(By.CSS_SELECTOR, "tbody tr")
                         if "facts.jsonl" in r.text])
    row[0].find_element(By.CLASS_NAME, "inspect").click()
    _wait(lambda: "16 records" in find(By.ID, "inspect-out").text)
    assert find(By.ID, "inspect-hist").find_elements(By.TAG_NAME, "div")
    shot("datasets")

    # Train: fill the form, see the TOML and command, start
    find(By.CSS_SELECTOR, "nav button[data-view=train]").click()
    name = find(By.ID, "run-name")
    name.clear()
    name.send_keys("browser")
    for key, value in (("base", "models/tiny"), ("max_steps", "40"), ("batch_size", "4"), ("max_seq_len", "64"),
                       ("lr", "0.05"), ("warmup_steps", "1"), ("eval_every", "10"), ("save_every", "20"),
                       ("eval_fraction", "0.2"), ("patience", "0"), ("threads", "1")):
        box = find(By.ID, f"f-train-{key}")
        box.clear()
        box.send_keys(value)
    Select(find(By.ID, "f-train-template")).select_by_visible_text("plain")
    r = find(By.ID, "f-lora-r")
    r.clear()
    r.send_keys("4")
    label = _wait(lambda: [lab for lab in find(By.ID, "train-data").find_elements(By.TAG_NAME, "label")
                           if "facts.jsonl" in lab.text])
    label[0].find_element(By.TAG_NAME, "input").click()
    _wait(lambda: 'path = "' in find(By.ID, "train-toml").text and "max_steps = 40" in find(By.ID, "train-toml").text
          and "facts.jsonl" in find(By.ID, "train-toml").text)
    assert "train expert" in find(By.ID, "train-command").text
    shot("train")
    find(By.ID, "train-start").click()

    # Runs: the loss plot grows as steps are pushed over SSE
    _wait(lambda: find(By.ID, "view-runs").is_displayed() and not find(By.ID, "run-card").get_attribute("hidden"))
    canvas = find(By.ID, "loss-plot")
    counts = set()
    _wait(lambda: counts.add(int(canvas.get_attribute("data-points"))) or find(By.ID, "run-status").text == "done",
          timeout=180)
    counts.add(int(canvas.get_attribute("data-points")))
    assert max(counts) == 40 and len(counts) >= 2, counts  # seen part-way, then complete
    assert "step 40/40" in find(By.ID, "run-step").text
    shot("runs")
    browser.set_window_size(390, 900)  # phone width
    shot("runs-phone")
    browser.set_window_size(1200, 1000)

    # Export: adapter GGUF, then download it
    find(By.CSS_SELECTOR, "nav button[data-view=export]").click()
    src = find(By.ID, "exp-source")
    src.clear()
    src.send_keys("runs/browser/out/adapter")
    out = find(By.ID, "exp-out")
    out.clear()
    out.send_keys("browser.gguf")
    _wait(lambda: "export adapter" in find(By.ID, "exp-plan").text and "browser.gguf" in find(By.ID, "exp-plan").text)
    find(By.ID, "exp-start").click()
    _wait(lambda: find(By.ID, "exp-status").text == "done", timeout=120)
    link = _wait(lambda: [a for a in find(By.ID, "exp-files").find_elements(By.TAG_NAME, "a")
                          if a.text == "exports/browser.gguf"])
    shot("export")
    link[0].click()
    got = _wait(lambda: (browser.downloads / "browser.gguf").exists() and (browser.downloads / "browser.gguf"), 30)
    _wait(lambda: got.stat().st_size == (ws / "exports" / "browser.gguf").stat().st_size, 30)
    assert got.read_bytes()[:4] == b"GGUF"

    for view in ("evaluate", "chat"):
        find(By.CSS_SELECTOR, f"nav button[data-view={view}]").click()
        shot(view)
    for p in paths:
        print(f"screenshot: {p}")
    assert all(Path(p).stat().st_size > 1000 for p in paths)
