"""The WebUI in a real browser (Debian's chromium through chromium-driver, driven by selenium), as a new user
meets it: a fresh start lists the shell's models in Chat and Evaluate; upload a tiny dataset, train the tiny
Llama and watch the loss plot and the Runs table grow, export the adapter (and the base as a GGUF), install
the adapter as an expert in one click, chat with it (Enter sends, an "answering" state, a failed send keeps
the text) and find it in Evaluate. Every tab is checked for sideways scrolling at 1280 px and at a 390 px
phone width, with a screenshot of each (paths printed)."""
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
VIEWS = ("datasets", "train", "runs", "export", "evaluate", "chat")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(what, timeout: float = 120, every: float = 0.3):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.time() + timeout
    while time.time() < end:
        try:
            value = what()
        except StaleElementReferenceException:  # the page redrew what was found (a progress event): look again
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _phone(browser, on: bool) -> None:
    """A 390 px wide phone screen (device metrics, as DevTools' device mode sets them), or the desktop back."""
    if on:
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    else:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_first_hour_in_the_browser(browser, webui, tmp_path_factory):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    client, _, ws = webui
    shots = tmp_path_factory.mktemp("screenshots")
    paths = []

    def shot(name):
        path = shots / f"{name}.png"
        browser.save_screenshot(str(path))
        paths.append(path)

    find = browser.find_element
    js = browser.execute_script

    def tab(view):
        find(By.CSS_SELECTOR, f"nav button[data-view={view}]").click()
        _wait(lambda: find(By.ID, f"view-{view}").is_displayed())

    browser.get(client.url + "/")
    _wait(lambda: find(By.ID, "train-fields").find_elements(By.TAG_NAME, "input"))

    # A fresh start: Chat and Evaluate list the shell's models (the embedded set), a base marked as one;
    # Train offers the embedded base; Export says what goes in its source instead of an error
    chat_models = _wait(lambda: Select(find(By.ID, "chat-model")).options)
    labels = {o.get_attribute("value"): o.get_attribute("textContent") for o in chat_models}
    assert {"python", "rust", "general"} <= set(labels) and labels["gemma3-270m"] == "gemma3-270m (base model)"
    assert "python" in [o.get_attribute("value") for o in Select(find(By.ID, "bench-expert")).options]
    assert find(By.ID, "f-train-base").get_attribute("value") == "gemma3-270m"
    bases = find(By.ID, "train-bases").find_elements(By.TAG_NAME, "option")
    assert "models/tiny" in [o.get_attribute("value") for o in bases]
    tab("export")
    msg = _wait(lambda: find(By.ID, "exp-msg").text and find(By.ID, "exp-msg"))
    assert "msg hint" == msg.get_attribute("class") and "choose a source" in msg.text
    tab("datasets")

    # Datasets: a bad file is refused with its row, a good one is saved and inspected with the template
    # training on the Train tab's base (Gemma) will use
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
    assert "gemma3-270m renders them (gemma template)" in find(By.ID, "inspect-template-used").text
    assert find(By.CSS_SELECTOR, "#inspect-out pre.preview").text.startswith("<bos><start_of_turn>user")

    # Train: fill the form, see the TOML and command, start
    tab("train")
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
    find(By.ID, "train-start").click()

    # Runs: the loss plot and the Runs table's row grow as steps are pushed over SSE
    _wait(lambda: find(By.ID, "view-runs").is_displayed() and not find(By.ID, "run-card").get_attribute("hidden"))
    canvas = find(By.ID, "loss-plot")
    counts, cells = set(), set()

    def seen():
        counts.add(int(canvas.get_attribute("data-points")))
        cells.update(c.text for c in find(By.ID, "runs-table").find_elements(By.CSS_SELECTOR, "tbody td.step"))
        return find(By.ID, "run-status").text == "done"

    _wait(seen, timeout=180)
    counts.add(int(canvas.get_attribute("data-points")))
    assert max(counts) == 40 and len(counts) >= 2, counts  # seen part-way, then complete
    assert "step 40/40" in find(By.ID, "run-step").text
    _wait(lambda: find(By.CSS_SELECTOR, "#runs-table td.step").text == "40/40", 10)
    assert len(cells - {"0/?", "40/40"}) >= 1, cells  # the table moved with the run, not only at its end

    # Export: the tiny base as a GGUF (what the runtime runs), then the adapter, then download it
    tab("export")
    _wait(lambda: find(By.ID, "exp-source").get_attribute("value") == "runs/browser/out/adapter")  # offered

    def export(kind, source, out, outtype):
        Select(find(By.ID, "exp-kind")).select_by_value(kind)
        src = find(By.ID, "exp-source")
        src.clear()
        src.send_keys(source)
        box = find(By.ID, "exp-out")
        box.clear()
        box.send_keys(out, Keys.TAB)  # leaving the field shows the new plan, as for a user
        Select(find(By.ID, "exp-outtype")).select_by_visible_text(outtype)
        _wait(lambda: f"export {kind}" in find(By.ID, "exp-plan").text and out in find(By.ID, "exp-plan").text)
        find(By.ID, "exp-start").click()
        _wait(lambda: find(By.ID, "exp-job-title").text and find(By.ID, "exp-status").text == "done", timeout=120)

    export("gguf", "models/tiny", "tiny.gguf", "f32")
    export("adapter", "runs/browser/out/adapter", "browser.gguf", "q8_0")
    link = _wait(lambda: [a for a in find(By.ID, "exp-files").find_elements(By.TAG_NAME, "a")
                          if a.text == "exports/browser.gguf"])
    link[0].click()
    got = _wait(lambda: (browser.downloads / "browser.gguf").exists() and (browser.downloads / "browser.gguf"), 30)
    _wait(lambda: got.stat().st_size == (ws / "exports" / "browser.gguf").stat().st_size, 30)
    assert got.read_bytes()[:4] == b"GGUF"

    # Install as expert: offered when the adapter export ends, filled in from the run; one click
    _wait(lambda: find(By.ID, "install-card").is_displayed() and "base = " in find(By.ID, "inst-toml").text, 30)
    assert find(By.ID, "inst-name").get_attribute("value") == "browser"
    assert Select(find(By.ID, "inst-base")).first_selected_option.get_attribute("value") == "exports/tiny.gguf"
    assert "Tell me fact 0." in find(By.ID, "inst-examples").get_attribute("value")
    find(By.ID, "inst-btn").click()
    _wait(lambda: "installed browser" in find(By.ID, "inst-msg").text, 30)
    assert "browser" in [o.get_attribute("value") for o in Select(find(By.ID, "bench-expert")).options]
    find(By.ID, "inst-chat").click()

    # Chat: Enter sends, an "answering" state shows, the answer comes from the new expert
    _wait(lambda: find(By.ID, "view-chat").is_displayed())
    assert Select(find(By.ID, "chat-model")).first_selected_option.get_attribute("value") == "browser"
    js("const m = document.getElementById('chat-msg'); window.seenMsgs = [];"
       "new MutationObserver(() => seenMsgs.push(m.textContent))"
       ".observe(m, {childList: true, characterData: true, subtree: true});")
    box = find(By.ID, "chat-input")
    box.send_keys("Tell me fact 1.", Keys.ENTER)
    _wait(lambda: "tokens" in find(By.ID, "chat-msg").text, 60)
    assert any("answering" in m for m in js("return seenMsgs")), js("return seenMsgs")
    log = find(By.ID, "chat-log").find_elements(By.TAG_NAME, "div")
    assert [d.get_attribute("class") for d in log] == ["user", "assistant"] and log[0].text == "Tell me fact 1."
    assert box.get_attribute("value") == ""
    # a failed send keeps what was typed and says why
    js("const o = document.createElement('option'); o.value = o.text = 'nope';"
       "document.getElementById('chat-model').append(o); document.getElementById('chat-model').value = 'nope';")
    box.send_keys("keep this question")
    find(By.ID, "chat-send").click()
    _wait(lambda: "no model or expert named 'nope'" in find(By.ID, "chat-msg").text, 30)
    assert box.get_attribute("value") == "keep this question"
    assert "err" in find(By.ID, "chat-msg").get_attribute("class")
    assert len(find(By.ID, "chat-log").find_elements(By.TAG_NAME, "div")) == 2
    Select(find(By.ID, "chat-model")).select_by_value("browser")

    # Every tab at desktop and phone width: nothing scrolls sideways, every tab button is on screen
    widths = {}
    for size, phone in (("1280", False), ("390", True)):
        _phone(browser, phone)
        assert js("return innerWidth") == int(size)
        for view in VIEWS:
            tab(view)
            if view == "export":
                js("document.getElementById('install-card').scrollIntoView()")
            scroll, inner, right = js("return [document.documentElement.scrollWidth, innerWidth, Math.max(...["
                                      "...document.querySelectorAll('nav button')]"
                                      ".map((b) => b.getBoundingClientRect().right))]")
            widths[f"{view}-{size}"] = scroll
            assert scroll <= inner and right <= inner, (view, size, scroll, inner, right)
            shot(f"{view}-{size}")
        if phone:  # the loss plot is drawn at the width it is shown, so its 12 px labels stay 12 px
            tab("runs")
            css, drawn = js("const c = document.getElementById('loss-plot'); return [c.clientWidth, c.width]")
            assert css <= 390 and drawn == 2 * css, (css, drawn)
            shot("runs-390-plot")
    _phone(browser, False)
    for p in paths:
        print(f"screenshot: {p}")
    print("scrollWidth per tab:", widths)
    assert all(Path(p).stat().st_size > 1000 for p in paths)
