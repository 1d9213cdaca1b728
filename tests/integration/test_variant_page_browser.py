"""The variant page in headless Chromium: the loss curve drawn as SVG from the stored per-epoch losses, the
before/after table and the benchmark figures, read from GET /v1/variants/{id} of a live API over SQLite.

The variant is stored as an edit job stores it (a job, its chunk and the variant row), with evaluations in the
shape the edit runner writes; the page is checked against those numbers, not against itself.
"""

from __future__ import annotations

import math

import pytest

from tests.apisupport import live_server, prepare_database, settings_for
from tests.integration.browser_support import chromium
from tests.integration.test_explorer_browser import artifacts_dir
from tests.integration.worker_support import MODEL, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]

EPOCHS = 40
EVALUATIONS = {
    "objective": {"name": "source_distance", "base": 12.5, "variant": 0.031},
    "interpretation": {"prompt": "A cat sat on the mat.", "layer": 6, "token": 3, "base": "a small pet animal",
                       "variant": "a loyal dog barking", "target": "a dog, a loyal pet"},
    "answer": {"prompt": "A cat sat on the mat.", "base": "The cat is resting.", "variant": "The dog is resting."},
    "knowledge": {"facts": 40, "known": 20, "kept_of_known": 0.95, "base_accuracy": 0.5, "edited_accuracy": 0.475,
                  "known_facts": ["Paris is the capital of France", "Rome is the capital of Italy"]},
    "behaviour": {"requests": 10, "detector": "keyword: bomb, weapon",
                  "base": {"plain_hit_rate": 0.3, "injected_hit_rate": 0.6},
                  "variant": {"plain_hit_rate": 0.1, "injected_hit_rate": 0.2}},
}


def _losses(kind: str) -> list[dict]:
    out = []
    for e in range(EPOCHS):
        if kind == "supervised":
            edit = 10.0 * math.exp(-e / 5)  # falls by ~3 orders of magnitude over 40 epochs
            out.append({"epoch": e, "loss": edit + 0.01, "edit_loss": edit, "keep_loss": 0.001 if e != 7 else None,
                        "bad_share": None})
        else:
            out.append({"epoch": e, "loss": 0.1, "edit_loss": None, "keep_loss": None,
                        "bad_share": max(0.1, 0.4 - e * 0.01)})
    return out


def _store_variant(url: str, method: str, evaluations: dict, *, epochs: bool = False) -> str:
    from selfie_jobs.db import create_db_engine
    from sqlalchemy.orm import Session

    from selfie_jobs.models import Chunk, EditEpoch, Job, Variant

    engine = create_db_engine(url)
    try:
        with Session(engine) as session:
            job = Job(model=MODEL, kind=method, state="succeeded", spec={}, batch_key="k", total=1, done=1)
            session.add(job)
            session.flush()
            chunk = Chunk(job_id=job.id, index=0, model=MODEL, batch_key="k", state="done", items=[[0]], size=1)
            session.add(chunk)
            session.flush()
            variant = Variant(job_id=job.id, method=method, layer=6, path=f"variants/{job.id}/x.safetensors",
                              sha256="ab" * 32, settings={"method": method, "layer": 6, "epochs": EPOCHS, "lr": 3e-4, "beta": 10.0,
                                        "template": None, "evaluations": []},
                              losses=_losses(method), evaluations=evaluations, chunk_id=chunk.id, engine_run_id="r",
                              worker="w", model=MODEL)
            session.add(variant)
            if epochs:  # the edit's progress rows, as the runner stores them epoch by epoch
                for row in _losses(method)[:3]:
                    session.add(EditEpoch(job_id=job.id, epoch=row["epoch"], loss=row["loss"],
                                          edit_loss=row["edit_loss"], keep_loss=row["keep_loss"],
                                          bad_share=row["bad_share"], rewards=[1, -1, 1],
                                          interpretations=["glass bottle", "fuel and a rag", "a quiet room"]))
            session.commit()
            return variant.id
    finally:
        engine.dispose()


@pytest.fixture
def server(sqlite_url, redis_url):
    prepare_database(sqlite_url)
    with live_server(settings_for(sqlite_url, redis_url)) as live:
        yield live


@pytest.fixture
def browser(tmp_path):
    with chromium(tmp_path / "chrome-profile") as driver:
        yield driver


def _open(browser, server, variant_id: str) -> None:
    browser.get(f"{server.url}/ui/variants/{variant_id}")
    wait_for(lambda: browser.execute_script("return document.body.dataset.loaded === '1'")
             or browser.find_element("id", "error").text, 60, what="the variant page to load")
    assert not browser.find_element("id", "error").text


def _cells(browser, row: str) -> tuple[str, str]:
    tr = browser.find_element("css selector", f"#before-after tr[data-row='{row}']")
    return tr.find_element("css selector", "td.base").text, tr.find_element("css selector", "td.variant").text


def test_supervised_variant_page(browser, server, sqlite_url):
    variant_id = _store_variant(sqlite_url, "supervised", EVALUATIONS)
    _open(browser, server, variant_id)
    # the loss curve: one point per finite epoch, on a log axis whose ticks span the losses' decades
    curve = browser.find_element("id", "loss-curve")
    series = {p.get_attribute("data-name"): int(p.get_attribute("data-points"))
              for p in curve.find_elements("css selector", "path.series")}
    assert series == {"edit loss": EPOCHS, "keep loss": EPOCHS - 1}
    ticks = [t.text for t in curve.find_elements("css selector", "text.ytick")]
    assert ticks[0] == "1e-3" and ticks[-1] == "1e1", ticks
    # the path rises to the left: the first point is higher on screen (smaller y) than the last
    d = curve.find_element("css selector", "path[data-name='edit loss']").get_attribute("d").split()
    first_y, last_y = float(d[0].split(",")[1]), float(d[-1].split(",")[1])
    assert first_y < last_y
    assert "over 40 epochs" in browser.find_element("id", "curve-note").text
    assert _cells(browser, "interpretation") == ("a small pet animal", "a loyal dog barking")
    assert _cells(browser, "answer") == ("The cat is resting.", "The dog is resting.")
    assert _cells(browser, "objective") == ("12.5000", "0.0310")
    assert _cells(browser, "knowledge") == ("50.0%", "47.5%")
    assert "a dog, a loyal pet" in browser.find_element("css selector", "tr[data-row='target']").text
    assert "answers 20 of 40 facts" in browser.find_element("id", "knowledge-summary").text
    assert "95.0%" in browser.find_element("id", "knowledge-summary").text
    bars = {b.get_attribute("data-key"): float(b.get_attribute("data-value"))
            for b in browser.find_elements("css selector", "#behaviour-chart rect.bar")}
    assert bars == pytest.approx({"base plain": 30.0, "base injected": 60.0, "variant plain": 10.0,
                                  "variant injected": 20.0})
    assert "Paris is the capital of France" in browser.find_element("id", "known-facts").text
    # the settings table: each setting once, nothing that was not set
    names = [th.text for th in browser.find_elements("css selector", "#settings th")]
    assert names == ["method", "base model", "layer", "edit job", "sha256", "created", "epochs", "lr", "beta"]
    browser.save_screenshot(str(artifacts_dir() / "variant_page.png"))


def test_reinforce_variant_page_without_benchmarks(browser, server, sqlite_url):
    evaluations = {"objective": {"name": "bad_share", "base": 0.4, "variant": 0.1}}
    variant_id = _store_variant(sqlite_url, "reinforce", evaluations)
    _open(browser, server, variant_id)
    curve = browser.find_element("id", "loss-curve")
    paths = curve.find_elements("css selector", "path.series")
    assert [(p.get_attribute("data-name"), p.get_attribute("data-points")) for p in paths] == [
        ("judged bad (share)", str(EPOCHS))]
    assert browser.find_element("id", "curve-note").text == "judged bad: 40.0% at epoch 0, 10.0% at epoch 39"
    assert _cells(browser, "objective") == ("40.0%", "10.0%")
    assert "no benchmarks were run" in browser.find_element("id", "benchmarks").text


def test_another_keys_or_unknown_variant_shows_the_error(browser, server):
    browser.get(f"{server.url}/ui/variants/{'0' * 32}")
    wait_for(lambda: browser.find_element("id", "error").text, 60, what="the page's error")
    assert browser.find_element("id", "error").text.startswith("404")


def test_the_index_lists_variants_with_a_link_to_their_page(browser, server, sqlite_url):
    variant_id = _store_variant(sqlite_url, "reinforce", {})
    browser.get(f"{server.url}/ui")
    wait_for(lambda: browser.find_elements("css selector", f"#variants tr[data-variant='{variant_id}']")
             or browser.find_element("id", "error").text, 60, what="the index to list the variant")
    assert not browser.find_element("id", "error").text
    row = browser.find_element("css selector", f"#variants tr[data-variant='{variant_id}']")
    assert [td.text for td in row.find_elements("css selector", "td")][1:4] == [MODEL, "reinforce", "6"]
    row.find_element("css selector", "a").click()
    _open(browser, server, variant_id)  # the link leads to the variant's page, which loads
    assert browser.find_element("id", "variant-id").text == variant_id


def test_a_reinforce_jobs_page_shows_its_epochs_and_links_its_variant(browser, server, sqlite_url):
    """An edit job's page lists its epochs (losses, rewards and the interpretations the judge read, a list of texts
    in a cell) and links the variant it stored."""
    from selfie_jobs.db import create_db_engine
    from sqlalchemy import text

    variant_id = _store_variant(sqlite_url, "reinforce", {}, epochs=True)
    engine = create_db_engine(sqlite_url)
    with engine.connect() as conn:
        job_id = conn.execute(text("SELECT job_id FROM variants WHERE id = :id"), {"id": variant_id}).scalar_one()
    engine.dispose()
    browser.get(f"{server.url}/ui/jobs/{job_id}")
    wait_for(lambda: browser.find_elements("id", "variant-link") or browser.find_element("id", "error").text, 60,
             what="the edit job's rows")
    assert not browser.find_element("id", "error").text
    assert browser.find_element("id", "variant-link").get_attribute("href").endswith(f"/ui/variants/{variant_id}")
    cells = [td.text for td in browser.find_elements("css selector", "#rows td[data-column='interpretations']")]
    assert cells[0] == "glass bottle | fuel and a rag | a quiet room", cells
    assert [td.text for td in browser.find_elements("css selector", "#rows td[data-column='rewards']")][0] == "1 -1 1"


def test_result_rows_give_their_times_in_utc(server, sqlite_url):
    """SQLite hands back naive times: the results route still answers them with a 'Z' (as every other time of the
    API), the epochs' and the variant's alike, so that a page never reads them as local times."""
    from selfie_jobs.db import create_db_engine
    from sqlalchemy import text

    variant_id = _store_variant(sqlite_url, "reinforce", {}, epochs=True)
    engine = create_db_engine(sqlite_url)
    with engine.connect() as conn:
        job_id = conn.execute(text("SELECT job_id FROM variants WHERE id = :id"), {"id": variant_id}).scalar_one()
    engine.dispose()
    with server.client() as http:
        page = http.get(f"/v1/jobs/{job_id}/results").json()
    assert [row["created_at"][-1] for row in page["items"]] == ["Z", "Z", "Z"], page["items"]
    assert page["variant"]["created_at"].endswith("Z"), page["variant"]
