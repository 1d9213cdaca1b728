"""The files of edit jobs that end in a worker without a variant (a cancel that the variant's write found) are
removed by the task layer (workers.edit_context.remove_unstored_files); a stored variant's file stays."""

from __future__ import annotations

from types import SimpleNamespace

from selfie_jobs.db import get_sessionmaker
from selfie_jobs.models import Chunk, Variant
from selfie_jobs.variants import resolve, write_artifact
from tests.apisupport import prepare_database, settings_for
from tests.unit.jobs.factories import make_job
from workers.edit_context import remove_unstored_files


def test_only_the_files_of_edits_without_a_variant_are_removed(sqlite_url, tmp_path):
    prepare_database(sqlite_url)
    settings = settings_for(sqlite_url, "redis://unused", variant_store_dir=tmp_path / "store")
    runtime = SimpleNamespace(settings=settings, sessions=get_sessionmaker(sqlite_url))
    with runtime.sessions() as s, s.begin():
        cancelled, stored = make_job(s).id, make_job(s).id
        chunk = s.query(Chunk).filter(Chunk.job_id == stored).first()
        paths = {job: write_artifact(tmp_path / "store", job, job.encode()) for job in (cancelled, stored)}
        s.add(Variant(job_id=stored, method="supervised", layer=1, path=paths[stored][0], sha256=paths[stored][1],
                      settings={}, losses=[], evaluations={}, chunk_id=chunk.id, engine_run_id="r", worker="w",
                      model="tiny"))
    remove_unstored_files(runtime, [cancelled, stored])
    assert not resolve(tmp_path / "store", paths[cancelled][0]).parent.exists()
    assert resolve(tmp_path / "store", paths[stored][0]).is_file()
