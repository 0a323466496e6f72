"""The page `pcam serve` serves at `/`, in a real browser: Debian's headless Chromium driven by
selenium through Debian's chromedriver (installed by `scripts/browser.sh install` when missing).

Files are chosen through the page's file input as a user chooses them; the table must show what the
server's /score answers for the same bytes, at the model card's threshold, and a file name holding
HTML must be shown as text (never parsed). A bad file shows the server's error; a server with a
token shows the token field, and the token entered there loads the card.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.integration.conftest import require_integration
from tests.serving import TOKEN, encode, multipart, request, running_server

pytestmark = pytest.mark.heavy

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALLER = REPO_ROOT / "scripts" / "browser.sh"
WAIT_S = 20
HTML_NAME = "<img src=x onerror=alert(1)>.png"
HTML_FALLBACK = "<b>bold<b>.png"  # for a filesystem that refuses the first


def ensure_browser() -> None:
    """Chromium and chromedriver, installed with the project's script when missing (root, apt)."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        require_integration(
            f"{CHROMIUM} or {CHROMEDRIVER} missing and cannot be installed here (needs root and "
            f"apt-get): run `{INSTALLER.relative_to(REPO_ROOT)} install` as root"
        )
    proc = subprocess.run(
        [str(INSTALLER), "install"], capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0 or not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        require_integration(
            f"`scripts/browser.sh install` failed ({proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """One headless Chromium for the module."""
    ensure_browser()
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        require_integration(f"selenium is not installed ({exc}): `make setup` installs it")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    try:
        browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as exc:
        require_integration(f"headless Chromium did not start through {CHROMEDRIVER}: {exc.msg}")
    browser.set_page_load_timeout(WAIT_S)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def card(served: Path) -> dict[str, Any]:
    return json.loads((served / "models" / "export" / "model_card.json").read_text())


@pytest.fixture(scope="module")
def onnx_md5(served: Path) -> str:
    return hashlib.md5((served / "models" / "export" / "model.onnx").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(served: Path) -> Iterator[str]:
    with running_server(served, precision="fp32") as (url, _):
        yield url


@pytest.fixture(scope="module")
def patch_files(
    tiny_data: Path, server: str, tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Three patch files, PNG and TIFF, one named with HTML: the test split's patches with the
    lowest, the median and the highest probability (so both decisions appear when they can)."""
    with h5py.File(tiny_data / "test.h5") as handle:
        patches = handle["x"][:]
    scores = score(server, [(f"{i}.png", encode(p, "PNG")) for i, p in enumerate(patches)])
    order = np.argsort([r["probability"] for r in scores["results"]])
    picked = [order[0], order[len(order) // 2], order[-1]]
    folder = tmp_path_factory.mktemp("patches")
    try:
        (folder / HTML_NAME).write_bytes(b"")
        html_name = HTML_NAME
    except OSError:
        html_name = HTML_FALLBACK
    names = [html_name, "middle patch.tif", "high.png"]
    paths = []
    for name, index in zip(names, picked, strict=True):
        fmt = "TIFF" if name.endswith(".tif") else "PNG"
        (folder / name).write_bytes(encode(patches[index], fmt))
        paths.append(folder / name)
    return paths


def score(url: str, files: list[tuple[str, bytes]], token: str | None = None) -> dict[str, Any]:
    """The server's JSON answer to POST /score with `files`, as the page sends them."""
    body, headers = multipart(files)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, _, answer = request(f"{url}/score", "POST", body, headers)
    return {"status": status, **json.loads(answer)}


def wait(browser: Any, condition: Any, what: str) -> Any:
    """`condition(browser)` once truthy; on timeout a failure naming `what` and the page status."""
    from selenium.common.exceptions import TimeoutException, UnexpectedAlertPresentException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(condition)
    except UnexpectedAlertPresentException as exc:  # chromedriver dismissed it
        pytest.fail(
            f"page: an alert ({exc.alert_text!r}) opened while waiting for {what}: the page ran "
            "script from a file name or a server answer (written as HTML, not text)"
        )
    except TimeoutException:
        status = browser.execute_script("return document.getElementById('status').textContent")
        pytest.fail(f"page: {what} did not happen within {WAIT_S} s; status line: {status!r}")


def card_terms(browser: Any) -> dict[str, str]:
    """The model card's <dt> names and <dd> texts as the page shows them."""
    return browser.execute_script(
        "const out = {};"
        "for (const dt of document.querySelectorAll('#card dt'))"
        "  out[dt.textContent] = dt.nextElementSibling.textContent;"
        "return out;"
    )


def status_of(browser: Any) -> tuple[str, str]:
    return browser.execute_script(
        "const s = document.getElementById('status'); return [s.textContent, s.className];"
    )


def choose(browser: Any, paths: list[Path]) -> None:
    """Choose `paths` in the page's file input, as a user does in the file dialog."""
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, "files")
    field.send_keys("\n".join(str(p.resolve()) for p in paths))


def assert_no_alert(browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        text = browser.switch_to.alert.text
    except NoAlertPresentException:
        return
    pytest.fail(f"the page ran script from a file name: an alert says {text!r}")


def test_page_shows_the_model_card(driver, server, card, onnx_md5):
    driver.get(server + "/")
    terms = wait(driver, lambda b: "ONNX md5" in (t := card_terms(b)) and t, "the model card")
    threshold = float(card["metrics"]["threshold"]["value"])
    assert terms["ONNX md5"] == onnx_md5
    assert terms["Threshold"].startswith(f"{threshold:.4f} (")
    assert terms["Test AUROC"] == f"{float(card['metrics']['test']['auroc']):.4f}"
    assert terms["Intended use"] == card["intended_use"]
    limits = driver.execute_script(
        "return [...document.querySelectorAll('#limits li')].map((li) => li.textContent)"
    )
    assert limits == card["limits"]


def test_uploaded_files_are_scored_and_names_shown_as_text(driver, server, card, patch_files):
    driver.get(server + "/")
    wait(driver, lambda b: "ONNX md5" in card_terms(b), "the model card")
    choose(driver, patch_files)
    rows = wait(
        driver,
        lambda b: len(r := b.execute_script(ROWS)) == len(patch_files) and r,
        f"a results table of {len(patch_files)} rows",
    )
    assert_no_alert(driver)
    expected = score(server, [(p.name, p.read_bytes()) for p in patch_files])
    assert expected["status"] == 200, expected
    threshold = float(card["metrics"]["threshold"]["value"])
    assert expected["threshold"] == pytest.approx(threshold)
    by_name = {r["file"]: r for r in expected["results"]}
    assert [row["file"] for row in rows] == [p.name for p in patch_files]
    for row in rows:
        p = by_name[row["file"]]["probability"]
        assert abs(float(row["probability"]) - p) <= 0.5e-4 + 1e-9, (row, p)
        assert len(row["probability"].split(".")[1]) == 4, row
        assert row["decision"] == ("tumour" if p >= threshold else "no tumour"), (row, p)
    # The lowest and highest of the test split fall on either side of the threshold.
    assert {row["decision"] for row in rows} == {"tumour", "no tumour"}, rows
    # Shown as text: the cell holds one text node, the table no element a name could inject.
    assert all(row["children"] == 0 for row in rows), rows
    assert (
        driver.execute_script(
            "return document.querySelectorAll('#results img, #results b, #results script').length"
        )
        == 0
    )
    text, _ = status_of(driver)
    assert f"{len(patch_files)} scored" in text


def test_a_bad_file_shows_the_servers_error(driver, server, patch_files, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello, not a picture\n")
    expected = score(server, [(bad.name, bad.read_bytes())])
    assert expected["status"] == 400, expected
    driver.get(server + "/")
    wait(driver, lambda b: "ONNX md5" in card_terms(b), "the model card")
    choose(driver, [bad])
    text, _ = wait(
        driver, lambda b: (s := status_of(b))[1] == "error" and s, "the server's error message"
    )
    assert text == expected["error"]
    assert "notes.png" in text
    assert driver.execute_script(ROWS) == []
    # The next choice is scored on its own (the bad file is not sent again with it).
    choose(driver, patch_files[1:2])
    rows = wait(driver, lambda b: len(r := b.execute_script(ROWS)) == 1 and r, "one row")
    assert rows[0]["file"] == patch_files[1].name
    text, css = status_of(driver)
    assert text.startswith("1 scored by ") and css == "", (text, css)


def test_token_field_appears_and_the_token_loads_the_card(driver, served, onnx_md5, patch_files):
    from selenium.webdriver.common.by import By

    chosen = patch_files[:1]
    with running_server(served, env={"PCAM_SERVE_TOKEN": TOKEN}, precision="fp32") as (url, _):
        driver.get(url + "/")
        field = driver.find_element(By.ID, "token")
        wait(driver, lambda b: field.is_displayed(), "the token field (after 401)")
        assert "needs its bearer token" in status_of(driver)[0]
        assert "ONNX md5" not in card_terms(driver)
        choose(driver, chosen)  # before the token: refused, nothing shown
        wait(driver, lambda b: "needs its bearer token" in status_of(b)[0], "401 on /score")
        assert driver.execute_script(ROWS) == []

        field.send_keys("wrong-" + TOKEN)  # 403: asked again, nothing shown
        driver.find_element(By.ID, "token-save").click()
        wait(driver, lambda b: field.is_displayed(), "the token field again (after 403)")
        assert "ONNX md5" not in card_terms(driver)

        field.clear()
        field.send_keys(TOKEN)
        driver.find_element(By.ID, "token-save").click()
        terms = wait(driver, lambda b: "ONNX md5" in (t := card_terms(b)) and t, "the card")
        assert terms["ONNX md5"] == onnx_md5
        assert not field.is_displayed()

        choose(driver, chosen)  # the same file again, now with the token: scored once
        rows = wait(driver, lambda b: len(r := b.execute_script(ROWS)) > 0 and r, "the results")
        expected = score(url, [(chosen[0].name, chosen[0].read_bytes())], TOKEN)
        assert expected["status"] == 200, expected
        assert [row["file"] for row in rows] == [chosen[0].name], "each choice is scored alone"
        assert float(rows[0]["probability"]) == pytest.approx(
            expected["results"][0]["probability"], abs=0.5e-4 + 1e-9
        )


# The results table's rows: each cell's text, and how many elements the cells hold.
ROWS = """
return [...document.querySelectorAll('#results:not([hidden]) tbody tr')].map((tr) => {
  const [file, probability, decision] = [...tr.cells];
  return {
    file: file.textContent, probability: probability.textContent, decision: decision.textContent,
    children: [...tr.cells].reduce((n, td) => n + td.children.length, 0),
  };
});
"""
