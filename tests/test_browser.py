"""The notebooks as a person sees them: JupyterLab in Debian's Chromium (driven by Playwright), quick size.

JupyterLab starts on 127.0.0.1 with a token in a temporary folder; the browser opens notebook 1, runs all its cells,
moves the explorer's q slider and counts the pixels of the selected rows' colour in the redrawn plot; then notebook 4
(on a `facts.loki` made here, on the rows notebook 1's attributions select), ticks the switchboard's box and checks
that the answers change and the status line agrees, also after quick repeated clicks. On failure a screenshot of the
page is written to the test's screenshot folder (named in the failure message).

Needs `playwright` (the `test` extra) and a Chromium binary (`apt-get install -y chromium`; no browser download):
skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts JupyterLab, its kernels and a browser; runs notebooks on the default model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SELECTED = (31, 119, 180)  # matplotlib's tab:blue, the explorer's colour for the selected rows
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in view
RUN_TIMEOUT_S = 600  # a hang guard, not a speed check: a run-all at the quick size on a shared 2-core CPU


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the test extra)")
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a scratch folder with copies of notebooks 1 and 4, their committed outputs cleared (what
    the test sees is what its own run draws); yields (url, token, folder)."""
    nbformat = pytest.importorskip("nbformat")
    root = tmp_path_factory.mktemp("lab")
    for name in ("01_analyse.ipynb", "04_apply_revert_stack.ipynb"):
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(book, root / name)
    home = tmp_path_factory.mktemp("lab-home")
    settings = home / "settings"
    # Every cell rendered (JupyterLab 4 renders only the cells in view by default), no news or update pop-ups.
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"windowingMode": "none", "autoStartDefaultKernel": true}')
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "LOKI_NOTEBOOK_QUICK": "1",  # the kernels inherit it
        "HF_HUB_CACHE": str(root / "hf-cache"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         "--ServerApp.terminals_enabled=False", *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(home / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not answer: {(home / 'lab.log').read_text()[-2000:]}")
        yield url, token, root
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def page(browser, tmp_path_factory, request):
    """A fresh page; on failure its screenshot goes to the screenshot folder (named in the failure message)."""
    shots = tmp_path_factory.mktemp("browser-screenshots")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.screenshots = shots
    yield page
    context.close()


def shoot(page, name: str) -> Path:
    path = page.screenshots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def run_all(page, url: str, token: str, notebook: str) -> None:
    """Open `notebook` in JupyterLab, run all cells from the Run menu and wait until every cell has run."""
    workspace = notebook.split("_")[0]  # a fresh workspace per notebook: no tab of another one restored
    page.goto(f"{url}/lab/workspaces/nb{workspace}/tree/{notebook}?reset&token={token}")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    select = page.locator(".jp-Dialog button", has_text="Select")  # in case the kernel dialog still asks
    try:
        select.wait_for(timeout=3_000)
        select.click()
    except Exception:  # playwright's TimeoutError: no dialog
        pass
    page.wait_for_function(  # the kernel is up: its status reads Idle
        f"() => document.querySelector('{PANEL} .jp-Notebook-ExecutionIndicator[data-status=\"idle\"]') !== null",
        timeout=120_000,
    )
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(  # every code cell has an execution count, none queued or running, the kernel idle
        """(panel) => {
            const prompts = [...document.querySelectorAll(panel + ' .jp-CodeCell .jp-InputPrompt')]
                .map(p => p.textContent);
            return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p))
                && document.querySelector(panel + ' .jp-Notebook-ExecutionIndicator[data-status="idle"]') !== null;
        }""",
        arg=PANEL,
        timeout=RUN_TIMEOUT_S * 1000,
    )
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").filter(
        has_text="Traceback"
    )
    assert errors.count() == 0, errors.first.inner_text()[-2000:]


def selected_pixels(png: bytes) -> int:
    """How many pixels of `png` are the selected rows' colour (within a small distance, for anti-aliasing)."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(SELECTED)).sum(-1) < 40).sum())


def test_explorer_draws_the_selected_rows(lab, page):
    url, token, _ = lab
    try:
        run_all(page, url, token, "01_analyse.ipynb")
        explorer = page.locator(".widget-vbox").filter(has=page.locator(".widget-slider", has_text="q (%)")).first
        detail = explorer.locator("img").last
        rows = explorer.locator(".widget-label", has_text="rows per layer")
        readout = explorer.locator(".widget-slider", has_text="q (%)").locator(".widget-readout")
        before = detail.get_attribute("src")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("25")
        page.keyboard.press("Enter")
        rows.filter(has_text="rows per layer: 144 of 576").wait_for(timeout=60_000)
        page.wait_for_function("([img, src]) => img.src !== src", arg=[detail.element_handle(), before], timeout=60_000)
        page.wait_for_timeout(500)  # the new image decoded
        drawn = selected_pixels(detail.screenshot())
        # 144 selected rows at about 10 pixels a point; the legend's one marker alone is a few dozen
        assert drawn > 300, f"{drawn} pixels of the selected colour after q=25"
    except BaseException:
        print("screenshot:", shoot(page, "explorer"))
        raise


def write_facts_delta(folder: Path, model) -> None:
    """A `facts.loki` without training: zeroes the rows notebook 2 would train (q=10 of notebook 1's attributions),
    which notebook 4 loads. It changes the answers, and its rows are the ones `zero-lowest` shares with it."""
    import loki
    import loki.facts as task

    (attr_path,) = (folder / "attributions").iterdir()
    recipe = task.SIZES["quick"]["recipe"]
    selection = loki.select(loki.load_attributions(attr_path), q=recipe["q"], score=recipe["score"])
    loki.save(loki.implant.suppression(model, selection, name="fictional-facts"), folder / "facts.loki")


def test_switchboard_answers_and_status_agree(lab, page, default_model):
    url, token, root = lab
    if not (root / "attributions").is_dir():
        pytest.skip("notebook 1 did not run (test_explorer_draws_the_selected_rows)")
    write_facts_delta(root, default_model)
    try:
        run_all(page, url, token, "04_apply_revert_stack.ipynb")
        board = page.locator(".widget-vbox").filter(has=page.locator(".widget-checkbox", has_text="zero-lowest")).first
        facts = board.locator(".widget-checkbox", has_text="facts").first.locator("input")
        status = board.locator(".widget-html").first
        answers = board.locator(".widget-html").last

        def settled() -> str:
            """The status line once the board is idle: no busy sign, the same text for a second."""
            last, since = None, time.time()
            while time.time() - since < 1.5:
                text = status.inner_text()
                if text != last or "⏳" in text:
                    last, since = text, time.time()
                page.wait_for_timeout(200)
            return last

        assert settled().endswith("active: none (the base model)")
        base = answers.inner_text()
        facts.click()
        text = settled()
        assert text.endswith("active: facts") and facts.is_checked(), text
        implanted = answers.inner_text()
        assert implanted != base
        for _ in range(5):  # quick repeated clicks: the end state is the one the box shows
            facts.click(force=True, no_wait_after=True)
            page.wait_for_timeout(60)
        text = settled()
        checked = facts.is_checked()
        assert text.endswith("active: facts" if checked else "active: none (the base model)"), (checked, text)
        assert answers.inner_text() == (implanted if checked else base)
    except BaseException:
        print("screenshot:", shoot(page, "switchboard"))
        raise
