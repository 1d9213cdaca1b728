"""The lens grid page and the explorer's search box in headless Chromium, over a real run: uvicorn serving the API
and the pages, Redis, SQLite and a worker process (tiny random LLaMA). The grid is checked cell by cell against
the JSON API for each lens; screenshots go to the artifacts dir (`SELFIE_ARTIFACTS_DIR`, default `artifacts/`)."""

from __future__ import annotations

import pytest

from tests.apisupport import live_server
from tests.integration.browser_support import chromium
from tests.integration.test_explorer_browser import _ready, _wait_page, artifacts_dir
from tests.integration.worker_support import MODEL, NUM_LAYERS, WorkerProcess, save_tiny_model, wait_for, worker_env

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = ["The Eiffel Tower is located in Paris.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chrome-profile") as driver:
        yield driver


@pytest.fixture
def stack(sqlite_url, redis_url, tmp_path):
    import redis

    from selfie_jobs.migrate import upgrade
    from tests.apisupport import settings_for

    redis.Redis.from_url(redis_url).flushdb()
    upgrade(sqlite_url)
    model_dir = save_tiny_model(tmp_path / "model")
    worker = WorkerProcess("lensui", model_dir, worker_env(sqlite_url, redis_url, tmp_path / "w"), tmp_path)
    settings = settings_for(sqlite_url, redis_url, max_prompts_per_job=4, chunk_size=16)
    try:
        with live_server(settings) as server:
            http = server.client()
            wait_for(lambda: _ready(worker, http), 120, what="the worker to serve the model")
            yield server, http
    finally:
        worker.stop()


def _cells(browser):
    from selenium.webdriver.common.by import By

    return {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-token"))): c
            for c in browser.find_elements(By.CSS_SELECTOR, "#lens-grid td.cell.lens")}


def test_lens_grid_page_of_a_real_run(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    server, http = stack
    res = http.post("/v1/jobs/lenses", json={"model": MODEL, "prompts": PROMPTS, "targets": "all", "top_k": 3})
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 120, what="the job")
    job = http.get(f"/v1/jobs/{job_id}").json()
    rows = http.get(f"/v1/jobs/{job_id}/results", params={"limit": 1000}).json()["items"]
    tokens = job["prompts"][1]["tokens"]

    browser.get(f"{server.url}/ui/jobs/{job_id}")
    _wait_page(browser)
    assert browser.find_element(By.ID, "grid-controls").is_displayed() is False
    Select(browser.find_element(By.ID, "lens-prompt")).select_by_value("1")
    # tokens across, layers down with the last layer on top
    heads = browser.find_elements(By.CSS_SELECTOR, "#lens-grid thead th[data-token]")
    assert [int(h.get_attribute("data-token")) for h in heads] == list(range(len(tokens)))
    layer_heads = browser.find_elements(By.CSS_SELECTOR, "#lens-grid tbody th.layer")
    assert [int(h.text) for h in layer_heads] == list(range(NUM_LAYERS, -1, -1))
    by_cell = {(r["layer"], r["token"]): r for r in rows if r["prompt_index"] == 1}
    seen_tops = {}
    for lens in ("logit", "identity", "model"):
        Select(browser.find_element(By.ID, "lens")).select_by_value(lens)
        cells = _cells(browser)
        assert set(cells) == set(by_cell) and len(cells) == (NUM_LAYERS + 1) * len(tokens)
        colors = set()
        for key, cell in cells.items():
            row = by_cell[key]
            assert cell.get_attribute("data-top") == row[f"{lens}_tokens"][0]
            assert abs(float(cell.get_attribute("data-prob")) - row[f"{lens}_probs"][0]) < 1e-3
            match = row[f"{lens}_token_ids"][0] == row["model_token_ids"][0]
            assert ("match" in cell.get_attribute("class").split()) == match
            colors.add(cell.value_of_css_property("background-color"))
        assert len(colors) > 3, "cells should be shaded by the top-1 probability"
        seen_tops[lens] = {k: c.get_attribute("data-top") for k, c in cells.items()}
        browser.save_screenshot(str(artifacts_dir() / f"lens-grid-{lens}.png"))
    # switching lens redraws the grid: the two lenses disagree somewhere below the last layer
    assert seen_tops["logit"] != seen_tops["identity"]
    # the last layer's logit lens is the model's own prediction: every cell of the top row framed
    Select(browser.find_element(By.ID, "lens")).select_by_value("logit")
    assert all("match" in c.get_attribute("class") for (layer, _), c in _cells(browser).items() if layer == NUM_LAYERS)


def test_search_box_of_the_explorer(stack, browser):
    from selenium.webdriver.common.by import By

    server, http = stack
    res = http.post("/v1/jobs", json={"model": MODEL, "prompts": [PROMPTS[0]], "targets": {"layers": [1, 2],
                                      "tokens": [-1]}, "max_new_tokens": 8})
    job_id = res.json()["id"]
    wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 120, what="the job")
    rows = http.get(f"/v1/jobs/{job_id}/interpretations").json()["items"]
    word = next(w for r in rows for w in r["text"].split() if w.isalpha())
    expected = http.get("/v1/search", params={"q": word}).json()["items"]
    assert expected

    browser.get(f"{server.url}/ui")
    wait_for(lambda: browser.find_element(By.ID, "search-q").is_displayed(), 30, what="the index page")
    browser.find_element(By.ID, "search-q").send_keys(word)
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#search-results tr.hit"), 30, what="search results")
    hits = browser.find_elements(By.CSS_SELECTOR, "#search-results tr.hit")
    assert [h.find_element(By.CSS_SELECTOR, ".hit-text").text for h in hits] == [e["text"].strip() for e in expected]
    assert {h.get_attribute("data-job") for h in hits} == {job_id}
    browser.save_screenshot(str(artifacts_dir() / "search-box.png"))
    # a query of operators only: the API's 400 is shown, not a blank list
    box = browser.find_element(By.ID, "search-q")
    box.clear()
    box.send_keys("* -")
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait_for(lambda: "no words" in browser.find_element(By.ID, "error").text, 30, what="the refusal")
