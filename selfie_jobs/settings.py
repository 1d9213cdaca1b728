"""Service settings, read from SELFIE_* environment variables (and an optional .env file).

Built by the cached `get_settings()`, never at import, so tests and CLI commands can set the environment first.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from selfie_jobs.specs import MAX_TTL_SECONDS


def _default_data_dir() -> Path:
    return Path.home() / ".selfie"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELFIE_", env_file=".env", extra="ignore")

    # --- storage -------------------------------------------------------------------------------------------
    data_dir: Path = Field(default_factory=_default_data_dir, description="SQLite file, model cache, logs.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: a SQLite file in data_dir.")
    model_cache_dir: Path | None = Field(None, description="Converted model weights; default: data_dir/models.")
    variant_store_dir: Path | None = Field(None, description="Model variants' weights (edit jobs' results); default: "
                                           "data_dir/variant-store. Shared by every worker and the API (a volume "
                                           "in docker-compose).")

    # --- queue ---------------------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Celery broker; `selfie up` starts an embedded one if unset.")

    # --- models --------------------------------------------------------------------------------------------
    default_model: str = "smollm2-135m-instruct"

    # --- limits --------------------------------------------------------------------------------------------
    max_interpretations_per_job: int = Field(20_000, ge=1)
    max_prompts_per_job: int = Field(1_000, ge=1)
    max_prompt_chars: int = Field(20_000, ge=1)
    max_new_tokens_cap: int = Field(256, ge=1)
    max_vectors_per_job: int = Field(10_000, ge=1, description="Vectors (or expressions) one `vectors` job may hold.")
    max_vector_upload_bytes: int = Field(64 << 20, ge=1, description="Largest .npy/.safetensors file a `vectors` "
                                         "upload may send.")
    max_expression_terms: int = Field(16, ge=1, description="Terms of one expression over hidden states.")
    max_edit_epochs: int = Field(1_000, ge=1, le=100_000, description="Epochs one edit job (supervised, "
                                 "reinforce) may train.")
    max_reference_texts: int = Field(256, ge=1, le=10_000, description="Reference texts one supervised edit may "
                                     "bring.")
    max_reference_chars: int = Field(4_000, ge=1, le=100_000, description="Characters of one reference text.")
    max_eval_items: int = Field(1_000, ge=1, le=10_000, description="Facts or behaviour requests an edit's "
                                "evaluations may bring (the original SelfIE's known-facts file has 844).")
    chunk_size: int = Field(64, ge=1, description="Interpretations per chunk (the unit of work and of progress).")
    max_batch_interpretations: int = Field(256, ge=1, description="Upper bound of one cross-job engine batch.")

    # --- reliability ---------------------------------------------------------------------------------------
    lease_seconds: int = Field(120, ge=5, description="A running chunk whose lease ran out is re-enqueued.")
    enqueue_grace_seconds: int = Field(
        60, ge=1, description="A queued chunk sent longer ago than this is re-sent when its model's queue lacks "
                              "messages (every such chunk when the broker cannot be asked).")
    reconcile_interval_seconds: float = Field(30.0, gt=0)
    heartbeat_interval_seconds: float = Field(10.0, gt=0)
    busy_heartbeat_seconds: float = Field(
        1.0, gt=0, description="How often a worker that runs chunks beats: publishes its batch's progress and "
                               "checks whether their jobs were cancelled (a cancel stops the batch's rows of that job "
                               "within about this time).")
    worker_alive_seconds: float = Field(45.0, gt=0, description="A worker silent for longer is considered gone.")
    chunk_soft_time_limit_seconds: int = Field(900, ge=1)
    edit_soft_time_limit_seconds: int = Field(
        6 * 3600, ge=1, description="Time limit of one edit job's task (an edit trains for many epochs; other work "
                                    "of its model runs between them).")
    subjob_start_seconds: float = Field(
        300.0, gt=0, description="An edit's sub-job (a judge's generate job on another model) that no worker has "
                                 "started within this fails the edit: its model has no live worker, or they are busy. "
                                 "Well above worker_alive_seconds + enqueue_grace_seconds + "
                                 "reconcile_interval_seconds, so a restarting worker or a lost message is waited for.")
    subjob_finish_seconds: float = Field(
        1800.0, gt=0, description="An edit's sub-job not finished within this of its submission fails the edit "
                                  "(twice chunk_soft_time_limit_seconds by default).")
    job_timeout_seconds: int = Field(7 * 24 * 3600, ge=1)
    db_retry_seconds: float = Field(60.0, gt=0, description="How long a worker keeps retrying a failed write.")
    max_chunk_attempts: int = Field(5, ge=1, description="A chunk lost or crashed this often fails its job.")
    worker_load_attempts: int = Field(5, ge=1, description="A worker whose model fails to load this many times "
                                      "in a row stops, with exit status 3.")
    worker_load_backoff_seconds: float = Field(10.0, ge=0, description="Wait after a failed model load before the "
                                               "next try; doubled after each failure, at most 5 minutes.")

    # --- retention ----------------------------------------------------------------------------------------
    job_ttl_seconds: int | None = Field(None, ge=1, le=MAX_TTL_SECONDS, description="Seconds a finished job "
                                        "is kept when neither it nor its key says (none: kept for ever); "
                                        "`selfie purge` and beat delete the expired ones (selfie_jobs.retention).")
    purge_interval_seconds: float = Field(3600.0, gt=0, description="How often beat purges expired jobs.")
    purge_batch_rows: int = Field(5_000, ge=1, description="Rows one purge transaction deletes at most, so a big "
                                  "purge never holds its locks for long.")

    # --- security ------------------------------------------------------------------------------------------
    auth_enabled: bool = Field(True, description="Only `selfie up` (local embedded mode) switches this off.")
    cors_origins: list[str] = Field(default_factory=list, description="Closed by default.")
    rate_limit_per_minute: int = Field(600, ge=1)
    default_daily_quota: int = Field(1_000_000, ge=1, description="Interpretations per key per day.")
    metrics_token: SecretStr | None = Field(None, description="When set, /metrics asks for "
                                            "`Authorization: Bearer <token>` (Prometheus' bearer_token).")
    flower_user: str | None = None
    flower_password: SecretStr | None = None

    # --- api -----------------------------------------------------------------------------------------------
    public_url: str = Field("http://127.0.0.1:8000", description="Base of the links the API hands out.")
    max_job_body_bytes: int = Field(16 << 20, ge=1024, description="A POST /v1/jobs body (JSON). The prompt caps "
                                    "allow more text than this in one job; such a job is split into several.")
    max_upload_bytes: int = Field(256 << 20, ge=1024, description="An upload (prompt-set file), spooled to disk "
                                  "and read row by row, never held in memory whole.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="The body of any other route (audit definitions, "
                                "changes): small JSON.")
    max_event_streams: int = Field(100, ge=1, description="Job event streams (GET /v1/jobs/{id}/events) one API "
                                   "process serves at once; past that it answers 503 and clients poll.")
    event_poll_seconds: float = Field(0.5, gt=0, description="How often an event stream reads its job's status "
                                      "(a short session each time, no connection held in between).")
    event_ping_seconds: int = Field(15, ge=1, description="Keep-alive comments on a quiet event stream.")
    max_concurrent_requests: int = Field(40, ge=1, description="Requests one API process serves at once (with "
                                         "two threads each); more wait in line, see queue_wait_seconds.")
    queue_wait_seconds: float = Field(30.0, gt=0, description="How long a request waits in line before it is "
                                      "answered 503 with Retry-After (overload sheds load, never 500).")

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'selfie.db'}"

    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
