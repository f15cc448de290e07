"""Shared fixtures of the deployment tests: rendered manifests and helpers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.kustomize import render
from tests.procs import REPO

DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Stand-ins for the production overlay's secret material (git-ignored files).
PRODUCTION_SECRET_FILES = (
    "id-salt", "fingerprint-salt", "deceive-key", "control-token",
    "tls.crt", "tls.key", "ca.crt", "redis-password",
)
VARIANTS = ("base", "dev", "production")

Obj = dict[str, Any]


def tool_missing(name: str, how: str) -> str:
    return f"{name} is required by tests/deploy but not installed: {how}"


@pytest.fixture(scope="session")
def kubernetes_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/kubernetes with stand-in secret files, so every overlay renders."""
    tree = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    secrets = tree / "overlays" / "production" / "secrets"
    for name in PRODUCTION_SECRET_FILES:
        (secrets / name).write_text(f"stand-in {name} for tests\n")
    return tree


def variant_path(tree: Path, variant: str) -> Path:
    return tree / "base" if variant == "base" else tree / "overlays" / variant


@pytest.fixture(scope="session")
def rendered(kubernetes_tree: Path) -> dict[str, list[Obj]]:
    """variant -> the objects kustomize builds for it."""
    return {variant: render(variant_path(kubernetes_tree, variant)) for variant in VARIANTS}


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def gateway_deployment(objects: list[Obj]) -> Obj:
    return find(objects, "Deployment", "tfshield")


def pod_spec(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]["spec"]


def container(deployment: Obj, name: str) -> Obj:
    spec = pod_spec(deployment)
    (match,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return match
