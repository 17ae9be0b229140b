"""The live dashboard (observe/dashboard.py) in a real headless browser: Debian's Chromium driven by selenium
through Debian's chromedriver (`make browser` installs both; `make test` runs it first), against the
dashboard server of a run directory written here by hand in the trainer's formats (metrics.jsonl,
alerts.jsonl, goodput.json, config.yaml). The page loads, shows the run's latest step, the charts, the
per-layer heat map (a NaN layer in black) and the anomaly list, and follows rows appended while it is open,
without a reload."""

from __future__ import annotations

import json
import time
import os
import tempfile

import pytest

from picotron_jax.observe.dashboard import serve

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # a clear failure below, not a collection error
    webdriver = None

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# the closed network of these machines: nothing of Chromium's own reaches out (updates, sync, QUIC probes)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1600"]
LAYERS = 3
POLL_S = 2  # the page's setInterval


def train_row(step: int, loss: float) -> dict:
    """A training row as observe/metrics.py writes it (the fields the page reads, and a few it does not)."""
    row = {"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5 + 0.01 * step,
           "tokens_per_s": 1000.0 + step, "mfu": 0.125, "goodput": 0.875, "memory_bytes": 3 * 2**30,
           "step_time_s": 0.1, "tokens": 128 * step}
    if step % 4 == 0:  # monitor.layer_every = 4: the per-layer norms on every 4th step
        row["layer_grad_norm"] = [0.1 * (layer + 1) for layer in range(LAYERS)]
    if step == 8:  # a non-finite gradient, kept as NaN by metrics.jsonl (null for the page)
        row["grad_norm"], row["layer_grad_norm"][0] = float("nan"), float("nan")
    return row


def alert_row(step: int, kind: str) -> dict:
    return {"step": step, "kind": kind, "detail": f"a {kind} made by hand", "where": "", "threshold": "8 MADs",
            "action": "alert", "process": 0, "time": 1.0e9}


def append(path, rows) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture()
def run_dir(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  num_layers: 3\nmonitor:\n  layer_every: 4\n", encoding="utf-8")
    append(tmp_path / "metrics.jsonl", [train_row(s, 5.0 - 0.1 * s) for s in range(2, 12, 2)]  # steps 2..10
           + [{"kind": "eval", "step": 10, "eval_loss": 4.25}])
    append(tmp_path / "alerts.jsonl", [alert_row(6, "spike")])
    (tmp_path / "goodput.json").write_text(json.dumps(
        {"ledger": {"init": 1.0, "compile": 2.0, "device": 6.0, "wasted": 0.5}, "goodput": 0.6,
         "owned": {}}), encoding="utf-8")
    return tmp_path


@pytest.fixture()
def browser():
    if webdriver is None:
        pytest.fail("selenium is not installed: `make install` (pip install -e '.[dev]') installs it")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `make browser` installs Debian's chromium and "
                    f"chromium-driver (`make test` runs it first)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # the driver's path given: selenium-manager downloads nothing
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def wait_for_status(driver, expected: str, timeout: float) -> None:
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: text_of(d, "status") == expected)
    except TimeoutException:
        raise AssertionError(f"the page's status did not become {expected!r} within {timeout} s: "
                             f"it shows {text_of(driver, 'status')!r}") from None


def count(driver, selector: str) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, selector))


def test_the_dashboard_in_headless_chromium_shows_the_latest_step_and_follows_appended_rows(run_dir, browser):
    server = serve(run_dir, 0)  # any free port
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        assert browser.title == "picotron-jax dashboard"
        wait_for_status(browser, "step 10", timeout=10)  # the newest training row (the eval row is not one)
        summary = text_of(browser, "summary")
        assert summary.startswith("loss 4.0000 | 1010 tokens/s | MFU 12.5% | goodput 87.5%"), summary
        assert summary.endswith("| 1 anomalies"), summary
        # the loss chart: the train line and the eval line, and the spike's red mark at step 6
        assert count(browser, "#loss polyline") == 2
        assert count(browser, "#loss line[stroke='red']") == 1
        assert count(browser, "#tps polyline") == count(browser, "#mem polyline") == 1
        assert count(browser, "#layers rect") == 2 * LAYERS  # steps 4 and 8, 3 layers each
        assert count(browser, "#layers rect[fill='#000']") == 1  # step 8's NaN layer: black
        points = browser.find_element(By.CSS_SELECTOR, "#gnorm polyline").get_attribute("points").split()
        assert len(points) == 4  # steps 2, 4, 6, 10: step 8's NaN gradient norm is left out
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#alerts td")]
        assert cells[:2] == ["6", "spike"] and "a spike made by hand" in cells, cells
        goodput = text_of(browser, "goodput")
        assert "60.0%" in goodput and "compile 2.00" in goodput, goodput
        assert "layer_every: 4" in text_of(browser, "config")

        # the run goes on: new rows and a new anomaly; the open page shows them within a few polls
        browser.execute_script("window.sameDocument = true")  # gone if the page reloaded
        append(run_dir / "metrics.jsonl", [train_row(12, 3.5), train_row(14, 3.25)])
        append(run_dir / "alerts.jsonl", [alert_row(14, "throughput")])
        wait_for_status(browser, "step 14", timeout=3 * POLL_S)
        assert text_of(browser, "status") != "step 10"
        WebDriverWait(browser, 3 * POLL_S).until(lambda d: "throughput" in text_of(d, "alerts"))
        summary = text_of(browser, "summary")
        assert summary.startswith("loss 3.2500 | 1014 tokens/s") and summary.endswith("| 2 anomalies"), summary
        assert count(browser, "#loss line[stroke='red']") == 2
        assert count(browser, "#layers rect") == 3 * LAYERS  # step 12's column added
        assert browser.execute_script("return window.sameDocument === true")  # updated in place, not reloaded

        # a rewind redoes step 12: its newest row stands for the step, the lines do not double back
        loss_points = len(browser.find_element(By.CSS_SELECTOR, "#loss polyline").get_attribute("points").split())
        append(run_dir / "metrics.jsonl", [train_row(12, 3.4)])
        time.sleep(2 * POLL_S)
        assert text_of(browser, "status") == "step 14"  # the highest step, not the last row written
        assert len(browser.find_element(By.CSS_SELECTOR, "#loss polyline").get_attribute("points").split()) \
            == loss_points == 7  # steps 2, 4, ..., 14 once each
    finally:
        server.shutdown()
        server.server_close()
