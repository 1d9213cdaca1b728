"""HTTP client: submit, status, wait (with a progress bar), results as a DataFrame, cancel."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import RetryCallState, Retrying, stop_after_attempt

from selfie_client.edits import EditsMixin
from selfie_client.variants import VariantMethods
from selfie_jobs.selectors import parse_selector

if TYPE_CHECKING:
    import pandas as pd

# The DataFrame shape of results, shared with the engine's `selfie_core.to_dataframe` (whose docstring defines each
# column; a test holds the two lists equal: the client cannot import the engine).
RESULT_COLUMNS = ["prompt_index", "prompt", "label", "layer", "token", "source_token", "text", "mean_relevancy",
                  "grounded", "ungrounded_reason", "relevancy", "token_ids"]
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
Selector = str | int | range | slice | Sequence[int]
#: the columns of `Client.search` (GET /v1/search items): interpret rows fill prompt_index..source_token, vector rows
#: vector_index and label
SEARCH_COLUMNS = ["kind", "id", "job_id", "model", "created_at", "text", "mean_relevancy", "audit_run",
                  "prompt_index", "layer", "token", "source_token", "vector_index", "label", "grounded"]


class SelfieError(RuntimeError):
    """The service refused a request (4xx) or failed (5xx); `status` and `detail` say why."""

    def __init__(self, status: int, detail: Any, field: str | None = None):
        self.status, self.detail, self.field = status, detail, field
        where = f" ({field})" if field else ""
        super().__init__(f"HTTP {status}{where}: {detail}")


class ServiceUnreachable(ConnectionError):
    """Nothing answers at the service's URL (refused, unknown host): raised at once, since waiting rarely helps."""

    def __init__(self, url: str, cause: Exception):
        self.url = url
        super().__init__(f"cannot reach the SelfIE API at {url} ({cause})")


def _retry_after(resp: httpx.Response) -> float:
    """The seconds the server asks to wait; 1 when it does not say in seconds."""
    try:
        return max(0.0, float(resp.headers.get("retry-after", "")))
    except ValueError:
        return 1.0


def _progress():
    """The progress bar of `wait`: rich, on stderr (the terminal, or a notebook cell's output)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), console=Console(stderr=True))


def describe_status(status: dict[str, Any]) -> str:
    """The status line of a progress bar: state, queue position or rows decoding (step i/n), ETA, wait reason."""
    progress = status["progress"]
    words = [status["state"]]
    edit = status.get("edit")
    if edit and status["state"] == "running" and edit["epochs_done"] >= edit["epochs_total"]:
        words.append("evaluating the base model and the variant")
    if status.get("queue_position"):
        words.append(f"{status['queue_position']} chunks ahead")
    if progress.get("in_flight"):
        step = f", step {progress['decode_step']}/{progress['decode_steps']}" if progress.get("decode_steps") else ""
        words.append(f"{progress['in_flight']} decoding{step}")
    if progress.get("eta_seconds") is not None:
        words.append(f"ETA {progress['eta_seconds']:.0f}s")
    text = ", ".join(words)
    return text + (f" ({status['waiting']})" if status.get("waiting") else "")


def _done_of_total(status: dict[str, Any]) -> tuple[int, int]:
    """What a progress bar counts: an edit's epochs (its one result is the whole edit), else the job's results."""
    edit = status.get("edit")
    if edit:
        return edit["epochs_done"], edit["epochs_total"]
    return status["progress"]["done"], status["progress"]["total"]


def selector(value: Selector) -> str | list[int] | dict[str, int | None]:
    """Layers/tokens as the API takes them: "all", a list, or a {start, stop, step} range.

    Accepts "all", an int, a list of ints, `range(...)`, `slice(...)` or a "start:stop:step" string ("0:31:5", "-3:").
    """
    if isinstance(value, str):
        return parse_selector(value)
    if isinstance(value, bool):
        raise TypeError("layers/tokens must be indices, not booleans")
    if isinstance(value, int):
        return [value]
    if isinstance(value, range):
        return {"start": value.start, "stop": value.stop, "step": value.step}
    if isinstance(value, slice):
        return {"start": value.start or 0, "stop": value.stop, "step": value.step or 1}
    return [int(v) for v in value]


def job_request(
    prompts: str | Sequence[str],
    *,
    model: str | None = None,
    layers: Selector = "all",
    tokens: Selector = "all",
    pairs: Sequence[tuple[int, int]] | None = None,
    template: str | Sequence[str | int] | None = None,
    system: str | None = None,
    k: int = 1,
    injection_mode: str = "replace",
    injection_strength: float = 1.0,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    grounding: dict[str, float] | None = None,
    priority: int = 5,
    idempotency_key: str | None = None,
    ttl_seconds: int | None = None,
    variant: str | None = None,
) -> dict[str, Any]:
    """The JSON body of POST /v1/jobs."""
    body: dict[str, Any] = {
        "prompts": [prompts] if isinstance(prompts, str) else list(prompts),
        **engine_fields(model=model, template=template, system=system, k=k, injection_mode=injection_mode,
                        injection_strength=injection_strength, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, seed=seed, grounding=grounding, priority=priority,
                        idempotency_key=idempotency_key, ttl_seconds=ttl_seconds, variant=variant),
    }
    if pairs is not None:
        body["targets"] = {"pairs": [[int(layer), int(token)] for layer, token in pairs]}
    elif layers == "all" and tokens == "all":
        body["targets"] = "all"
    else:
        body["targets"] = {"layers": selector(layers), "tokens": selector(tokens)}
    return body


def engine_fields(*, model: str | None = None, template: str | Sequence[str | int] | None = None,
                  system: str | None = None, k: int = 1,
                  injection_mode: str = "replace", injection_strength: float = 1.0, max_new_tokens: int = 30,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                  grounding: dict[str, float] | None = None, priority: int = 5,
                  idempotency_key: str | None = None, ttl_seconds: int | None = None,
                  variant: str | None = None) -> dict[str, Any]:
    """What every job kind's request holds besides its inputs (template, injection, generation, priority, how long
    the finished job is kept: `ttl_seconds`, default the key's or the service's; `variant`: a model variant's id,
    run instead of the model's own weights, see `Client.variants`).

    `template`: a preset name or text parts; `system`: a system prompt for the preset (the model's default preset
    when `template` is None); presets have none unless it is given. `grounding`: {"min_mean_relevancy": x}, under
    which an interpretation is not grounded (the service's default when None)."""
    body: dict[str, Any] = {
        "k": k,
        "injection_mode": injection_mode,
        "injection_strength": injection_strength,
        "max_new_tokens": max_new_tokens,
        "decoding": {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed},
        "priority": priority,
    }
    if model:
        body["model"] = model
    if template is not None:
        body["template"] = {"preset": template} if isinstance(template, str) else {"parts": list(template)}
    if system is not None:
        body["template"] = {**body.get("template", {}), "system": system}
    if grounding is not None:
        body["grounding"] = dict(grounding)
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    if variant is not None:
        body["variant"] = variant
    return body


class Client(EditsMixin, VariantMethods):
    """`Client(url, api_key=None)`; every call is one HTTP request except `wait`, `results` and `interpret`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 5, max_wait: float = 60.0, transport: httpx.BaseTransport | None = None):
        """A 429 or 503 is tried again up to `retries` times, after the wait the server's Retry-After asks for, as long
        as one call waits `max_wait` seconds at most in all; a refusal that asks for longer (the daily quota asks for
        an hour) is raised at once."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.retries = retries
        self.max_wait = max_wait
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        # Whether the server has answered this client yet: a refused connection before that is a wrong URL or a
        # stopped server, raised at once; after it, a restart (retried like any dropped connection).
        self._answered = False

    # -- plumbing ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request; 503 (database away) and 429 (rate limit) are retried after the server's Retry-After, a
        dropped connection with backoff; a server never reached raises ServiceUnreachable at once."""
        asked_to_wait = 0.0  # the Retry-After waits of this call so far, held to `max_wait`

        def send() -> httpx.Response:
            resp = self._http.request(method, path, **kw)
            self._answered = True
            return resp

        def worth_retrying(state: RetryCallState) -> bool:
            if state.outcome.failed:
                exc = state.outcome.exception()
                # a connection refused before the server ever answered is a wrong URL or a stopped server
                return isinstance(exc, httpx.TransportError) and (self._answered or not isinstance(
                    exc, httpx.ConnectError))
            resp = state.outcome.result()
            return resp.status_code in (429, 503) and asked_to_wait + _retry_after(resp) <= self.max_wait

        def pause(state: RetryCallState) -> float:
            if state.outcome.failed:
                return min(2 ** (state.attempt_number - 1) * 0.2, 5)
            return _retry_after(state.outcome.result())

        def count_wait(state: RetryCallState) -> None:
            nonlocal asked_to_wait
            if not state.outcome.failed:
                asked_to_wait += state.upcoming_sleep

        retrying = Retrying(retry=worth_retrying, wait=pause, stop=stop_after_attempt(self.retries + 1),
                            before_sleep=count_wait, sleep=time.sleep, reraise=True,
                            retry_error_callback=lambda state: state.outcome.result())
        try:
            resp = retrying(send)
        except httpx.ConnectError as exc:
            raise ServiceUnreachable(self.url, exc) from exc
        if resp.status_code >= 400:
            try:
                payload = resp.json()
            except ValueError:
                payload = {"detail": resp.text}
            detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
            raise SelfieError(resp.status_code, detail, payload.get("field") if isinstance(payload, dict) else None)
        return resp

    # -- jobs --------------------------------------------------------------------------------------------------
    def submit(self, prompts: str | Sequence[str], **options: Any) -> dict[str, Any]:
        """Submit a job (see `job_request` for the options); returns {id, total, link, ...} at once.

        An idempotency key is made up when none is given, so the retry of a submit never makes a second job.
        """
        options.setdefault("idempotency_key", None)
        options["idempotency_key"] = options["idempotency_key"] or "client-" + uuid.uuid4().hex
        return self._request("POST", "/v1/jobs", json=job_request(prompts, **options)).json()

    def submit_vectors(self, vectors: Any = None, *, labels: Sequence[str] | None = None,
                       expressions: Sequence[dict[str, Any]] | None = None, **options: Any) -> dict[str, Any]:
        """Submit a `vectors` job: `vectors` (numpy array, torch tensor or lists; sent as a .npy upload) or
        `expressions` (`selfie_client.vectors.expression(state(...), ...)`), with the options of `engine_fields`."""
        from selfie_client import vectors as v

        options["idempotency_key"] = options.get("idempotency_key") or "client-" + uuid.uuid4().hex
        body = engine_fields(**options)
        if (vectors is None) == (expressions is None):
            raise ValueError("give exactly one of vectors or expressions")
        if expressions is not None:
            body["expressions"] = list(expressions)
            if (names := v.labels_list(labels, len(body["expressions"]))) is not None:
                body["labels"] = names
            return self._request("POST", "/v1/jobs/vectors", json=body).json()
        array = v.as_array(vectors)
        if (names := v.labels_list(labels, array.shape[0])) is not None:
            body["labels"] = names
        return self._request("POST", "/v1/jobs/vectors/upload", files={"file": ("vectors.npy", v.npy_bytes(array))},
                             data={"options": json.dumps(body)}).json()

    def submit_vector_file(self, path: str, *, labels: Sequence[str] | None = None, tensor: str | None = None,
                           **options: Any) -> dict[str, Any]:
        """Submit a `vectors` job from a file: .npy or .safetensors is uploaded as it is (the service reads it,
        never with pickle); .json holds {"vectors": [...], "labels": [...]} or {"expressions": [...]}."""
        from pathlib import Path

        file = Path(path)
        if file.suffix.lower() == ".json":
            spec = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(spec, dict):
                spec = {"vectors": spec}
            return self.submit_vectors(spec.get("vectors"), labels=labels or spec.get("labels"),
                                       expressions=spec.get("expressions"), **options)
        options["idempotency_key"] = options.get("idempotency_key") or "client-" + uuid.uuid4().hex
        body = engine_fields(**options)
        if labels:
            body["labels"] = list(labels)
        data = {"options": json.dumps(body), **({"tensor": tensor} if tensor else {})}
        return self._request("POST", "/v1/jobs/vectors/upload", files={"file": (file.name, file.read_bytes())},
                             data=data).json()

    def status(self, job_id: str, *, include_prompts: bool = True) -> dict[str, Any]:
        params = {} if include_prompts else {"include_prompts": "false"}
        return self._request("GET", f"/v1/jobs/{job_id}", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def jobs(self, *, state: str | None = None, model: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"state": state, "model": model, "limit": limit}.items() if v is not None}
        return self._request("GET", "/v1/jobs", params=params).json()["jobs"]

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["models"]

    def tokenize(self, text: str, model: str) -> list[str]:
        """The tokens of `text` for `model`: position i is token index i in a job."""
        return self._request("GET", f"/v1/models/{model}/tokenize", params={"text": text}).json()["tokens"]

    def wait(self, job_id: str, *, progress: bool = True, poll: float = 0.5, timeout: float | None = None,
             events: bool = True) -> dict:
        """Follow the job until it is final; a rich progress bar (on stderr) shows done/total, the rows decoding now
        and the ETA. Returns the final status (prompts included).

        The server pushes the status (GET /v1/jobs/{id}/events, server-sent events); when the stream is refused (an
        older server, too many streams open) or drops, the status is polled every `poll` seconds instead."""
        from contextlib import ExitStack

        deadline = None if timeout is None else time.monotonic() + timeout
        with ExitStack() as stack:
            bar = task = None

            def show(status: dict[str, Any]) -> None:
                nonlocal bar, task
                if not progress:
                    return
                done, total = _done_of_total(status)
                if bar is None:
                    bar = stack.enter_context(_progress())
                    task = bar.add_task(f"job {job_id[:8]}", total=total, status="")
                bar.update(task, completed=done, total=total, status=describe_status(status))

            def check_deadline(status: dict[str, Any] | None) -> None:
                if deadline is not None and time.monotonic() > deadline:
                    where = f"still {status['state']} ({status['progress']['done']}/{status['progress']['total']})" \
                        if status else "not final"
                    raise TimeoutError(f"job {job_id} {where} after {timeout}s")

            last = self._follow_events(job_id, show, check_deadline, deadline) if events else None
            while last is None or last["state"] not in FINAL_STATES:
                if last is not None:
                    check_deadline(last)
                    time.sleep(poll)
                last = self.status(job_id, include_prompts=False)
                show(last)
            return self.status(job_id)

    def _follow_events(self, job_id: str, show: Any, check_deadline: Any, deadline: float | None) -> dict | None:
        """The job's event stream until its `end` event: the final status, or None when the stream is refused or
        drops (the caller polls). A read waits at most until the deadline (keep-alives arrive every 15 s)."""
        from httpx_sse import SSEError, connect_sse

        last = None
        read = 30.0 if deadline is None else max(0.1, min(30.0, deadline - time.monotonic()))
        try:
            with connect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events",
                             timeout=httpx.Timeout(10.0, read=read)) as source:
                if source.response.status_code != 200:
                    return None  # 404 (no such job: the poll says so), 503 (too many streams): poll
                for event in source.iter_sse():
                    if event.event in ("status", "end"):
                        last = json.loads(event.data)
                        show(last)
                        if event.event == "end":
                            return last
                    check_deadline(last)
        except httpx.ReadTimeout:
            check_deadline(last)
        except (httpx.TransportError, SSEError):
            pass  # a dropped or refused stream: polling takes over
        return None

    # -- results -----------------------------------------------------------------------------------------------
    def iter_results(self, job_id: str, *, page_size: int = 1000, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every interpretation matching `filters` (prompt, layer_min, layer_max, token, min_relevancy, grounded, q,
        sort)."""
        params = {k: v for k, v in filters.items() if v is not None}
        params["limit"] = page_size
        cursor = None
        while True:
            page = self._request("GET", f"/v1/jobs/{job_id}/interpretations",
                                 params={**params, **({"cursor": cursor} if cursor else {})}).json()
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def results(self, job_id: str, **filters: Any) -> pd.DataFrame:
        """All interpretations of a job as a DataFrame, one row per prompt x layer x token: the columns of
        `selfie_core.to_dataframe` (RESULT_COLUMNS), then `worker`, `model` and `created_at`."""
        import pandas as pd

        status = self.status(job_id)
        texts = {p["index"]: p["text"] for p in status.get("prompts", [])}
        rows = []
        for item in self.iter_results(job_id, **filters):
            row = dict(item)
            if row.get("label") is None:
                row["label"] = None
                row["prompt"] = texts.get(row.get("prompt_index"))
            else:  # a vector's row: its label says what it is, not a prompt
                row["prompt"] = None
            rows.append(row)
        df = pd.DataFrame(rows, columns=RESULT_COLUMNS + ["worker", "model", "created_at"])
        for column in ("prompt_index", "layer", "token"):
            df[column] = df[column].astype("Int64")
        df["grounded"] = df["grounded"].astype("boolean")  # <NA>: a row stored before rows were judged
        df.attrs["baseline"] = status.get("baseline")  # the interpretation prompt's own output
        return df

    def iter_rows(self, job_id: str, *, page_size: int = 1000) -> Iterator[dict[str, Any]]:
        """Every result row of a job of any kind, in its kind's shape (GET /v1/jobs/{id}/results)."""
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
            page = self._request("GET", f"/v1/jobs/{job_id}/results", params=params).json()
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def rows(self, job_id: str) -> pd.DataFrame:
        """All result rows of a job of any kind as a DataFrame, with the kind's columns."""
        import pandas as pd

        first = self._request("GET", f"/v1/jobs/{job_id}/results", params={"limit": 1}).json()
        return pd.DataFrame(list(self.iter_rows(job_id)), columns=first["columns"])

    def interpret_vectors(self, vectors: Any = None, labels: Sequence[str] | None = None, *,
                          expressions: Sequence[dict[str, Any]] | None = None, progress: bool = True,
                          timeout: float | None = None, poll: float = 0.5, **options: Any) -> pd.DataFrame:
        """Interpret your own vectors (numpy array, torch tensor or lists of the model's hidden size; or
        `expressions` over hidden states): submit, wait, and return one row per vector (vector_index, label, norm,
        text, mean_relevancy, relevancy, ...). Failed and cancelled jobs raise as in `interpret`."""
        accepted = self.submit_vectors(vectors, labels=labels, expressions=expressions, **options)
        status = self._final(accepted, progress=progress, poll=poll, timeout=timeout)
        df = self.rows(accepted["id"])
        df.attrs.update(job_id=accepted["id"], link=accepted["link"], state=status["state"])
        return df

    def submit_lenses(self, prompts: str | Sequence[str], *, model: str | None = None, layers: Selector = "all",
                      tokens: Selector = "all", pairs: Sequence[tuple[int, int]] | None = None, top_k: int = 5,
                      lenses: Sequence[str] = ("logit", "identity"), priority: int = 5,
                      idempotency_key: str | None = None, ttl_seconds: int | None = None,
                      variant: str | None = None) -> dict[str, Any]:
        """Submit a `lenses` job: the logit lens and the identity patch over the same targets as `submit` (of a
        model variant's weights with `variant`)."""
        body = job_request(prompts, model=model, layers=layers, tokens=tokens, pairs=pairs, priority=priority,
                           idempotency_key=idempotency_key or "client-" + uuid.uuid4().hex)
        body = {k: body[k] for k in ("prompts", "targets", "priority", "idempotency_key", "model") if k in body}
        body.update(top_k=top_k, lenses=list(lenses))
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if variant is not None:
            body["variant"] = variant
        return self._request("POST", "/v1/jobs/lenses", json=body).json()

    def lenses(self, prompts: str | Sequence[str], *, progress: bool = True, timeout: float | None = None,
               poll: float = 0.5, **options: Any) -> pd.DataFrame:
        """Submit a `lenses` job, wait, and return one row per (prompt, layer, token): the model's own top-k
        (model_tokens, model_probs) and each lens's top-k, whether its top-1 is the model's (`*_matches`) and the
        probability it gives the model's top-1 (`*_model_prob`). Failed and cancelled jobs raise as `interpret`."""
        accepted = self.submit_lenses(prompts, **options)
        status = self._final(accepted, progress=progress, poll=poll, timeout=timeout)
        df = self.rows(accepted["id"])
        df.attrs.update(job_id=accepted["id"], link=accepted["link"], state=status["state"],
                        prompts=status.get("prompts", []))
        return df

    def submit_generate(self, prompts: str | Sequence[str], *, model: str | None = None, chat: bool = True,
                        system: str | None = None, max_new_tokens: int = 30, do_sample: bool = False,
                        temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, priority: int = 5,
                        idempotency_key: str | None = None, ttl_seconds: int | None = None,
                        variant: str | None = None) -> dict[str, Any]:
        """Submit a `generate` job: each prompt as one user turn in the model's chat format (`chat=False`: its raw
        text), greedy or sampled (`do_sample`, with `temperature`, `top_p` and a `seed` that makes it repeatable),
        on the model's own weights or on a `variant` (an edit's, `variants()`)."""
        body: dict[str, Any] = {
            "prompts": [prompts] if isinstance(prompts, str) else list(prompts), "chat": chat,
            "max_new_tokens": max_new_tokens, "priority": priority,
            "decoding": {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "seed": seed},
            "idempotency_key": idempotency_key or "client-" + uuid.uuid4().hex,
        }
        for name, value in (("model", model), ("system", system), ("ttl_seconds", ttl_seconds),
                            ("variant", variant)):
            if value is not None:
                body[name] = value
        return self._request("POST", "/v1/jobs/generate", json=body).json()

    def generate(self, prompts: str | Sequence[str], *, progress: bool = True, timeout: float | None = None,
                 poll: float = 0.5, **options: Any) -> list[str]:
        """Submit a `generate` job (options as `submit_generate`), wait, and return the generated texts in the
        prompts' order. `generations(job_id)` reads the rows (text, finish, token_ids) of a job. Failed and
        cancelled jobs raise as `interpret`."""
        accepted = self.submit_generate(prompts, **options)
        self._final(accepted, progress=progress, poll=poll, timeout=timeout)
        rows = sorted(self.iter_rows(accepted["id"]), key=lambda row: row["prompt_index"])
        return [row["text"] for row in rows]

    def generations(self, job_id: str) -> pd.DataFrame:
        """A generate job's rows (prompt_index, text, finish, token_ids, ...), in prompt order."""
        return self.rows(job_id)

    # -- search ------------------------------------------------------------------------------------------------
    def iter_search(self, q: str, *, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every result the key may read whose text has the words (or "quoted phrases") of `q`, newest first;
        filters: model, job, audit_run, kind ("interpret" or "vectors"), layer_min, layer_max, since, until,
        grounded (True / False: interpretations judged grounded or not)."""
        params = {k: v for k, v in filters.items() if v is not None}
        params.update(q=q, limit=page_size)
        cursor = None
        while True:
            page = self._request("GET", "/v1/search", params={**params, **({"cursor": cursor} if cursor else {})})
            body = page.json()
            yield from body["items"]
            cursor = body["next_cursor"]
            if not cursor:
                return

    def search(self, q: str, *, limit: int | None = 1000, **filters: Any) -> pd.DataFrame:
        """Search results (see `iter_search`) as a DataFrame, at most `limit` rows (None: all)."""
        import itertools

        import pandas as pd

        page_size = min(limit, 500) if limit else 500
        rows = list(itertools.islice(self.iter_search(q, page_size=page_size, **filters), limit))
        return pd.DataFrame(rows, columns=SEARCH_COLUMNS)

    def _final(self, accepted: dict[str, Any], *, progress: bool, poll: float, timeout: float | None) -> dict:
        status = self.wait(accepted["id"], progress=progress, poll=poll, timeout=timeout)
        if status["state"] == "failed":
            raise SelfieError(500, f"job {accepted['id']} failed: {status.get('error')}")
        if status["state"] == "cancelled":
            done, total = _done_of_total(status)
            noun = "epochs" if status.get("edit") else "results"
            raise SelfieError(409, f"job {accepted['id']} was cancelled ({status.get('error') or 'no reason given'}); "
                                   f"{done} of {total} {noun} done")
        return status

    def rows_csv(self, job_id: str, *, safe: bool = False) -> str:
        """All result rows of a job of any kind as CSV, in its kind's columns (raw by default, as `results_csv`)."""
        params = {"format": "csv", "csv": "safe" if safe else "raw"}
        return self._request("GET", f"/v1/jobs/{job_id}/results", params=params).text

    def results_csv(self, job_id: str, *, safe: bool = False, **filters: Any) -> str:
        """The interpretations as CSV text. Raw by default (the exact text, for code that parses it); `safe=True`
        asks for the spreadsheet-safe form (cells that would run as formulas prefixed with ')."""
        params = {k: v for k, v in filters.items() if v is not None}
        params.update({"format": "csv", "csv": "safe" if safe else "raw"})
        return self._request("GET", f"/v1/jobs/{job_id}/interpretations", params=params).text

    def interpret(self, prompts: str | Sequence[str], *, progress: bool = True, timeout: float | None = None,
                  poll: float = 0.5, **options: Any) -> pd.DataFrame:
        """Submit, wait with a progress bar, and return the interpretations as a DataFrame.

        `df.attrs` holds the job id, its link, its final state, the prompts' tokens and the job's baseline (the
        interpretation prompt's own output, nothing injected; `grounded` says which rows differ from it). A failed job raises
        SelfieError (status 500), and so does a cancelled one (status 409): its results are partial, and
        `results(job_id)` still reads them.
        """
        accepted = self.submit(prompts, **options)
        status = self._final(accepted, progress=progress, poll=poll, timeout=timeout)
        df = self.results(accepted["id"])
        df.attrs.update(job_id=accepted["id"], link=accepted["link"], state=status["state"],
                        prompts=status.get("prompts", []))
        return df
