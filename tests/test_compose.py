"""docker-compose.yml runs the same `selfie` commands the tests run, and is complete for production."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from selfie_cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def selfie_services() -> list[str]:
    return [name for name, svc in SERVICES.items() if svc.get("command", [None])[0] == "selfie"]


@pytest.mark.parametrize("service", selfie_services())
def test_service_command_is_a_real_cli_command(service):
    args = SERVICES[service]["command"][1:]
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, f"{service}: `selfie {args[0]}` does not exist"
    # Parsing the arguments with the real command catches unknown options and bad values.
    command.make_context(f"selfie {args[0]}", list(args[1:]))


def test_stack_has_every_role_with_health_checks():
    assert {"redis", "postgres", "migrate", "api", "beat", "flower"} <= set(SERVICES)
    workers = [n for n in selfie_services() if SERVICES[n]["command"][1] == "worker"]
    assert workers, "no worker service"
    for name in ("redis", "postgres", "api"):
        assert "healthcheck" in SERVICES[name], name
    assert "--appendonly" in SERVICES["redis"]["command"]
    for name in workers:
        command = SERVICES[name]["command"]
        gpu = command[command.index("--gpu") + 1]
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["device_ids"] == [gpu], f"{name}: --gpu and the reserved device differ"
    assert SERVICES["migrate"]["command"][1:] == ["migrate"]
    assert SERVICES["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def published_services() -> list[str]:
    return [name for name, svc in SERVICES.items() if svc.get("ports")]


def container_port(mapping) -> int:
    """The container side of a compose port entry: "8000", "8000:8000", "127.0.0.1:80:8000/tcp" or the long form."""
    if isinstance(mapping, dict):
        return int(mapping["target"])
    return int(str(mapping).rsplit(":", 1)[-1].split("/")[0])


@pytest.mark.parametrize("service", published_services())
def test_published_services_listen_beyond_loopback(service):
    # Docker forwards a published port to the container's own interface: a server bound to 127.0.0.1 inside the
    # container is unreachable however the port is published. The values come from the real command's parser, so
    # an option left at its default (127.0.0.1 for `selfie api` and `selfie flower`) counts as given.
    svc = SERVICES[service]
    assert service in selfie_services(), f"{service}: publishes ports, but only selfie commands are checked here"
    args = svc["command"][1:]
    params = cli.get_command(click.Context(cli), args[0]).make_context(f"selfie {args[0]}", list(args[1:])).params
    assert "host" in params and "port" in params, f"{service}: `selfie {args[0]}` takes no --host/--port"
    host = params["host"]
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    assert not loopback, f"{service}: listens on {host} inside its container; publish needs 0.0.0.0"
    assert {container_port(p) for p in svc["ports"]} == {params["port"]}, f"{service}: published port != --port"


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose client is not installed here",
)
def test_docker_compose_config_validates():
    env = {"POSTGRES_PASSWORD": "x" * 16, "FLOWER_USER": "ops", "FLOWER_PASSWORD": "y" * 16, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_workers_and_api_share_the_variant_store_volume():
    # A variant is written by the worker that ran its edit, served by any worker and deleted by the API (and by the
    # workers' purge): all of them must see the same variant store.
    store = COMPOSE["x-selfie-env"]["SELFIE_VARIANT_STORE_DIR"]
    workers = [n for n in selfie_services() if SERVICES[n]["command"][1] == "worker"]
    for name in [*workers, "api", "beat"]:
        svc = SERVICES[name]
        assert svc["environment"]["SELFIE_VARIANT_STORE_DIR"] == store, name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts.get(store) in COMPOSE["volumes"], f"{name}: no volume at {store}"
