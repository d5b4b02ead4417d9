"""README's "First project, step by step", followed in a real Label Studio 1.23.2 and a real Chromium.

The steps, as the README gives them: start the backend with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY;
create a project with the RectangleLabels config; upload the images; connect the model; annotate. Rounds start
by themselves (the default MAGRAL_MIN_NEW_ANNOTATIONS=10): 10 annotations start the first round (the fallback
strategy: fewer than MAGRAL_MIN_LABELED labels), 10 more the second (MAGRAL: 20 labeled, 10 unlabeled left,
more than the budget). Then, in the browser: log in, "Label All Tasks" opens the task MAGRAL ranks first with
the current version's boxes listed with their scores in the regions panel; `/status` shows the learning curve
(an image that loads) and the rounds table with both rounds. Screenshots (PNG) go to $MAGRAL_SCREENSHOTS, else
a temporary directory; `scripts/screenshots.sh` regenerates the README's copies from them.

Toy rounds (TOY_ROUNDS) with a slightly longer schedule (256 px, 4 epochs), so that the detector's best boxes
pass the default display threshold (MAGRAL_PREDICTION_THRESHOLD 0.3); at TOY_ROUNDS' 160 px and one epoch
they may not, and the annotator would see an empty image.
"""

from __future__ import annotations

import base64
import functools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from magral_core.service.store import ModelStore, version_number

from .conftest import (
    REPO,
    TOY_ROUNDS,
    Backend,
    StudioServer,
    annotate,
    create_project,
    first_train_images,
    running_backend,
    tail,
    wait_for_version,
)

pytestmark = pytest.mark.e2e

N_UPLOADED = 30
PER_ROUND = 10  # MAGRAL_MIN_NEW_ANNOTATIONS' default: a round starts after this many new annotations
SETTINGS = TOY_ROUNDS | {
    "MAGRAL_IMAGE_SIZE": "256",
    "MAGRAL_EPOCHS": "4",
    "MAGRAL_MIN_LABELED": str(2 * PER_ROUND),  # the second round is MAGRAL's
}
PAGE_TIMEOUT = 90  # s for a page of Label Studio's editor to render on a busy 2-core machine
BROWSER_SCRIPT = REPO / "scripts" / "browser.sh"


@pytest.fixture(scope="module")
def backend(label_studio: StudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The README's `make serve`, with toy rounds; rounds start by themselves (default threshold)."""
    with running_backend(label_studio, tmp_path_factory.mktemp("magral-first"), SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the test writes its screenshots: $MAGRAL_SCREENSHOTS or a temporary directory."""
    target = os.environ.get("MAGRAL_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through selenium (installed by scripts/browser.sh when missing)."""
    try:
        subprocess.run(["bash", str(BROWSER_SCRIPT), "install"], check=True, capture_output=True, text=True,
                       timeout=900)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"{BROWSER_SCRIPT} install failed ({exc.returncode}):\n{exc.stderr[-3000:]}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # Root in CI: Chromium's sandbox needs a user namespace it cannot have there.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,960",
                 "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, script: str, timeout: float = PAGE_TIMEOUT, debug: Path | None = None
          ) -> Any:
    """Poll a JavaScript expression until it is truthy; fail with `what` and the page's text (and leave
    failed.png and failed.html in `debug`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(0.5)
    text = driver.execute_script("return document.body ? document.body.innerText.slice(0, 2000) : ''")
    if debug is not None:  # what the page was, for whoever reads the failure
        driver.save_screenshot(str(debug / "failed.png"))
        (debug / "failed.html").write_text(driver.page_source)
    pytest.fail(f"{what}: not seen within {timeout:.0f} s at {driver.current_url}; page text:\n{text}")


def _log_in(driver: Any, studio: StudioServer, debug: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{studio.url}/user/login/")
    driver.find_element(By.NAME, "email").send_keys(studio.email)
    driver.find_element(By.NAME, "password").send_keys(studio.password)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]").click()
    _wait(driver, "the projects page after logging in", "!location.pathname.startsWith('/user/login')",
          debug=debug)


def _full_page_screenshot(driver: Any, path: Path) -> None:
    """The whole page, not only the window (Chromium's DevTools protocol: capture beyond the viewport)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))


# Label Studio 1.23's editor: the task id in the bottom bar, and the regions panel ("outliner"), one row per
# region with its label and, for a predicted region, its score (two decimals). The panel renders only the
# rows that fit, so the test compares the rows it shows.
TASK_ID = "(() => { const e = document.querySelector('.lsf-current-task__task-id');" \
    " const m = e && e.firstChild && e.firstChild.textContent.match(/\\d+/); return m ? m[0] : null; })()"
REGIONS = """Array.from(document.querySelectorAll('.lsf-outliner-item')).map(e => [
  (e.querySelector('.lsf-outliner-item__title') || {}).innerText || '',
  (e.querySelector('.lsf-outliner-item__control_type_score') || {}).innerText || ''])"""
MIN_ROWS = 5
LABEL_ALL = "Array.from(document.querySelectorAll('button'))" \
    ".find(b => b.innerText.trim() === 'Label All Tasks')"


def test_first_project_as_the_readme_says(
    label_studio: StudioServer,
    backend: Backend,
    bccd_root: Path,
    bccd_coco: Any,
    browser: Any,
    screenshots: Path,
) -> None:
    started = time.monotonic()
    wait = functools.partial(_wait, browser, debug=screenshots)
    images = first_train_images(bccd_root, N_UPLOADED)
    project = create_project(label_studio, "first project", images)
    ml = label_studio.api(
        "POST", "/api/ml", json={"url": backend.url, "project": project.id, "title": "MAGRAL"}
    ).json()
    assert ml["auth_method"] == "NONE"
    store = ModelStore(backend.home / "projects")

    # 10 annotations: the first round starts by itself (no "Start training").
    for task_id in project.task_ids[:PER_ROUND]:
        annotate(label_studio, task_id, bccd_coco)
    first = wait_for_version(backend, project.id, None)
    assert store.load_ranking(project.id, first).strategy == "entropy_max"
    first_done = time.monotonic()

    # 10 more: the second round is MAGRAL's (MAGRAL_MIN_LABELED labeled, a pool larger than the budget).
    first_ranking = store.load_ranking(project.id, first)
    for task_id in first_ranking.task_ids[:PER_ROUND]:
        annotate(label_studio, task_id, bccd_coco)
    second = wait_for_version(backend, project.id, first)
    assert version_number(second) == version_number(first) + 1
    ranking = store.load_ranking(project.id, second)
    assert ranking.strategy == "magral"
    rounds_done = time.monotonic()
    boxes = label_studio.api("GET", f"/api/predictions/?task={ranking.task_ids[0]}").json()
    current = [p for p in boxes if p["model_version"] == second]
    assert len(current) == 1 and current[0]["result"], f"no box above the threshold on task 1: {boxes}"
    expected = [(r["value"]["rectanglelabels"][0], r["score"]) for r in current[0]["result"]]

    # The annotator: log in, "Label All Tasks" serves the task MAGRAL ranks first, with its boxes drawn.
    _log_in(browser, label_studio, screenshots)
    browser.get(f"{label_studio.url}/projects/{project.id}/data")
    # The button, not a link to ?labeling=1: the button sets the stream to "all tasks", which follows the
    # project's sampling; otherwise the data manager's table order (task id) is served.
    wait("the Label All Tasks button",
         f"(() => {{ const b = {LABEL_ALL}; if (b) b.click(); return !!b; }})()")
    shown_task = wait("the task id in the editor's bottom bar", TASK_ID)
    assert int(shown_task) == ranking.task_ids[0]
    rows = min(len(expected), MIN_ROWS)
    regions = wait("the regions panel listing the predicted boxes",
                   f"(() => {{ const r = {REGIONS}; return r.length >= {rows} ? r : null; }})()")
    # The editor loads the task's image into a blob: URL and shows it as the Image tag's <img alt="image">.
    wait("the task's image loaded", "(() => { const i = document.querySelector('img[alt=\"image\"]');"
                                    " return i && i.complete && i.naturalWidth > 0; })()")
    time.sleep(1)  # the boxes are drawn on the canvas a frame after the image
    browser.save_screenshot(str(screenshots / "task_with_pre_annotations.png"))
    predicted = {(label, f"{score:.2f}") for label, score in expected}
    listed = [(title.strip(), score.strip()) for title, score in regions]
    assert all(row in predicted for row in listed), (listed, sorted(predicted))

    # The admin: /status shows the curve (an image that loads) and both rounds.
    browser.get(f"{backend.url}/status")
    section = f"#project-{project.id}"
    wait("the learning curve image",
          f"(() => {{ const i = document.querySelector('{section} img');"
          " return i && i.complete && i.naturalWidth > 0; })()")
    table = browser.execute_script(
        f"const h = Array.from(document.querySelectorAll('{section} h3'))"
        ".find(e => e.textContent === 'Rounds');"
        "const t = h && h.nextElementSibling; if (!t || t.tagName !== 'TABLE') return [];"
        "return Array.from(t.querySelectorAll('tr')).slice(1)"
        ".map(r => Array.from(r.cells).map(c => c.innerText.trim()));"
    )
    # Columns: version, round, labels, mAP, AP50, strategy, ...
    strategies = {row[0]: row[5] for row in table if len(row) > 5}
    assert strategies == {first: "entropy_max", second: "magral"}, (table, tail(backend.log))
    assert all(float(row[3]) >= 0 for row in table if len(row) > 5), table  # a validation mAP per round
    _full_page_screenshot(browser, screenshots / "status_dashboard.png")
    print(f"\nfirst project: first round {first_done - started:.0f} s, second "
          f"{rounds_done - first_done:.0f} s, browser {time.monotonic() - rounds_done:.0f} s; "
          f"screenshots in {screenshots}")
