"""Every dashboard panel and every rule, evaluated by a real Prometheus scraping real gateways.

Set-up, all on loopback: the reference model server (``model_server``), a
gateway in front of it protecting ``mnist`` with a Mahalanobis detector
calibrated here (on uniform-noise images, the benign traffic of this test),
per-client monitors calibrated here against the model server (a small suite),
their state in memory, and a policy; a second gateway whose model server is
gone, with the same monitors on a Redis that is not there (so the store's
error series exist, backend="redis", and the monitors fail open); and a scrape
target where nothing listens. Prometheus (the Debian package) scrapes the three
every second and evaluates deploy/prometheus/tfshield-rules.yml.

Traffic, in three rounds a scrape apart so that rates are not zero: benign
Predicts, then what attackers do: a query-based prober (small perturbations of
one digit, from its own API key) that the monitors flag and whose risk the
policy's ladder answers, model-name probing (NOT_FOUND upstream), malformed
tensors (refused by the decode stage) and HandleReloadConfigRequest calls
(refused).

Then, through Prometheus's HTTP API: every panel target must evaluate without
error and return data; every rule must be healthy, every alert expression
must evaluate, and every series an alert reads must exist. Three alerts must
even fire on what this set-up breaks on purpose (upstream down, upstream
errors, target down). Panels and rules reading a metric in PENDING_METRICS
must still return nothing: when that metric lands, this test fails and asks
for its line to be removed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from detectors.mahalanobis import MahalanobisDetector
from detectors.manifest import Manifest, write_artefacts
from protos import predict_pb2, tensor_pb2, types_pb2
from tests.deploy.conftest import DEPLOY, tool_missing
from tests.procs import Proc, start, tfshield_argv

# THE list of metrics with no data in this set-up, and why: mostly metrics other
# issues have yet to add. Every panel, recording rule and alert that reads one
# of these is expected to return no data, and must: when a metric lands and its
# panels show data, remove its line here.
PENDING_METRICS: dict[str, str] = {
    # Every metric the gateway exports now has data here (error counters start
    # at 0). A metric that exists in the rules or dashboard before the gateway
    # exports it goes here, with the reason, until it lands.
}
# Alerts this set-up makes fire on purpose.
FIRING = {"TfshieldUpstreamDown", "TfshieldUpstreamErrors", "TfshieldTargetDown"}
# Grafana's variables, as "All" would expand them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$namespace": ".*",
    "$job": ".*",
    "$model": ".*",
    "$detector": ".*",
}
DASHBOARD = DEPLOY / "grafana" / "tfshield-dashboard.json"
RULES = DEPLOY / "prometheus" / "tfshield-rules.yml"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
RELOAD = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"
NAMESPACE = "tfshield-test"
SERIES_NAME = re.compile(r"\b(tfshield(?::[a-z0-9_]+)+:?[a-z0-9_]*|tfshield_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ------------------------------------------------------------ what is read


def series_names(expr: str) -> set[str]:
    return set(SERIES_NAME.findall(expr))


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in PENDING_METRICS:
            return name.removesuffix(suffix)
    return name


def load_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recorded_from() -> dict[str, set[str]]:
    """recording rule name -> the series its expression reads."""
    return {rule["record"]: series_names(rule["expr"]) for rule in load_rules() if "record" in rule}


def pending_reason(expr: str) -> str | None:
    """Why ``expr`` cannot have data yet, or None if everything it reads exists."""
    recorded = recorded_from()
    for name in sorted(series_names(expr)):
        reads = recorded.get(name, {name})
        for read in sorted(reads):
            if family(read) in PENDING_METRICS:
                return f"{family(read)}: {PENDING_METRICS[family(read)]}"
    return None


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables expanded) for every panel target."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    targets = []
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unexpanded variable in {expr}"
            targets.append((f"{panel['title']} [{target['refId']}]", expr))
    return targets


def test_pending_metrics_are_read_by_the_dashboard_or_the_rules() -> None:
    """A stale line in PENDING_METRICS would hide a panel that should show data."""
    read = {family(name) for _, expr in dashboard_targets() for name in series_names(expr)}
    read |= {family(name) for rule in load_rules() for name in series_names(rule["expr"])}
    assert set(PENDING_METRICS) <= read


# ------------------------------------------------------------------ traffic


def _tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=array.astype("<f4").tobytes())
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    return tensor


def predict_bytes(model: str, input_name: str, array: np.ndarray) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs[input_name].CopyFrom(_tensor(array))
    return request.SerializeToString()


def malformed_bytes() -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    tensor = _tensor(np.zeros((1, 28, 28, 1), np.float32))
    tensor.tensor_content = tensor.tensor_content[:-4]  # one float short of the shape
    request.inputs["images"].CopyFrom(tensor)
    return request.SerializeToString()


def call(channel: grpc.Channel, path: str, request: bytes, api_key: str) -> str:
    try:
        channel.unary_unary(path)(request, timeout=30, metadata=[("x-api-key", api_key)])
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


PROBES_PER_ROUND = 20


def probing_queries(seed_image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """What a query-based evasion attack sends: small perturbations around one image."""
    noise = rng.normal(0.0, 0.03, size=(n, *seed_image.shape)).astype(np.float32)
    return np.clip(seed_image[None] + noise, 0.0, 1.0)


def send_round(healthy: str, broken: str, round_index: int, digits: Any) -> dict[str, int]:
    """One round of traffic; returns how many calls ended with each status
    (the prober's as "prober:<code>")."""
    rng = np.random.default_rng(round_index)
    codes: dict[str, int] = {}

    def count(code: str, who: str = "") -> None:
        key = f"{who}:{code}" if who else code
        codes[key] = codes.get(key, 0) + 1

    def images(n: int) -> np.ndarray:
        return rng.random((n, 28, 28, 1))

    with grpc.insecure_channel(healthy) as channel:
        for i in range(10):  # benign users: distinct held-out digits
            first = 100 + (round_index * 10 + i) * 2
            pair = digits.heldout[first : first + 2]
            count(call(channel, PREDICT, predict_bytes("mnist", "images", pair), "user"))
            count(call(channel, PREDICT, predict_bytes("echo", "x", rng.random((4,))), "user"))
        # A prober with its own key: many small perturbations of one digit,
        # which the monitors flag and the policy's ladder answers...
        for probe in probing_queries(digits.heldout[0], PROBES_PER_ROUND, rng):
            count(call(channel, PREDICT, predict_bytes("mnist", "images", probe[None]), "prober"), "prober")
        # ...and an attacker's model-name probing, malformed tensors and attempts to swap the served models.
        for name in ("admin", "mnist-internal"):
            count(call(channel, PREDICT, predict_bytes(name, "images", images(1)), "attacker"))
        for _ in range(3):
            count(call(channel, PREDICT, malformed_bytes(), "attacker"))
        count(call(channel, RELOAD, b"", "attacker"))
    with grpc.insecure_channel(broken) as channel:
        for _ in range(5):
            count(call(channel, PREDICT, predict_bytes("mnist", "images", images(1)), "user"))
    return codes


# --------------------------------------------------------------- Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(tool_missing("prometheus", "apt-get install prometheus"))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "tfshield",
                    "static_configs": [{"targets": targets, "labels": {"namespace": NAMESPACE}}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.address}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait(lambda: self._get("/-/ready") is not None, "ready")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as response:
                return response.read()
        except OSError:
            return None

    def _wait(self, predicate: Any, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.popen.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not {what} after {timeout_s}s:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"http://{self.address}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, wanted: float, what: str) -> None:
        self._wait(lambda: self.value(expr) == wanted, what)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


POLICY = """
version: 1
rules:
  - name: risky-clients-blocked
    when: {risk_at_least: 0.9}
    action: block
  - name: flagged-inputs-perturbed
    match: {models: [mnist]}
    when: {flagged: [mahalanobis]}
    action: perturb
    level: 2
"""


def calibrate_mnist_detector(folder: Path) -> Path:
    """Mahalanobis on uniform-noise images, the benign traffic below, at 1% false positives."""
    rng = np.random.default_rng(7)
    detector = MahalanobisDetector(n_components=20).fit(rng.random((400, 28, 28, 1)))
    detector.calibrate(rng.random((400, 28, 28, 1)), fpr=0.01)
    manifest = Manifest(
        model="mnist", input="images", output="probabilities", detectors=("mahalanobis",), target_fpr=0.01
    )
    return write_artefacts(folder, manifest, {"mahalanobis": detector})


def calibrate_monitors(model_server: Proc, digits: Any, folder: Path) -> Path:
    """A small monitor suite for mnist, calibrated on the served model's answers (a few seconds)."""
    from gateway.model.calibrate import calibrate_monitor_suite

    return calibrate_monitor_suite(
        "mnist",
        digits,
        model_server.address(),
        folder,
        target_fpr=0.05,
        sequence_options={
            "n_random": 8,
            "n_heavy": 1,
            "n_resend": 4,
            "random_length": (40, 80),
            "heavy_length": (200, 300),
            "resend_length": (40, 80),
        },
        log=lambda line: None,
    )


MONITOR_ENV = {"TFSHIELD_FINGERPRINT_SALT": "observability-salt", "TFSHIELD_ID_SALT": "observability-test"}


@pytest.fixture(scope="module")
def digits(model_cache_dir: Path) -> Any:
    """The demo's benign digits (fit part cut to 1,000, as tests/gateway's ``reference``)."""
    from gateway.model.calibrate import ReferenceSplit, demo_reference

    full = demo_reference(model_cache_dir)
    return ReferenceSplit(full.fit[:1000], full.calibration, full.heldout, full.description)


@pytest.fixture(scope="module")
def observed(
    model_server: Proc, digits: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Prometheus after the traffic rounds have been scraped."""
    workdir = tmp_path_factory.mktemp("observability")
    dead_port = free_port()  # nothing listens here: the broken gateway's upstream
    down_port = free_port()  # nor here: the scrape target that is down
    suite = calibrate_monitors(model_server, digits, workdir / "monitors")
    # The policy answers flagged inputs with perturbed outputs, so decisions
    # other than allow (and perturbations) happen and show on the dashboard;
    # its default ladder answers the monitors' risk.
    (workdir / "policy.yaml").write_text(POLICY)
    monitored = [{"model": "mnist", "suite": str(suite)}]
    config = {
        "detection": {
            "models": [{"model": "mnist", "artefacts": str(calibrate_mnist_detector(workdir / "artefacts"))}]
        },
        "monitors": {"models": monitored, "store": {"backend": "memory"}},
        "policy": {"file": str(workdir / "policy.yaml")},
        "audit": {"file": str(workdir / "audit.jsonl")},
    }
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
    # The broken gateway's Redis is not there either: every store operation fails,
    # the monitors fail open, and the calls go on to the missing model server.
    redis_gone = f"unix://{workdir}/no-redis.sock"
    broken_config = {
        "monitors": {
            "models": monitored,
            "store": {"backend": "redis", "url": redis_gone, "timeout_s": 0.05},
            "failure_mode": "open",
        }
    }
    (workdir / "gateway-broken.yaml").write_text(yaml.safe_dump(broken_config))
    serve = ["serve", "--config", str(workdir / "gateway.yaml"), "--upstream", model_server.address()]
    healthy = start(
        tfshield_argv(*serve, "--port", "0", "--metrics-port", "0"),
        workdir,
        "gateway",
        timeout_s=30,
        env=MONITOR_ENV,
    )
    broken = start(
        tfshield_argv(
            "serve",
            "--config",
            str(workdir / "gateway-broken.yaml"),
            "--upstream",
            f"127.0.0.1:{dead_port}",
            "--port",
            "0",
            "--metrics-port",
            "0",
        ),
        workdir,
        "gateway-broken",
        timeout_s=30,
        env=MONITOR_ENV,
    )
    targets = [healthy.address("metrics"), broken.address("metrics"), f"127.0.0.1:{down_port}"]
    prometheus = None
    try:
        prometheus = Prometheus(workdir, targets)
        prometheus.wait_for('count(up{job="tfshield"})', 3, "scraping all three targets")
        sent: dict[str, int] = {}
        for index in range(3):
            codes = send_round(healthy.address(), broken.address(), index, digits)
            for code, n in codes.items():
                sent[code] = sent.get(code, 0) + n
            time.sleep(1.2)
        prober = {code.removeprefix("prober:"): n for code, n in sent.items() if code.startswith("prober:")}
        others = {code: n for code, n in sent.items() if not code.startswith("prober:")}
        # Deterministic: the model-name probes (NOT_FOUND upstream), the malformed
        # tensors, the refused reloads, and every call to the broken gateway.
        assert {k: others.get(k) for k in ("NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE")} == {
            "NOT_FOUND": 6,
            "INVALID_ARGUMENT": 9,
            "UNAVAILABLE": 15,
        }
        # The benign users' 60 calls are served; PERMISSION_DENIED: the 3 reloads,
        # plus any benign call the policy answered (none is expected: at most a few).
        assert others["OK"] >= 55 and 3 <= others.get("PERMISSION_DENIED", 0) <= 8, others
        assert set(others) <= {"OK", "NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAVAILABLE",
                               "RESOURCE_EXHAUSTED"}, others
        # The prober: how soon the monitors flag it and where the ladder's steps
        # fall depends on the calibrated thresholds, so only a range: answered
        # at first, then throttled (RESOURCE_EXHAUSTED) or blocked (PERMISSION_DENIED).
        assert sum(prober.values()) == 3 * PROBES_PER_ROUND
        assert set(prober) <= {"OK", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}, prober
        assert prober.get("OK", 0) >= 1, prober
        assert prober.get("RESOURCE_EXHAUSTED", 0) + prober.get("PERMISSION_DENIED", 0) >= 1, prober
        healthy.signal(signal.SIGHUP)  # a policy reload, counted by outcome
        # Every call counted, then two more scrapes and rule evaluations.
        prometheus.wait_for(
            f'sum(tfshield_requests_total{{namespace="{NAMESPACE}"}})',
            sum(sent.values()),
            "scraping every call",
        )
        time.sleep(2.5)
        yield prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        healthy.stop()
        broken.stop()


# -------------------------------------------------------------- assertions


def _has_number(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_every_dashboard_panel_evaluates(observed: Prometheus) -> None:
    problems, expected_empty = [], []
    for title, expr in dashboard_targets():
        response = observed.query(expr)
        if response["status"] != "success":
            problems.append(f"{title}: {response.get('error')}")
            continue
        result = response["data"]["result"]
        reason = pending_reason(expr)
        if reason is None and not _has_number(result):
            problems.append(f"{title}: no data ({result}) for {expr}")
        elif reason is not None:
            expected_empty.append(title)
            if result:
                problems.append(f"{title}: has data now; remove {reason.split(':')[0]} from PENDING_METRICS")
    assert not problems, "\n".join(problems)
    # Today: the detector, monitor, store, decision and policy panels.
    assert len(expected_empty) < len(dashboard_targets())


def test_every_rule_is_healthy_in_prometheus(observed: Prometheus) -> None:
    groups = observed.api("rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(load_rules())
    unhealthy = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy


def test_every_recording_rule_has_data_unless_its_metrics_are_pending(observed: Prometheus) -> None:
    for record in recorded_from():
        result = observed.query(record)["data"]["result"]
        if pending_reason(record) is None:
            assert result, f"{record} has no data"
        else:
            assert not result, f"{record} has data now: remove its metrics from PENDING_METRICS"


@pytest.mark.parametrize("alert", [r for r in load_rules() if "alert" in r], ids=lambda r: r["alert"])
def test_alert_expression_evaluates_on_real_series(alert: dict[str, Any], observed: Prometheus) -> None:
    response = observed.query(alert["expr"])
    assert response["status"] == "success", response.get("error")
    result = response["data"]["result"]
    if alert["alert"] in FIRING:
        assert result, f"{alert['alert']} should fire on this set-up"
        assert all(sample["metric"].get("namespace") == NAMESPACE for sample in result)
    reason = pending_reason(alert["expr"])
    for name in series_names(alert["expr"]) - set(recorded_from()):
        exists = bool(observed.query(name)["data"]["result"])
        if family(name) in PENDING_METRICS:
            assert not exists, f"{name} exists now: remove {family(name)} from PENDING_METRICS"
        else:
            assert exists, f"{alert['alert']} reads {name}, which the gateway does not export"
    if reason is not None:
        assert not result


def test_target_down_alert_sees_the_scrape_target_that_is_down(observed: Prometheus) -> None:
    assert observed.value('count(up{job="tfshield"} == 0)') == 1
