"""The artifact store's paths (`selfie_jobs.variants`): every file a variant names, writes or removes is inside the
store's variants folder, in its own job's folder; a path or job id that would leave it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfie_jobs.variants import VariantUnavailable, file_sha256, relative_path, remove_files, resolve, \
    verified_file, write_artifact

JOB = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("relative", [
    "../outside.safetensors", "/etc/passwd", "variants/../../outside", "variants/a/../../../x", "other/a/b",
    "", ".", "variants/..",
])
def test_resolve_refuses_paths_that_leave_the_store(tmp_path, relative):
    with pytest.raises(VariantUnavailable, match="not in the artifact store"):
        resolve(tmp_path, relative)


def test_written_files_are_named_by_content_inside_the_job_folder(tmp_path):
    relative, sha = write_artifact(tmp_path, JOB, b"weights")
    assert relative == f"variants/{JOB}/{sha}.safetensors" == relative_path(JOB, sha)
    path = verified_file(tmp_path, relative, sha)
    assert path == tmp_path / "variants" / JOB / f"{sha}.safetensors" and file_sha256(path) == sha
    assert write_artifact(tmp_path, JOB, b"weights") == (relative, sha)  # the same bytes again: the same file


@pytest.mark.parametrize("job_id", ["", ".", "..", "../x", "a/b", "a\\b", "..\\x", "a\x00b"])
def test_job_ids_that_are_not_one_path_component_are_refused(tmp_path, job_id):
    with pytest.raises((ValueError, VariantUnavailable)):
        write_artifact(tmp_path, job_id, b"weights")
    with pytest.raises((ValueError, VariantUnavailable)):
        relative_path(job_id, "ab" * 32)


@pytest.mark.parametrize("job_id", ["", ".", "..", "../x", "a/../..", "/tmp"])
def test_remove_files_touches_only_its_own_job_folder(tmp_path, job_id):
    relative, _ = write_artifact(tmp_path, JOB, b"weights")
    outside = tmp_path / "keep.txt"
    outside.write_text("not a variant")
    with pytest.raises((ValueError, VariantUnavailable)):
        remove_files(tmp_path, job_id)
    assert (tmp_path / relative).is_file() and outside.is_file()


def test_remove_files_deletes_the_job_folder_and_nothing_else(tmp_path):
    mine, _ = write_artifact(tmp_path, JOB, b"weights")
    write_artifact(tmp_path, JOB, b"a restarted attempt's weights")
    other, _ = write_artifact(tmp_path, "f" * 32, b"another job's")
    remove_files(tmp_path, JOB)
    assert not (tmp_path / mine).parent.exists()
    assert (tmp_path / other).is_file()
    remove_files(tmp_path, JOB)  # nothing left: nothing to do


def test_a_missing_or_changed_file_is_unavailable(tmp_path):
    relative, sha = write_artifact(tmp_path, JOB, b"weights")
    Path(tmp_path / relative).write_bytes(b"weightz")
    with pytest.raises(VariantUnavailable, match="corrupted"):
        verified_file(tmp_path, relative, sha)
    Path(tmp_path / relative).unlink()
    with pytest.raises(VariantUnavailable, match="missing"):
        verified_file(tmp_path, relative, sha)
