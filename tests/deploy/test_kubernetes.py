"""The Kubernetes manifests: schema-valid, and secure by the properties issue 5 asks for.

Every object of every variant (the base and the dev and production overlays)
is validated against the Kubernetes JSON schemas in strict mode (unknown fields
are errors), for the oldest version with native sidecars on by default (1.29)
and the newest the validator knows. The Prometheus Operator's objects are
validated against the CRD schemas of prometheus-operator v0.93.0
(tests/deploy/schemas). The security properties are then checked by reading
the rendered objects.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from gateway.policy import Policy
from protos import health_pb2, predict_pb2
from tests.deploy.conftest import (
    KUBERNETES,
    PRODUCTION_SECRET_FILES,
    VARIANTS,
    Obj,
    container,
    find,
    gateway_deployment,
    pod_spec,
    tool_missing,
    variant_path,
)
from tests.deploy.kustomize import kubectl, render, render_subset
from tests.deploy.upstream import FakeUpstream
from tests.procs import REPO, Proc, start, tfshield_argv

try:
    import kubernetes_validate
except ImportError as exc:  # a missing tool must fail the run, not skip it
    raise ImportError(tool_missing("kubernetes-validate", "pip install kubernetes-validate")) from exc

# Native sidecars (initContainers[].restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}
GATEWAY_PORTS = {"grpc": 8500, "metrics": 9100, "control": 8600}
# The label an operator's pod and namespace need to reach the control port.
CONTROL_LABEL = {"tfshield.io/control": "allowed"}
SOCKET_DIR = "/run/tfserving"
Rendered = dict[str, list[Obj]]


def all_objects(rendered: Rendered) -> Iterator[tuple[str, Obj]]:
    for variant in VARIANTS:
        for obj in rendered[variant]:
            yield variant, obj


def gateway_config(objects: list[Obj], tmp_path: Path) -> GatewayConfig:
    """The gateway config as the pod sees it, loaded by the gateway's own loader."""
    text = find(objects, "ConfigMap", "tfshield-config")["data"]["gateway.yaml"]
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_config(path)


def _strict(schema: Any) -> Any:
    """An OpenAPI structural schema that, like `kubectl apply`'s strict field
    validation, refuses fields it does not declare."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate_custom_resource(obj: Obj) -> None:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]).read_text())
    schema.pop("$comment")
    # The API server fills in metadata; the CRD schema leaves it open.
    jsonschema.Draft7Validator(_strict(schema)).validate({k: v for k, v in obj.items() if k != "metadata"})


# ----------------------------------------------------------------- rendering


def test_every_variant_renders(rendered: Rendered) -> None:
    kinds = {variant: sorted({o["kind"] for o in objects}) for variant, objects in rendered.items()}
    assert kinds["base"] == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
        "PodDisruptionBudget", "Service", "ServiceAccount",
    ]
    assert set(kinds["dev"]) == set(kinds["base"]) | {"Namespace", "Secret"}
    assert set(kinds["production"]) == set(kinds["dev"]) | {"PrometheusRule", "ServiceMonitor"}


@pytest.mark.skipif(kubectl() is None, reason="no kubectl to compare the subset renderer with")
@pytest.mark.parametrize("variant", VARIANTS)
def test_subset_renderer_builds_what_kustomize_builds(variant: str, kubernetes_tree: Path) -> None:
    def by_key(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
        return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}

    path = variant_path(kubernetes_tree, variant)
    assert by_key(render_subset(path)) == by_key(render(path))


def test_production_secret_material_is_kept_out_of_git() -> None:
    secrets = KUBERNETES / "overlays" / "production" / "secrets"
    paths = [str(secrets / name) for name in PRODUCTION_SECRET_FILES]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(paths)


# ------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_kubernetes(version: str, rendered: Rendered) -> None:
    checked = 0
    for variant, obj in all_objects(rendered):
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{variant}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    assert checked >= 25


def test_prometheus_operator_objects_match_their_crds(rendered: Rendered) -> None:
    custom = [o for o in rendered["production"] if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    assert sorted(o["kind"] for o in custom) == ["PrometheusRule", "ServiceMonitor"]
    for obj in custom:
        validate_custom_resource(obj)


def test_crd_validation_refuses_unknown_fields(rendered: Rendered) -> None:
    monitor = copy.deepcopy(find(rendered["production"], "ServiceMonitor", "tfshield"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate_custom_resource(monitor)


# ------------------------------------------------------------ the sidecar pod


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_runs_as_a_native_sidecar_of_tf_serving(variant: str, rendered: Rendered) -> None:
    spec = pod_spec(gateway_deployment(rendered[variant]))
    assert [c["name"] for c in spec["initContainers"]] == ["tfshield"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["tfserving"]
    assert spec["containers"][0]["image"].startswith("tensorflow/serving:")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sidecar_has_no_startup_probe_that_would_hold_back_tf_serving(
    variant: str, rendered: Rendered
) -> None:
    # A sidecar's startupProbe must pass before the main containers start; the
    # gateway is only SERVING once TF Serving runs, so one would deadlock the pod.
    assert "startupProbe" not in container(gateway_deployment(rendered[variant]), "tfshield")


@pytest.mark.parametrize("variant", VARIANTS)
def test_tf_serving_binds_no_tcp_port_only_a_unix_socket(variant: str, rendered: Rendered) -> None:
    tfserving = container(gateway_deployment(rendered[variant]), "tfserving")
    # The image's entrypoint script would add --port=8500 --rest_api_port=8501.
    assert tfserving["command"] == ["/usr/bin/tensorflow_model_server"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in tfserving["args"])
    assert flags["port"] == "0"
    assert flags["rest_api_port"] == "0"
    assert flags["grpc_socket_path"] == f"{SOCKET_DIR}/grpc.sock"
    assert flags["enable_profiler"] == "false"
    assert "ports" not in tfserving


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_socket_is_shared_only_by_gateway_and_tf_serving_in_memory(
    variant: str, rendered: Rendered
) -> None:
    spec = pod_spec(gateway_deployment(rendered[variant]))
    (volume,) = [v for v in spec["volumes"] if v["name"] == "tfserving-socket"]
    assert volume["emptyDir"]["medium"] == "Memory"
    mounts = {
        c["name"]: m["mountPath"]
        for c in spec["initContainers"] + spec["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] == "tfserving-socket"
    }
    assert mounts == {"tfshield": SOCKET_DIR, "tfserving": SOCKET_DIR}


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_config_loads_and_points_at_the_socket(
    variant: str, rendered: Rendered, tmp_path: Path
) -> None:
    config = gateway_config(rendered[variant], tmp_path)
    assert config.listen == "0.0.0.0:8500"
    assert config.metrics.listen == "0.0.0.0:9100"
    assert config.upstream.target == f"unix://{SOCKET_DIR}/grpc.sock"
    assert config.allow_reload_config is False
    gateway = container(gateway_deployment(rendered[variant]), "tfshield")
    assert gateway["args"] == ["serve", "--config", "/etc/tfshield/config/gateway.yaml"]
    env = {e["name"]: e for e in gateway["env"]}
    # Salts and keys come from the Secret, never as literal values.
    secrets = {
        config.identity.hash_salt_env: "id-salt",
        config.monitors.fingerprint_salt_env: "fingerprint-salt",
        config.policy.deceive_key_env: "deceive-key",
    }
    assert set(secrets) == {"TFSHIELD_ID_SALT", "TFSHIELD_FINGERPRINT_SALT", "TFSHIELD_DECEIVE_KEY"}
    for name, key in secrets.items():
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "tfshield", "key": key}


def _mount_of(gateway: Obj, path: str) -> Obj:
    """The volume mount that holds ``path`` (the deepest one)."""
    mounts = [m for m in gateway["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"nothing mounted holds {path}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _volume(deployment: Obj, name: str) -> Obj:
    (volume,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == name]
    return volume


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitors_policy_audit_and_control_files_are_mounted_as_they_should_be(
    variant: str, rendered: Rendered, tmp_path: Path
) -> None:
    config = gateway_config(rendered[variant], tmp_path)
    deployment = gateway_deployment(rendered[variant])
    gateway = container(deployment, "tfshield")
    # Monitor suites: read-only, a sub-folder of the models claim (not the SavedModels).
    assert [m.model for m in config.monitors.models] == ["mnist"]
    suite_mount = _mount_of(gateway, config.monitors.models[0].suite)
    assert suite_mount["readOnly"] is True
    assert suite_mount["subPath"] == "tfshield"
    assert "persistentVolumeClaim" in _volume(deployment, suite_mount["name"])
    # The policy: the ConfigMap tfshield-policy, a directory mount (edits reach the file), a valid policy.
    assert config.policy.file is not None
    policy_mount = _mount_of(gateway, config.policy.file)
    assert policy_mount["readOnly"] is True and "subPath" not in policy_mount
    policy_map = _volume(deployment, policy_mount["name"])["configMap"]["name"]
    policy_text = find(rendered[variant], "ConfigMap", policy_map)["data"][Path(config.policy.file).name]
    Policy.from_yaml(policy_text, source=policy_map)
    # The audit log: on a writable emptyDir (the root filesystem is read-only).
    assert config.audit.file is not None
    audit_mount = _mount_of(gateway, config.audit.file)
    assert not audit_mount.get("readOnly", False)
    audit_volume = _volume(deployment, audit_mount["name"])["emptyDir"]
    max_bytes = config.audit.max_file_bytes * (config.audit.keep_files + 1)
    assert max_bytes <= _quantity_bytes(audit_volume["sizeLimit"])
    # The control API: on the declared control port, its token from a Secret.
    assert config.control.listen == f"0.0.0.0:{GATEWAY_PORTS['control']}"
    assert config.control.token_file is not None
    token_mount = _mount_of(gateway, config.control.token_file)
    assert token_mount["readOnly"] is True
    token_secret = _volume(deployment, token_mount["name"])["secret"]
    assert token_secret["secretName"] == "tfshield-control"
    assert token_secret["items"] == [{"key": "token", "path": Path(config.control.token_file).name}]
    assert token_secret["defaultMode"] == 0o440


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    return int(quantity)


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitor_state_is_in_memory_for_one_replica_and_in_redis_for_many(
    variant: str, rendered: Rendered, tmp_path: Path
) -> None:
    config = gateway_config(rendered[variant], tmp_path)
    if variant == "production":
        assert config.monitors.store.backend == "redis"
        redis = find(rendered[variant], "Service", "tfshield-redis")
        port = redis["spec"]["ports"][0]["port"]
        assert config.monitors.store.url == f"redis://{redis['metadata']['name']}:{port}/0"
        # The control port speaks TLS with client certificates, like the client port.
        assert config.control.mtls
    else:
        assert config.monitors.store.backend == "memory"


def test_production_gateway_requires_client_certificates(rendered: Rendered, tmp_path: Path) -> None:
    config = gateway_config(rendered["production"], tmp_path)
    assert config.tls is not None and config.tls.require_client_cert
    gateway = container(gateway_deployment(rendered["production"]), "tfshield")
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    tls_dir = str(Path(config.tls.cert_file).parent)
    assert mounts[tls_dir] == "tls"
    for path in (config.tls.cert_file, config.tls.key_file, config.tls.client_ca_file):
        assert str(Path(path).parent) == tls_dir


def test_base_config_file_is_what_the_configmap_carries(rendered: Rendered) -> None:
    text = (KUBERNETES / "base" / "gateway.yaml").read_text()
    assert find(rendered["base"], "ConfigMap", "tfshield-config")["data"]["gateway.yaml"] == text
    assert isinstance(load_config(KUBERNETES / "base" / "gateway.yaml"), GatewayConfig)


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ask_the_gateways_health_service(variant: str, rendered: Rendered) -> None:
    gateway = container(gateway_deployment(rendered[variant]), "tfshield")
    readiness, liveness = gateway["readinessProbe"], gateway["livenessProbe"]
    # Liveness must not depend on the upstream: any answer counts (--live).
    assert liveness["exec"]["command"][:2] == ["tfshield-healthcheck", "--live"]
    if variant == "production":
        # TLS on the gRPC port: the kubelet's plaintext gRPC probe cannot be used.
        assert "grpc" not in readiness
        command = readiness["exec"]["command"]
        assert command[0] == "tfshield-healthcheck" and "--live" not in command
        for flag in ("--tls-ca=", "--tls-cert=", "--tls-key="):
            assert any(arg.startswith(flag) for arg in command) and any(
                arg.startswith(flag) for arg in liveness["exec"]["command"]
            )
    else:
        assert readiness == {**readiness, "grpc": {"port": 8500, "service": ""}}
        assert "exec" not in readiness


# ---------------------------------------------------- exposure and network


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_expose_only_gateway_ports(variant: str, rendered: Rendered) -> None:
    gateway = container(gateway_deployment(rendered[variant]), "tfshield")
    named_ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert named_ports == GATEWAY_PORTS
    exposed = [
        port["targetPort"]
        for o in rendered[variant]
        if o["kind"] == "Service"
        for port in o["spec"]["ports"]
    ]
    assert "control" not in exposed and GATEWAY_PORTS["control"] not in exposed
    pod_labels = gateway_deployment(rendered[variant])["spec"]["template"]["metadata"]["labels"]
    services = {o["metadata"]["name"]: o for o in rendered[variant] if o["kind"] == "Service"}
    for name in ("tfshield", "tfshield-metrics"):
        service = services[name]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in services["tfshield"]["spec"]["ports"]] == [(8500, "grpc")]
    assert [(p["port"], p["targetPort"]) for p in services["tfshield-metrics"]["spec"]["ports"]] == [
        (9100, "metrics")
    ]
    assert services["tfshield-metrics"]["spec"]["clusterIP"] == "None"


def _selects_gateway(policy: Obj, pod_labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_admits_only_gateway_ports(variant: str, rendered: Rendered) -> None:
    pod_labels = gateway_deployment(rendered[variant])["spec"]["template"]["metadata"]["labels"]
    policies = [
        o for o in rendered[variant] if o["kind"] == "NetworkPolicy" and _selects_gateway(o, pod_labels)
    ]
    ingress = [rule for p in policies for rule in p["spec"].get("ingress", [])]
    assert any("Ingress" in p["spec"]["policyTypes"] for p in policies)
    assert {port["port"] for rule in ingress for port in rule["ports"]} == {8500, 9100, 8600}
    for rule in ingress:
        assert "ports" in rule, "an ingress rule without ports would admit every port, TF Serving's included"
        if {port["port"] for port in rule["ports"]} & {9100}:
            assert rule.get("from"), "metrics must be admitted from the monitoring namespace only"
        if {port["port"] for port in rule["ports"]} & {8600}:
            assert [port["port"] for port in rule["ports"]] == [8600]
            # One peer with both selectors: the pod AND its namespace must carry the label.
            operators = {"matchLabels": CONTROL_LABEL}
            assert rule["from"] == [{"namespaceSelector": operators, "podSelector": operators}]
    egress = [rule for p in policies for rule in p["spec"].get("egress", [])]
    egress_ports = {port["port"] for rule in egress for port in rule["ports"]}
    assert all("Egress" in p["spec"]["policyTypes"] for p in policies)
    assert egress_ports == ({53, 6379} if variant == "production" else {53})


def test_redis_is_reachable_from_the_gateway_pods_only(rendered: Rendered) -> None:
    objects = rendered["production"]
    redis = find(objects, "Deployment", "tfshield-redis")
    policy = find(objects, "NetworkPolicy", "tfshield-redis")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"][
        "labels"].items()
    gateway_labels = gateway_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    (rule,) = policy["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
        {k: gateway_labels[k] for k in rule["from"][0]["podSelector"]["matchLabels"]}
    ]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"]
    args = container(redis, "redis")["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"


# ------------------------------------------------------------ pod security


def _pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for obj in objects:
        if obj["kind"] == "Deployment":
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_meet_the_restricted_pod_security_standard(variant: str, rendered: Rendered) -> None:
    for name, spec in _pod_templates(rendered[variant]):
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{name}: {key}"
        assert all("hostPath" not in volume for volume in spec["volumes"]), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            security = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security.get("privileged", False) is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security.get("runAsUser", context["runAsUser"]) != 0, where
            assert "hostPort" not in json.dumps(c.get("ports", [])), where


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_requests_cpu_and_memory_and_limits_memory(
    variant: str, rendered: Rendered
) -> None:
    for name, spec in _pod_templates(rendered[variant]):
        for c in spec.get("initContainers", []) + spec["containers"]:
            resources = c["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), f"{name}/{c['name']}"
            assert "memory" in resources["limits"], f"{name}/{c['name']}"


@pytest.mark.parametrize("variant", ["dev", "production"])
def test_namespace_enforces_restricted_pod_security(variant: str, rendered: Rendered) -> None:
    (namespace,) = [o for o in rendered[variant] if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [o for o in rendered[variant] if o["kind"] != "Namespace"]
    assert {o["metadata"]["namespace"] for o in namespaced} == {namespace["metadata"]["name"]}


@pytest.mark.parametrize("variant", ["dev", "production"])
def test_every_secret_and_configmap_reference_resolves(variant: str, rendered: Rendered) -> None:
    objects = rendered[variant]

    def keys(kind: str, name: str) -> set[str]:
        return set(find(objects, kind, name)["data"])

    for name, spec in _pod_templates(objects):
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert keys("ConfigMap", volume["configMap"]["name"]), name
            if "secret" in volume:
                wanted = {item["key"] for item in volume["secret"].get("items", [])}
                assert wanted <= keys("Secret", volume["secret"]["secretName"]), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in keys("Secret", ref["name"]), f"{name}/{c['name']}: {env['name']}"


def test_dev_salt_is_labelled_as_no_secret(rendered: Rendered) -> None:
    salt = base64.b64decode(find(rendered["dev"], "Secret", "tfshield")["data"]["id-salt"]).decode()
    assert "not-a-secret" in salt


@pytest.mark.parametrize("variant", VARIANTS)
def test_disruption_budget_and_autoscaler_manage_the_gateway_pods(
    variant: str, rendered: Rendered
) -> None:
    objects = rendered[variant]
    deployment = gateway_deployment(objects)
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", "tfshield")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = find(objects, "HorizontalPodAutoscaler", "tfshield")
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tfshield"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    has_redis = any(o["kind"] == "Deployment" and o["metadata"]["name"] == "tfshield-redis" for o in objects)
    if variant == "dev":
        assert hpa["spec"]["maxReplicas"] == 1, "in-memory monitor state is per replica"
    if variant == "production":
        assert has_redis and hpa["spec"]["minReplicas"] >= 2


def test_shutdown_fits_in_the_grace_period(rendered: Rendered, tmp_path: Path) -> None:
    spec = pod_spec(gateway_deployment(rendered["base"]))
    tfserving = container(gateway_deployment(rendered["base"]), "tfserving")
    pre_stop = tfserving["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "/bin/sleep"
    config = gateway_config(rendered["base"], tmp_path)
    assert int(pre_stop[1]) + config.shutdown_grace_s + 10 <= spec["terminationGracePeriodSeconds"]


def test_service_monitor_scrapes_the_metrics_service(rendered: Rendered) -> None:
    objects = rendered["production"]
    monitor = find(objects, "ServiceMonitor", "tfshield")
    metrics = find(objects, "Service", "tfshield-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    client_service = find(objects, "Service", "tfshield")
    assert client_service["metadata"]["labels"]["app.kubernetes.io/component"] != "metrics"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in metrics["spec"]["ports"]]


# ------------------------------------------------- the pod's config, running


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return int(check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def start_pod_gateway(tmp_path: Path, socket_path: Path) -> Proc:
    """The base config, with only the addresses moved into the test's temp dir."""
    config = yaml.safe_load((KUBERNETES / "base" / "gateway.yaml").read_text())
    assert config["upstream"]["target"] == f"unix://{SOCKET_DIR}/grpc.sock"
    config["upstream"]["target"] = f"unix://{socket_path}"
    config["listen"] = "127.0.0.1:0"
    config["metrics"]["listen"] = "127.0.0.1:0"
    # The pod's mounts, as files here: the policy ConfigMap, the token Secret, the audit emptyDir.
    config["policy"]["file"] = str(KUBERNETES / "base" / "policy.yaml")
    config["audit"]["file"] = str(tmp_path / "audit" / "audit.jsonl")
    (tmp_path / "audit").mkdir()
    (tmp_path / "token").write_text("test-control-token\n")
    config["control"] = {"listen": "127.0.0.1:0", "token_file": str(tmp_path / "token")}
    # The fake upstream has no model to calibrate monitors on: the live
    # observability test runs a calibrated suite on the real model server.
    del config["monitors"]
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    argv = tfshield_argv("serve", "--config", str(tmp_path / "gateway.yaml"))
    env = {"TFSHIELD_ID_SALT": "test", "TFSHIELD_DECEIVE_KEY": "test-deceive-key-16+"}
    return start(argv, tmp_path, "gateway", timeout_s=30, env=env)


def wait_until_serving(address: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(address) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the gateway never reached the upstream's unix socket"
        time.sleep(0.05)


def predict_model_names(address: str, n: int) -> list[str]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    names = []
    with grpc.insecure_channel(address) as channel:
        predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        for _ in range(n):
            try:
                names.append(predict_pb2.PredictResponse.FromString(
                    predict(request.SerializeToString(), timeout=10)).model_spec.name)
            except grpc.RpcError as exc:
                names.append(exc.code().name)
    return names


def test_gateway_with_the_pod_config_reaches_tf_serving_over_the_unix_socket(tmp_path: Path) -> None:
    upstream = FakeUpstream(f"unix:{tmp_path / 'grpc.sock'}")
    upstream.start()
    proc = start_pod_gateway(tmp_path, tmp_path / "grpc.sock")
    try:
        wait_until_serving(proc.address())
        assert predict_model_names(proc.address(), 4) == [FakeUpstream.MODEL] * 4
    finally:
        proc.stop()
        upstream.stop()


def test_gateway_started_before_tf_serving_serves_every_call_once_ready(tmp_path: Path) -> None:
    """The pod's start order: the sidecar first, TF Serving's socket seconds later."""
    upstream = FakeUpstream(f"unix:{tmp_path / 'grpc.sock'}")
    proc = start_pod_gateway(tmp_path, tmp_path / "grpc.sock")
    try:
        assert _health(proc.address()) == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(3)  # a model load: the gateway's channels back off meanwhile
        upstream.start()
        wait_until_serving(proc.address())
        assert predict_model_names(proc.address(), 10) == [FakeUpstream.MODEL] * 10
    finally:
        proc.stop()
        upstream.stop()
