"""The results explorer in a real browser: headless Chromium (selenium) loads pages of a real run.

Real parts end to end: uvicorn serving the API and the pages, Redis, SQLite, and a worker process
(`python -m workers worker`) serving a tiny random LLaMA. The job page's layer x token grid is checked cell by
cell against the JSON API, hover and filters are exercised, and screenshots are saved under the artifacts dir
(`SELFIE_ARTIFACTS_DIR`, default `artifacts/`). The audit page is loaded for an audit run fanned out by the same
worker (control queue) and scanned by the beat tick's task body.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.apisupport import live_server
from tests.integration.browser_support import chromium
from tests.integration.worker_support import MODEL, NUM_LAYERS, ROOT, WorkerProcess, save_tiny_model, wait_for, \
    worker_env

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The Eiffel Tower is located in Paris."


def own_redis_db(redis_url: str) -> str:
    """A Redis database of its own: workers of other test runs on this machine listen on the shared one."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + "/15"
    redis.Redis.from_url(url).flushdb()
    return url


def artifacts_dir() -> Path:
    path = Path(os.environ.get("SELFIE_ARTIFACTS_DIR", ROOT / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chrome-profile") as driver:
        yield driver


@pytest.fixture
def stack(sqlite_url, redis_url, tmp_path):
    from selfie_jobs.migrate import upgrade
    from tests.apisupport import settings_for

    redis_url = own_redis_db(redis_url)
    upgrade(sqlite_url)
    model_dir = save_tiny_model(tmp_path / "model")
    worker = WorkerProcess("explorer", model_dir, worker_env(sqlite_url, redis_url, tmp_path / "w"), tmp_path)
    settings = settings_for(sqlite_url, redis_url, max_prompts_per_job=4, chunk_size=16)
    try:
        with live_server(settings) as server:
            http = server.client()
            wait_for(lambda: _ready(worker, http), 120, what="the worker to serve the model")
            yield server, http, settings
    finally:
        worker.stop()


def _ready(worker, http) -> bool:
    if worker.proc.poll() is not None:
        raise AssertionError("worker exited:\n" + worker.log()[-4000:])
    models = http.get("/v1/models").json()["models"]
    ready = [m for m in models if m["name"] == MODEL and any(w["state"] == "ready" for w in m.get("workers", []))]
    return bool(ready) and "ready." in worker.log()


def _wait_page(driver, timeout=60):
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready === '1'")
             or driver.find_element("id", "error").text, timeout, what="the page to load its data")
    error = driver.find_element("id", "error").text
    assert not error, error


def test_job_page_grid_of_a_real_run(stack, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    server, http, _ = stack
    res = http.post("/v1/jobs", json={"model": MODEL, "prompts": [PROMPT], "targets": "all",
                                      "template": {"preset": "summarize"}, "max_new_tokens": 4})
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 120, what="the job")
    job = http.get(f"/v1/jobs/{job_id}").json()
    tokens = job["prompts"][0]["tokens"]
    rows = http.get(f"/v1/jobs/{job_id}/interpretations", params={"limit": 1000}).json()["items"]
    assert len(rows) == (NUM_LAYERS + 1) * len(tokens) == job["progress"]["total"]
    by_cell = {(r["layer"], r["token"]): r for r in rows}

    browser.get(f"{server.url}/ui/jobs/{job_id}")
    _wait_page(browser)

    # tokens across, layers down
    headers = browser.find_elements(By.CSS_SELECTOR, "#grid thead th[data-token]")
    assert [int(h.get_attribute("data-token")) for h in headers] == list(range(len(tokens)))
    layer_heads = browser.find_elements(By.CSS_SELECTOR, "#grid tbody th.layer")
    assert [int(h.text) for h in layer_heads] == list(range(NUM_LAYERS + 1))
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid td.cell")
    assert len(cells) == len(rows)
    colors = set()
    for cell in cells:
        key = (int(cell.get_attribute("data-layer")), int(cell.get_attribute("data-token")))
        row = by_cell[key]
        assert abs(float(cell.get_attribute("data-relevancy")) - row["mean_relevancy"]) < 1e-3
        assert (row["text"].strip()[:40] or "(blank)") == cell.text.strip() or cell.text.strip() in row["text"]
        colors.add(cell.value_of_css_property("background-color"))
    assert len(colors) > 3, "cells should be shaded by relevancy"

    # the most relevant cell is the darkest; hovering shows its interpretation
    best = max(rows, key=lambda r: r["mean_relevancy"])
    cell = browser.find_element(By.CSS_SELECTOR, f"td.cell[data-layer='{best['layer']}'][data-token='{best['token']}']")
    ActionChains(browser).move_to_element(cell).perform()
    wait_for(lambda: browser.find_element(By.ID, "detail-text").text == best["text"].strip(), 5, what="hover detail")
    cell.click()
    assert "selected" in cell.get_attribute("class")

    # the detail panel: each generated token as text with its relevancy under it, shaded by it
    texts = http.get(f"/v1/models/{MODEL}/detokenize",
                     params={"ids": ",".join(map(str, best["token_ids"]))}).json()["tokens"]
    wait_for(lambda: [c.get_attribute("textContent")
                      for c in browser.find_elements(By.CSS_SELECTOR, "#detail-tokens .tok-text")] == texts, 10,
             what="the generated tokens in the detail panel")
    chips = browser.find_elements(By.CSS_SELECTOR, "#detail-tokens .tok")
    assert len(chips) == len(best["relevancy"]) == len(best["token_ids"]) > 0
    for chip, rel in zip(chips, best["relevancy"], strict=True):
        assert abs(float(chip.get_attribute("data-relevancy")) - rel) < 1e-3
        assert chip.find_element(By.CSS_SELECTOR, ".tok-rel").text == f"{rel:.3f}"
    shades = {chip.get_attribute("data-relevancy"): chip.value_of_css_property("background-color") for chip in chips}
    top, low = max(best["relevancy"]), min(best["relevancy"])
    if top - low > 1e-3:
        assert shades[f"{top:.4f}"] != shades[f"{low:.4f}"], "tokens should be shaded by their relevancy"

    # filters: minimum relevancy dims the rest; a layer range hides rows
    browser.execute_script(
        "const s = document.getElementById('min-rel'); s.value = arguments[0]; s.dispatchEvent(new Event('input'));",
        best["mean_relevancy"])
    dimmed = browser.find_elements(By.CSS_SELECTOR, "td.cell.dim")
    assert len(dimmed) == sum(1 for r in rows if r["mean_relevancy"] < best["mean_relevancy"] - 1e-9)
    browser.execute_script(
        "const s = document.getElementById('min-rel'); s.value = 0; s.dispatchEvent(new Event('input'));")
    layer_max = browser.find_element(By.ID, "layer-max")
    layer_max.send_keys("1")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid tbody tr")) == 2
    layer_max.clear()
    browser.execute_script("document.getElementById('layer-max').dispatchEvent(new Event('input'));")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid tbody tr")) == NUM_LAYERS + 1

    path = artifacts_dir() / "explorer_job_page.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000

    # grounding: the same job with a threshold that splits its rows (greedy: the same texts and relevancies)
    threshold = sorted(r["mean_relevancy"] for r in rows)[len(rows) // 2]
    res = http.post("/v1/jobs", json={"model": MODEL, "prompts": [PROMPT], "targets": "all", "max_new_tokens": 4,
                                      "template": {"preset": "summarize"},
                                      "grounding": {"min_mean_relevancy": threshold}})
    assert res.status_code == 202, res.text
    split_id = res.json()["id"]
    wait_for(lambda: http.get(f"/v1/jobs/{split_id}").json()["state"] == "succeeded", 120, what="the second job")
    split = http.get(f"/v1/jobs/{split_id}").json()
    judged = http.get(f"/v1/jobs/{split_id}/interpretations", params={"limit": 1000}).json()["items"]
    ungrounded = {(r["layer"], r["token"]): r["ungrounded_reason"] for r in judged if r["grounded"] is False}
    assert 0 < len(ungrounded) < len(judged), judged
    assert split["baseline"] and split["baseline"] == job["baseline"]

    browser.get(f"{server.url}/ui/jobs/{split_id}")
    _wait_page(browser)
    # the baseline above the grid
    assert browser.find_element(By.ID, "baseline-text").text == (split["baseline"]["text"].strip() or "(blank)")
    # ungrounded cells are marked with their reason and faded; grounded ones are not
    marked = {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-token"))): c.get_attribute("data-reason")
              for c in browser.find_elements(By.CSS_SELECTOR, "#grid td.cell.ungrounded")}
    assert marked == ungrounded
    (layer, token), reason = next(iter(ungrounded.items()))
    faded = browser.find_element(By.CSS_SELECTOR, f"td.cell[data-layer='{layer}'][data-token='{token}']")
    plain = browser.find_element(By.CSS_SELECTOR, "#grid td.cell:not(.ungrounded)")
    assert float(faded.value_of_css_property("opacity")) < float(plain.value_of_css_property("opacity")) == 1.0
    assert "not grounded" in faded.get_attribute("title")
    assert f"{len(ungrounded)} not grounded" in browser.find_element(By.ID, "grid-info").text
    faded.click()
    assert "not grounded" in browser.find_element(By.ID, "detail").text
    # "grounded only" dims the rest
    browser.find_element(By.ID, "grounded-only").click()
    dimmed = {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-token")))
              for c in browser.find_elements(By.CSS_SELECTOR, "#grid td.cell.dim")}
    assert dimmed == set(ungrounded)
    path = artifacts_dir() / "explorer_job_page_grounding.png"
    browser.save_screenshot(str(path))


def test_job_page_table_of_a_vectors_run(stack, browser):
    """A vectors job's page is a table of its rows (label, norm, relevancy, text), checked row by row against the
    JSON results; the grid and its controls are not shown."""
    from selenium.webdriver.common.by import By

    server, http, _ = stack
    hidden = next(m for m in http.get("/v1/models").json()["models"] if m["name"] == MODEL)["hidden_size"]
    # five directions of different norms (0.5 .. 40): a random model's relevancy differs between them
    vectors = [[(i * i + 0.5) * (((j * (2 * i + 3) + i) % 7) - 3) / 3 for j in range(hidden)] for i in range(5)]
    labels = ["probe", "steer", "feature 7", "a & <b>", "zero-ish"]
    res = http.post("/v1/jobs/vectors", json={"model": MODEL, "vectors": vectors, "labels": labels,
                                              "max_new_tokens": 4})
    assert res.status_code == 202, res.text
    job_id = res.json()["id"]
    wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 120, what="the job")
    rows = http.get(f"/v1/jobs/{job_id}/results").json()["items"]
    assert [r["label"] for r in rows] == labels
    assert len({round(r["mean_relevancy"], 4) for r in rows}) > 1, rows  # else the shading check below means nothing

    browser.get(f"{server.url}/ui/jobs/{job_id}")
    _wait_page(browser)
    assert not browser.find_element(By.ID, "grid-controls").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#grid td.cell") == []
    heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#rows thead th")]
    assert heads == ["vector_index", "label", "norm", "text", "mean_relevancy", "relevancy"]
    lines = browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr")
    assert len(lines) == len(rows) == 5
    colors = set()
    for line, row in zip(lines, rows):
        cells = {c.get_attribute("data-column"): c for c in line.find_elements(By.TAG_NAME, "td")}
        assert int(cells["vector_index"].text) == row["vector_index"]
        assert cells["label"].text == row["label"]
        assert abs(float(cells["norm"].text) - row["norm"]) <= 1e-3 * max(1.0, row["norm"])
        assert abs(float(cells["mean_relevancy"].text) - row["mean_relevancy"]) < 1e-3
        assert cells["text"].text == row["text"].strip()
        colors.add(cells["mean_relevancy"].value_of_css_property("background-color"))
    assert len(colors) > 1, "the mean relevancy column should be shaded"
    assert browser.find_element(By.ID, "rows-info").text == "5 vectors results"
    path = artifacts_dir() / "explorer_vectors_page.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 5_000


def test_audit_page_of_a_real_run(stack, browser):
    from selenium.webdriver.common.by import By

    from api.broker import make_producer
    from workers.audits import audit_tick

    server, http, settings = stack
    res = http.post("/v1/audits", json={
        "name": "browser-audit", "model": MODEL, "prompt_set": "prompt_injections",
        "targets": {"layers": "all", "tokens": {"last": 2}}, "options": {"template": "summarize", "max_new_tokens": 3},
        # random weights say random things: a pattern that matches most words makes a visible chart
        "detectors": [{"kind": "regex", "name": "any-word", "patterns": [r"\w{3,}"]},
                      {"kind": "keywords", "name": "secrets", "words": ["password", "secret"]}],
    })
    assert res.status_code == 201, res.text
    audit_id = res.json()["id"]
    run = http.post(f"/v1/audits/{audit_id}/runs").json()

    # the worker fans the run out (control queue) and runs its jobs; the tick scans them
    producer = make_producer(settings.redis_url)

    def finished():
        audit_tick(server.app.state.sessionmaker, settings, producer)
        return http.get(f"/v1/audit-runs/{run['id']}").json()["state"] in ("succeeded", "failed")

    wait_for(finished, 180, interval=1.0, what="the audit run")
    status = http.get(f"/v1/audit-runs/{run['id']}").json()
    assert status["state"] == "succeeded", status
    report = http.get(f"/v1/audit-runs/{run['id']}/report").json()
    assert report["flags"] > 0

    browser.get(f"{server.url}/ui/audits/{audit_id}")
    _wait_page(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]")
    bars = browser.find_elements(By.CSS_SELECTOR, "#layer-chart rect.bar")
    assert len(bars) == NUM_LAYERS + 1
    chart = {int(b.get_attribute("data-key")): int(b.get_attribute("data-value")) for b in bars}
    assert chart == {layer: next((x["flags"] for x in report["by_layer"] if x["key"] == layer), 0)
                     for layer in range(NUM_LAYERS + 1)}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#top tbody tr")) == min(25, report["flags"])
    time.sleep(0.2)
    path = artifacts_dir() / "explorer_audit_page.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000

    # the grid of one of the run's jobs marks the cells the audit flagged
    job_id = http.get(f"/v1/audit-runs/{run['id']}/jobs").json()["jobs"][0]["job_id"]
    findings = http.get(f"/v1/jobs/{job_id}/findings", params={"prompt": 0}).json()["items"]
    flagged = {(f["layer"], f["token"]) for f in findings}
    assert flagged
    browser.get(f"{server.url}/ui/jobs/{job_id}?prompt=0")
    _wait_page(browser)
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid td.cell.flag")
    assert {(int(c.get_attribute("data-layer")), int(c.get_attribute("data-token"))) for c in cells} == flagged
    browser.find_element(By.ID, "flagged-only").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid td.cell:not(.dim)")) == len(flagged)


@pytest.mark.smollm2
def test_job_page_with_smollm2(sqlite_url, redis_url, tmp_path, browser):
    """The grid of a SmolLM2 run (readable interpretations), for the screenshot people look at."""
    import signal
    import subprocess
    import sys

    from selenium.webdriver.common.by import By

    from selfie_jobs.migrate import upgrade
    from tests.apisupport import settings_for

    model = "smollm2-135m-instruct"
    redis_url = own_redis_db(redis_url)
    try:
        from selfie_core.loading import gguf_location

        gguf_location(model)
    except Exception as exc:  # noqa: BLE001 - the model package is optional
        pytest.skip(f"SmolLM2 is not installed: {exc}")
    upgrade(sqlite_url)
    env = worker_env(sqlite_url, redis_url, tmp_path / "w")
    log_path = tmp_path / "smol.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "worker", "--model", model, "--hostname",
                                 "smol@testhost"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        with live_server(settings_for(sqlite_url, redis_url, max_new_tokens_cap=32)) as server:
            http = server.client()

            def ready():
                if proc.poll() is not None:
                    raise AssertionError(log_path.read_text()[-3000:])
                return any(m["name"] == model and any(w["state"] == "ready" for w in m["workers"])
                           for m in http.get("/v1/models").json()["models"])

            wait_for(ready, 300, what="the SmolLM2 worker")
            res = http.post("/v1/jobs", json={"model": model, "prompts": [PROMPT],
                                              "targets": {"layers": {"start": 0, "stop": None, "step": 6},
                                                          "tokens": {"start": -7}},
                                              "template": {"preset": "summarize"}, "max_new_tokens": 10})
            assert res.status_code == 202, res.text
            job_id = res.json()["id"]
            wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 600, interval=1.0,
                     what="the SmolLM2 job")
            total = http.get(f"/v1/jobs/{job_id}").json()["progress"]["total"]
            browser.get(f"{server.url}/ui/jobs/{job_id}")
            _wait_page(browser)
            assert len(browser.find_elements(By.CSS_SELECTOR, "#grid td.cell:not(.empty)")) == total
            path = artifacts_dir() / "explorer_job_page_smollm2.png"
            browser.save_screenshot(str(path))
            assert path.stat().st_size > 10_000
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
