"""Render the kustomizations under deploy/kubernetes for the tests.

``render(path)`` runs the real kustomize (``kubectl kustomize``) when kubectl
is on PATH. Without it (kustomize is not on PyPI or in Debian), it falls back
to ``render_subset``: a small, strict re-implementation of exactly the
kustomize features these manifests use, which refuses any other field rather
than guess. ``test_kubernetes.py`` checks that both renderers give the same
objects wherever kubectl exists, so the fallback cannot drift unnoticed.

Supported: ``resources`` (files and directories), ``components``,
``namespace``, ``images``, ``patches`` (strategic-merge patch files),
``configMapGenerator`` and ``secretGenerator`` (``files``, ``literals``,
``behavior``) with ``generatorOptions.disableNameSuffixHash: true``.
"""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "resources", "components", "namespace", "images", "patches",
    "configMapGenerator", "secretGenerator", "generatorOptions",
}
GENERATOR_FIELDS = {"name", "files", "literals", "behavior", "type"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
# Strategic merge: lists of objects merged by these keys (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
    "volumeMounts": "mountPath", "ports": "containerPort",
}


class SubsetError(Exception):
    """The kustomization uses something the subset renderer does not implement."""


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(path: Path) -> list[Obj]:
    """The objects kustomize builds from ``path``: real kustomize if available, else the subset."""
    binary = kubectl()
    if binary is None:
        return render_subset(path)
    result = subprocess.run([binary, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_subset(path: Path) -> list[Obj]:
    return _build(Path(path), [], expect_kind="Kustomization")


def _load_kustomization(folder: Path, expect_kind: str) -> Obj:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    if data.get("kind", "Kustomization") != expect_kind:
        raise SubsetError(f"{folder}: expected kind {expect_kind}, found {data.get('kind')}")
    unknown = set(data) - KUSTOMIZATION_FIELDS
    if unknown:
        raise SubsetError(f"{folder}: fields {sorted(unknown)} are not supported by the subset renderer")
    return data


def _key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _build(folder: Path, accumulated: list[Obj], expect_kind: str) -> list[Obj]:
    k = _load_kustomization(folder, expect_kind)
    objects = accumulated
    for entry in k.get("resources", []):
        target = folder / entry
        if target.is_dir():
            objects += _build(target, [], expect_kind="Kustomization")
        else:
            objects += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    for entry in k.get("components", []):
        objects = _build(folder / entry, objects, expect_kind="Component")
    generators = [("ConfigMap", g) for g in k.get("configMapGenerator", [])]
    generators += [("Secret", g) for g in k.get("secretGenerator", [])]
    if generators and not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise SubsetError(f"{folder}: generators need generatorOptions.disableNameSuffixHash: true here")
    for kind, generator in generators:
        objects = _generate(folder, kind, generator, objects)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise SubsetError(f"{folder}: only `patches: - path: FILE` is supported, not {patch}")
        for doc in yaml.safe_load_all((folder / patch["path"]).read_text()):
            (target,) = [o for o in objects if _key(o) == _key(doc)] or [None]
            if target is None:
                raise SubsetError(f"{folder}: patch {patch['path']} targets {_key(doc)}, which is not there")
            _merge(target, doc)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        if set(image) - IMAGE_FIELDS:
            raise SubsetError(f"{folder}: image fields {sorted(set(image) - IMAGE_FIELDS)} not supported")
        for obj in objects:
            _set_image(obj, image)
    return objects


def _generate(folder: Path, kind: str, generator: Obj, objects: list[Obj]) -> list[Obj]:
    if set(generator) - GENERATOR_FIELDS:
        unknown = sorted(set(generator) - GENERATOR_FIELDS)
        raise SubsetError(f"{folder}: generator fields {unknown} are not supported")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
        content = (folder / source).read_bytes()
        key = key or Path(source).name
        data[key] = base64.b64encode(content).decode() if kind == "Secret" else content.decode()
    for entry in generator.get("literals", []):
        key, _, value = entry.partition("=")
        data[key] = base64.b64encode(value.encode()).decode() if kind == "Secret" else value
    existing = [o for o in objects if _key(o) == (kind, generator["name"])]
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        if existing:
            raise SubsetError(f"{folder}: {kind} {generator['name']} exists; use behavior merge or replace")
        obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}, "data": data}
        if kind == "Secret":
            obj["type"] = generator.get("type", "Opaque")
        return [*objects, obj]
    if not existing:
        raise SubsetError(f"{folder}: {kind} {generator['name']} to {behavior} does not exist")
    if behavior == "replace":
        existing[0]["data"] = data
    elif behavior == "merge":
        existing[0].setdefault("data", {}).update(data)
    else:
        raise SubsetError(f"{folder}: generator behavior {behavior!r} not supported")
    return objects


def _merge(target: Obj, patch: Obj) -> None:
    """Strategic merge: maps merge, null deletes, MERGE_KEYS lists merge by key, other lists replace."""
    for key, value in patch.items():
        if key.startswith("$"):
            raise SubsetError(f"patch directive {key} not supported")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(target.get(key), list):
            merge_key = MERGE_KEYS[key]
            added = []
            for item in value:
                match = [t for t in target[key] if t.get(merge_key) == item.get(merge_key)]
                if match:
                    _merge(match[0], item)
                else:
                    added.append(copy.deepcopy(item))
            # As kustomize does: items new to the list come first, in the patch's order.
            target[key][:0] = added
        else:
            target[key] = copy.deepcopy(value)


def _split_image(image: str) -> tuple[str, str, str]:
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_image(obj: Obj, image: Obj) -> None:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        name, tag, digest = _split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        tag = image.get("newTag", tag)
        digest = image.get("digest", digest)
        reference = f"{name}@{digest}" if digest else (f"{name}:{tag}" if tag else name)
        container["image"] = reference
