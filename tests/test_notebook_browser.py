"""End to end in a real browser: log in to JupyterLab on the master, open a notebook, use the engines.

Headless Debian Chromium driven by playwright (``scripts/test`` installs both as
root).  On failure a screenshot is saved and its path is in the failure message.
"""

from __future__ import annotations

import re

import pytest

from conftest import CHROMIUM, needs_chromium, screenshot

pytestmark = [pytest.mark.cluster, *needs_chromium()]


CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\ncluster_size = 2\ncores_per_node = 1\nplugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nenable_notebook = true\nnotebook_directory = {dir}\n"
)


def test_log_in_open_a_notebook_and_read_the_engine_ids(cli, home, write_config, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    config = str(write_config(CONFIG.format(dir=tmp_path / "notebooks")))
    started = cli("-c", config, "start", "web")
    assert started.returncode == 0, started.output
    try:
        shown = cli("notebook", "web")
        url = re.search(r"notebook\s+(https://\S+)", shown.stdout)[1]
        password = re.search(r"password\s+(\S+)", shown.stdout)[1]
        shot = tmp_path / "notebook-failure.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900}).new_page()
                page.set_default_timeout(60_000)
                try:
                    page.goto(url + "lab")
                    assert "/login" in page.url  # no password, no lab
                    if picture := screenshot("lab-login.png"):
                        page.screenshot(path=str(picture))
                    page.fill("input[name=password]", password + "-wrong")
                    page.click("#login_submit")
                    expect(page.get_by_text("Invalid credentials")).to_be_visible()

                    page.fill("input[name=password]", password)
                    page.click("#login_submit")
                    page.wait_for_url(re.compile(r"/lab"))
                    page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
                    # run the cell only once the kernel is up, or Lab skips it
                    expect(page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle"))).to_be_visible(
                        timeout=90_000
                    )
                    editor = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").first
                    editor.click()
                    editor.type("from ipyparallel import Client; Client().ids")
                    page.keyboard.press("Shift+Enter")
                    output = page.locator(".jp-NotebookPanel .jp-OutputArea-output").first
                    expect(output).to_have_text(re.compile(r"\[0, 1\]"), timeout=90_000)
                    assert output.inner_text().strip() == "[0, 1]"

                    # ipyparallel's own Clusters panel lists this cluster, managed by globular
                    page.locator('.lm-TabBar-tab[data-id="ipp-cluster-launcher"]').click()
                    item = page.locator(".ipp-ClusterListingItem", has_text="globular-web")
                    expect(item).to_contain_text("State: running")
                    expect(item).to_contain_text("Number of engines: 2")
                    if picture := screenshot("clusters-panel.png"):
                        page.screenshot(path=str(picture))
                    item.get_by_role("button", name=re.compile("stop", re.I)).click()  # refused: still running
                    expect(page.get_by_text(re.compile("managed by globular"))).to_be_visible()
                    page.get_by_role("button", name="Close").click()
                    # its <> button puts ipyparallel's connect code in the notebook; it connects
                    page.locator(".jp-NotebookPanel .jp-Cell .cm-content").nth(1).click()
                    item.locator(".ipp-ClusterListingItem-code").click()
                    cell = page.locator(".jp-NotebookPanel .jp-Cell .cm-content").nth(1)
                    expect(cell).to_contain_text("Cluster.from_file")
                    cell.click()
                    page.keyboard.press("Shift+Enter")
                    connected = page.locator(".jp-NotebookPanel .jp-OutputArea-output").nth(1)
                    expect(connected).to_have_text(re.compile(r"Client"), timeout=60_000)
                    assert "Error" not in connected.inner_text()
                except BaseException as exc:
                    page.screenshot(path=str(shot), full_page=True)
                    raise AssertionError(f"browser step failed ({exc}); screenshot: {shot}") from exc
            finally:
                browser.close()
    finally:
        stopped = cli("terminate", "-y", "web")
    assert stopped.returncode == 0, stopped.output
