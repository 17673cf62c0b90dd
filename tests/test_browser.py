"""The page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium,
against the real app (`python app.py`) on 127.0.0.1 with the tiny model.

A person types, sends with Enter, waits for both answers, votes with a key, and sees the panel count the vote;
then a version is published (as the trainer would) and the chat announces it, and the timeline shows its answers
beside the base's. A screenshot of each step is kept under pytest's temporary folder (the path is printed).

Installed by `.ci/run` where missing; outside CI a machine without Chromium skips these tests with the reason.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from app_process import RunningApp, vote_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        pytest.fail("CI must install chromium and chromium-driver (see .ci/run)", pytrace=False)
    pytest.skip("needs chromium and chromium-driver: apt-get install chromium chromium-driver",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 60
VOTE_IDS = ("vote-a", "vote-b", "vote-tie", "vote-both_bad", "regenerate")  # (submit-better: in a closed accordion)

# Records, at every change of the A button's `disabled` attribute, what both answer boxes held: the test then
# checks the buttons never became clickable before the answers were complete, however fast they streamed.
WATCH_VOTE_BUTTON = """
window.__voteStates = [];
const button = document.getElementById('vote-a');
const answer = (id) => document.querySelector('#' + id + ' textarea').value;
new MutationObserver(() => window.__voteStates.push(
    {disabled: button.disabled, a: answer('answer-a'), b: answer('answer-b')}
)).observe(button, {attributes: true, attributeFilter: ['disabled']});
"""


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    running = RunningApp(tiny_model_dir, tmp_path_factory.mktemp("browser"), extra_args=("--no-train",))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """pytest's temporary folder, or RLHF_BROWSER_SHOTS to keep them (pytest keeps only its last 3 runs' folders)."""
    keep = os.environ.get("RLHF_BROWSER_SHOTS")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("browser-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {folder}")
    return folder


def make_browser(width: int, height: int) -> webdriver.Chrome:
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = make_browser(1400, 1000)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, message: str, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message)


def disabled(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).get_attribute("disabled") is not None


def answers(driver) -> tuple[str, str]:
    return tuple(driver.find_element(By.CSS_SELECTOR, f"#{box} textarea").get_attribute("value")
                 for box in ("answer-a", "answer-b"))


def text_of(driver, element_id: str) -> str:
    """The element's visible text, whitespace collapsed (code spans come back on lines of their own)."""
    return " ".join(driver.find_element(By.ID, element_id).text.split())


def token_of(db: Path, pair_id: int) -> str:
    """The unguessable token /chat handed out for a pair row (what `vote_rows` looks votes up by)."""
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT token FROM pairs WHERE id = ?", (pair_id,)).fetchone()[0]
    finally:
        conn.close()


def latest_pair(db: Path) -> tuple[int, str, str]:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, answer_a, answer_b FROM pairs ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        conn.close()


def error_badges(driver) -> list[str]:
    """The "Error" labels Gradio shows over output boxes after a failed event, where visible."""
    return [b.text for b in driver.find_elements(By.CSS_SELECTOR, "span.error") if b.is_displayed()]


def as_a_textarea_shows(text: str) -> str:
    """A textarea's value has its line breaks normalised to LF (HTML spec), so a stored CR (the tiny random model
    writes any byte) reads back as LF: compare what the person sees with the stored answer the same way."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def shown(answer_a: str, answer_b: str) -> tuple[str, str]:
    return as_a_textarea_shows(answer_a), as_a_textarea_shows(answer_b)


def assert_enabled_only_when_complete(driver, answer_a: str, answer_b: str) -> list[dict]:
    """Each moment the vote buttons turned clickable, both boxes already held the complete, stored answers."""
    states = driver.execute_script("return window.__voteStates")
    assert states, "the vote buttons never changed state"
    for state in states:
        if not state["disabled"]:
            assert (state["a"], state["b"]) == shown(answer_a, answer_b)
    return states


def open_page(driver, app) -> None:
    driver.get(app.url)
    wait_for(driver, lambda d: "Serving" in text_of(d, "status-line"), "the status line never filled in")


def test_chat_vote_and_panel_in_a_real_browser(app, browser, shots):
    open_page(browser, app)
    browser.save_screenshot(str(shots / "01-first-visit.png"))
    assert "Serving the base model" in text_of(browser, "status-line")  # the panel is open on a wide screen
    assert all(disabled(browser, button) for button in VOTE_IDS), "nothing to vote on yet"
    opacity = float(browser.execute_script(
        "return getComputedStyle(document.getElementById('vote-a')).opacity"))
    assert opacity < 0.6, f"a disabled vote button must look disabled (opacity {opacity})"

    browser.execute_script(WATCH_VOTE_BUTTON)
    message = browser.find_element(By.CSS_SELECTOR, "#message textarea")
    message.send_keys("Why is the sky blue?")
    message.send_keys(Keys.ENTER)  # Enter sends
    wait_for(browser, lambda d: not disabled(d, "vote-a"), "the vote buttons never became clickable")
    browser.save_screenshot(str(shots / "02-answers-complete.png"))

    first_pair, answer_a, answer_b = latest_pair(app.db)
    assert answers(browser) == shown(answer_a, answer_b)
    assert_enabled_only_when_complete(browser, answer_a, answer_b)
    assert not any(disabled(browser, button) for button in VOTE_IDS)
    assert "Why is the sky blue?" in text_of(browser, "chatbot")
    assert message.get_attribute("value") == ""

    browser.execute_script(WATCH_VOTE_BUTTON)
    browser.find_element(By.ID, "regenerate").click()  # a fresh pair: the buttons go off, then on again
    wait_for(browser, lambda d: latest_pair(app.db)[0] > first_pair and not disabled(d, "vote-a"),
             "regenerating never gave a new pair to vote on")
    pair_id, answer_a, answer_b = latest_pair(app.db)
    states = assert_enabled_only_when_complete(browser, answer_a, answer_b)
    assert states[0]["disabled"] is True, "regenerating must first disable the vote buttons"

    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE, "2")  # keys 1-4 vote, outside text boxes
    wait_for(browser, lambda d: "saved" in text_of(d, "chat-status"), "the vote was not acknowledged")
    votes = vote_rows(app.db, token_of(app.db, pair_id))
    assert votes == [(votes[0][0], "b", None)]
    assert all(disabled(browser, button) for button in VOTE_IDS), "a voted pair cannot be voted again"
    assert not disabled(browser, "new-conversation") and not disabled(browser, "send")
    assert "`base`" in browser.find_element(By.ID, "chat-status").get_attribute("innerHTML") or \
        "base" in text_of(browser, "chat-status")  # which version wrote each side is revealed
    browser.find_element(By.TAG_NAME, "body").send_keys("1")  # a second key press changes nothing
    time.sleep(1)
    assert [row[1] for row in vote_rows(app.db, token_of(app.db, pair_id))] == ["b"]
    wait_for(browser, lambda d: "B better: 1" in d.find_element(By.CSS_SELECTOR, ".sidebar").text,
             "the training panel did not count the vote")
    browser.save_screenshot(str(shots / "03-voted-panel-updated.png"))


def test_an_empty_send_is_a_notice_and_the_page_stays_usable(app, browser, shots):
    """Before: Gradio stamped "Error" over the message box, both answers and the status line, and Send stayed
    disabled (the step that gives the buttons back did not run after the error)."""
    open_page(browser, app)
    browser.find_element(By.ID, "send").click()  # nothing typed
    wait_for(browser, lambda d: "Type a message first" in d.find_element(By.TAG_NAME, "body").text,
             "no notice said what to do")
    wait_for(browser, lambda d: not disabled(d, "send"), "Send stayed disabled after an empty message")
    browser.save_screenshot(str(shots / "03b-empty-message-notice.png"))
    assert not error_badges(browser), f"'Error' stamped over the page: {error_badges(browser)}"
    message = browser.find_element(By.CSS_SELECTOR, "#message textarea")
    message.send_keys("Are you still there?")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: not disabled(d, "vote-a"), "a message after the notice got no answers")
    assert answers(browser) == shown(*latest_pair(app.db)[1:])


def test_a_huge_paste_is_cut_with_a_notice_not_refused(app, browser, shots):
    """A 300 KB paste used to go out whole, the server refused the request (over --max-request-kb) and the page
    showed "Error" over every box. The box now keeps what fits in a request; the server cuts that to
    --max-message-chars and says so."""
    open_page(browser, app)
    message = browser.find_element(By.CSS_SELECTOR, "#message textarea")
    message.click()
    browser.execute_cdp_cmd("Input.insertText", {"text": "word " * 60_000})  # what a paste does, maxlength and all
    kept = len(message.get_attribute("value"))
    assert 4000 < kept < 300_000, f"the box kept {kept} characters"
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: not disabled(d, "vote-a"), "the long message got no answers")
    assert "cut to its first 4000 characters" in text_of(browser, "chat-status")
    assert not error_badges(browser), f"'Error' stamped over the page: {error_badges(browser)}"
    browser.save_screenshot(str(shots / "03c-huge-paste-cut.png"))


def publish_version(app, tiny_model_dir) -> str:
    """Publish a version as the trainer does (random nonzero LoRA weights) and record its timeline answers."""
    from rlhf_online.adapters import AdapterRegistry, save_peft_adapter
    from rlhf_online.config import load_config
    from rlhf_online.models import POLICY_ADAPTER, attach_lora, load_base_model, load_tokenizer
    from rlhf_online.store import PreferenceStore
    from rlhf_online.timeline import record_published

    cfg = load_config(["--model", str(tiny_model_dir)], environ={})
    peft = attach_lora(load_base_model(str(tiny_model_dir), "nf4", for_training=True).model, cfg.model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if f".{POLICY_ADAPTER}." in name and "lora_B" in name:
                parameter.normal_(0, 0.5)  # a fresh LoRA is the identity; this one changes the answers
    registry = AdapterRegistry(app.adapters_dir)
    info = registry.publish(lambda folder: save_peft_adapter(peft, POLICY_ADAPTER, folder),
                            {"parent": "base", "ppo_iteration": 2, "votes_seen": 1, "time": time.time()})
    store = PreferenceStore(app.db)
    try:
        assert record_published(store, cfg, info.name, 1, peft, load_tokenizer(str(tiny_model_dir)))
    finally:
        store.close()
    return info.name


def test_new_version_is_announced_and_shown_in_the_timeline(app, browser, shots, tiny_model_dir):
    open_page(browser, app)
    message = browser.find_element(By.CSS_SELECTOR, "#message textarea")
    message.send_keys("Hello!", Keys.ENTER)
    wait_for(browser, lambda d: not disabled(d, "vote-a"), "the answers never completed")

    version = publish_version(app, tiny_model_dir)
    wait_for(browser, lambda d: f"{version} is now answering" in text_of(d, "chatbot"),
             "the chat did not announce the new version")
    wait_for(browser, lambda d: f"Serving {version}" in text_of(d, "status-line"),
             "the status line did not follow the new version")
    browser.save_screenshot(str(shots / "04-new-version-notice.png"))

    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Learning timeline')]").click()
    wait_for(browser, lambda d: "Why is the sky blue?" in text_of(d, "timeline"), "the timeline stayed empty")
    timeline = text_of(browser, "timeline")
    assert version in timeline and "base model" in timeline
    assert timeline.index(version) < timeline.index("base model")  # newest first, the base last
    browser.save_screenshot(str(shots / "05-learning-timeline.png"))

    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'How it works')]").click()
    wait_for(browser, lambda d: "votes so far" in d.find_element(By.TAG_NAME, "body").text,
             "the How it works tab has no live numbers")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Reward model" in body and "PPO" in body and "Reward hacking" in body
    browser.save_screenshot(str(shots / "06-how-it-works.png"))


def test_panel_starts_closed_on_a_narrow_screen(app, shots):
    driver = make_browser(700, 1000)
    try:
        driver.get(app.url)
        wait_for(driver, lambda d: d.find_elements(By.ID, "message"), "the page did not load")
        time.sleep(2)  # the load event decides the panel's state
        driver.save_screenshot(str(shots / "07-narrow-screen.png"))
        status = driver.find_element(By.ID, "status-line")
        assert not status.is_displayed(), "on a narrow screen the panel must not cover the chat"
        assert driver.find_element(By.CSS_SELECTOR, "#message textarea").is_displayed()
    finally:
        driver.quit()


PLOT_MARKS = """const plot = document.getElementById(arguments[0]);
if (!plot) return {points: 0, lines: 0};  // not rendered yet
const drawn = (mark) => Array.from(plot.querySelectorAll('g.' + mark + '.plot_marks path'));  // not hover_marks
return {points: drawn('mark-symbol').length,
        lines: drawn('mark-line').filter(p => (p.getAttribute('d') || '').includes('L')).length};  // a segment"""


def test_a_curve_shows_from_its_first_point(shots):
    """The panel's curves (ui_learning.curve_plot) after the first PPO iteration: Gradio's own line plot draws one
    point as nothing (its points appear only on hover); ours draws the point, then a line once there are two."""
    import gradio as gr
    import pandas as pd

    from rlhf_online.ui_learning import curve_plot

    first, both = pd.DataFrame({"iteration": [1], "kl": [0.4]}), pd.DataFrame({"iteration": [1, 2], "kl": [0.4, 0.9]})
    with gr.Blocks() as page:
        gr.LinePlot(value=first, x="iteration", y="kl", elem_id="gradio-line")
        curve_plot(value=first, x="iteration", y="kl", elem_id="curve")
        grown = curve_plot(value=first, x="iteration", y="kl", elem_id="grown")
        gr.Button("next iteration", elem_id="next").click(lambda: both, None, grown)
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    driver = make_browser(900, 900)
    try:
        driver.get(page.local_url)
        marks = lambda d, plot: d.execute_script(PLOT_MARKS, plot)  # noqa: E731
        wait_for(driver, lambda d: marks(d, "curve")["points"] == 1, "a one-point curve shows no point")
        assert marks(driver, "grown")["points"] == 1
        assert marks(driver, "gradio-line") == {"points": 0, "lines": 0}  # what the panel showed before
        driver.save_screenshot(str(shots / "08-curve-first-point.png"))
        driver.find_element(By.ID, "next").click()
        wait_for(driver, lambda d: marks(d, "grown")["lines"] == 1, "the second point did not make a line")
    finally:
        driver.quit()
        page.close()
