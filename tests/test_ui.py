"""The Prefect UI as a person sees it: a real server, a real run of the data-engine flow with a
stage that fails once and is retried, and the pages opened in headless Chromium.

Screenshots land in ``build/test-output/ui/`` (or ``$MPO_TEST_OUTPUT/ui``): the run graph, the
retried stage and the run summary with its charts.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect_server import ROOT, fault_injection, prefect_server

from mpo.synth import generate

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OUTPUT = Path(os.environ.get("MPO_TEST_OUTPUT", ROOT / "build" / "test-output")) / "ui"
STAGES = [
    "ingest-meta.json",
    "ingest-meta_heldout.json",
    "sample-correctness",
    "sample-dropout_ntp",
    "pairs",
    "reference-logps",
    "train-mpo",
    "evaluate-start",
    "evaluate-mpo",
    "compare",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium/chromedriver on PATH: `make browser` installs Debian's (apt-get, as root)",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: Any, url: str, *expected: str, timeout: float = 60) -> str:
    """Open ``url`` and wait until the page shows every ``expected`` text (the UI renders late)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        WebDriverWait(driver, timeout).until(lambda d: all(text in body(d) for text in expected))
    except Exception:
        driver.save_screenshot(str(OUTPUT / "failed-page.png"))
        missing = [text for text in expected if text not in body(driver)]
        raise AssertionError(
            f"{url} did not show {missing} in {timeout} s; see {OUTPUT / 'failed-page.png'}"
        ) from None
    return str(body(driver))


def distinct_colours(png: bytes) -> int:
    from PIL import Image

    return len(Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.mark.timeout(600)
def test_the_ui_shows_the_run_graph_a_retried_stage_and_the_artifacts(
    browser: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    OUTPUT.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data"
    generate(data, count=4, seed=0)
    config = {
        "workdir": str(tmp_path / "run"),
        "train_data": str(data / "meta.json"),
        "heldout_data": str(data / "meta_heldout.json"),
        "model": str(tiny_model_dir),
        "sampling": {"n": 2, "max_tokens": 8, "dropout_max_tokens": 8, "prompts_per_shard": 8},
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 512},
        "eval_max_tokens": 8,
        "stages": {"sampling": {"retries": 2, "retry_delay_seconds": 1}},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))

    with prefect_server(tmp_path / "prefect-home") as server:
        # The first sampling call of the run fails once after its work: a lost worker, as a person
        # would meet it. The stage's policy retries it and the run completes.
        env = {**server.env, **fault_injection(tmp_path / "inject", "mpo.sampling:_sample_rows")}
        done = subprocess.run(
            [sys.executable, "-m", "mpo.cli", "run", str(tmp_path / "config.yaml")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        [flow_run] = server.query("/flow_runs/filter")
        assert flow_run["state_name"] == "Completed"
        task_runs = {t["name"]: t for t in server.query("/task_runs/filter")}
        assert sorted(task_runs) == sorted(STAGES)
        [retried] = [name for name, t in task_runs.items() if t["run_count"] == 2]
        assert retried.startswith("sample-")

        # The run page: every stage a node of the graph (a canvas), and by name under "Task Runs".
        run_page = f"{server.url}/runs/flow-run/{flow_run['id']}"
        text = page_text(browser, run_page, flow_run["name"], "Completed", f"{len(STAGES)} Task runs")
        canvas = browser.find_element(By.TAG_NAME, "canvas")
        assert distinct_colours(canvas.screenshot_as_png) > 50, "the run graph drew nothing"
        browser.save_screenshot(str(OUTPUT / "run-graph.png"))
        browser.find_elements(By.XPATH, "//*[normalize-space(.)='Task Runs']")[-1].click()
        text = page_text(browser, browser.current_url, *STAGES)
        assert text.count("Completed") >= len(STAGES)

        # The retried stage: its run count, the failure and the retry in its logs.
        text = page_text(
            browser,
            f"{server.url}/runs/task-run/{task_runs[retried]['id']}",
            "Run Count",
            "injected fault",
            "Retry 1/2",
            "Completed",
        )
        assert "Run Count\n2" in text
        browser.save_screenshot(str(OUTPUT / "retried-stage.png"))

        # The artifacts: the summary with its three charts drawn, the pairs and training tables.
        artifacts = {a["key"]: a for a in server.query("/artifacts/filter") if a["key"]}
        assert set(artifacts) == {"mpo-run-summary", "mpo-pairs-per-source", "mpo-training-curves"}
        browser.set_window_size(1600, 2600)
        page_text(
            browser,
            f"{server.url}/artifacts/artifact/{artifacts['mpo-run-summary']['id']}",
            "MPO data engine run",
            "Held-out accuracy (greedy)",
            "Stages",
        )
        images = browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/png']")
        widths = [browser.execute_script("return arguments[0].naturalWidth", image) for image in images]
        assert len(widths) == 3 and min(widths) > 600, widths
        browser.save_screenshot(str(OUTPUT / "run-summary.png"))
        # its small gallery: a few pairs per source, their thumbnails drawn
        thumbnails = browser.find_elements(By.CSS_SELECTOR, "img[src^='data:image/jpeg']")
        widths = [browser.execute_script("return arguments[0].naturalWidth", image) for image in thumbnails]
        assert len(widths) >= 2 and min(widths) > 0, widths
        assert "pairs.html" in browser.find_element(By.TAG_NAME, "body").text
        page_text(
            browser,
            f"{server.url}/artifacts/artifact/{artifacts['mpo-pairs-per-source']['id']}",
            "synth_describe",
            "dropout_ntp",
        )
        page_text(
            browser,
            f"{server.url}/artifacts/artifact/{artifacts['mpo-training-curves']['id']}",
            "reward_margin",
            "delta",
        )


def test_the_pairs_gallery_opens_from_disk_and_filters(
    browser: Any, gold_pairs_dir: Path, tmp_path: Path
) -> None:
    """``pairs.html`` as a person opens it: from disk, no server; its thumbnails drawn, and choosing a
    dataset in the filter leaves that dataset's pairs alone on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from mpo.gallery import GallerySpec, write_gallery

    OUTPUT.mkdir(parents=True, exist_ok=True)
    page = write_gallery(gold_pairs_dir, tmp_path / "pairs.html", GallerySpec(per_source=3))
    browser.get(page.as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, "article.pair")
    assert len(cards) == 5 * 3 and all(card.is_displayed() for card in cards)
    thumbnails = browser.find_elements(By.CSS_SELECTOR, "article.pair img")
    assert (
        thumbnails
        and min(browser.execute_script("return arguments[0].naturalWidth", i) for i in thumbnails) > 0
    )
    browser.save_screenshot(str(OUTPUT / "pairs-gallery.png"))
    Select(browser.find_element(By.ID, "dataset")).select_by_value("synth_count")
    shown = [card.get_attribute("data-dataset") for card in cards if card.is_displayed()]
    assert shown == ["synth_count"] * 3
    assert browser.find_element(By.ID, "shown").text == "3 shown"
