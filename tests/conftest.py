"""Session-wide fixtures: the SavedModels every end-to-end test serves, and the
reference model server serving them.

The models are built once and cached across test runs in ``$TFSHIELD_CACHE``,
else ``<repo>/.cache/tfshield`` (gitignored): the demo CNN (about 15 s of
training the first time) and the small deterministic test models. Building
happens in a subprocess, so the test process never imports Keras.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import REPO, Proc, start, tfshield_argv

CACHE_DIR = Path(os.environ.get("TFSHIELD_CACHE") or REPO / ".cache" / "tfshield")

_BUILD_MODELS = """
import sys
from gateway.model.demo import train_demo_model
from gateway.model.testmodels import build_test_models_cached
train_demo_model(sys.argv[1])
build_test_models_cached(sys.argv[1])
"""


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The cache holding the trained demo model and the test models (built here if missing)."""
    from gateway.model.demo import DemoArtifacts
    from gateway.model.testmodels import TEST_MODELS_RECIPE

    test_models_ready = (CACHE_DIR / TEST_MODELS_RECIPE / "echo" / "1" / "saved_model.pb").is_file()
    if not (DemoArtifacts.at(CACHE_DIR).is_complete() and test_models_ready):
        result = subprocess.run(
            [sys.executable, "-c", _BUILD_MODELS, str(CACHE_DIR)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"building the test models failed:\n{result.stdout}\n{result.stderr}")
    return CACHE_DIR


@pytest.fixture(scope="session")
def model_dir(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base path holding ``mnist`` (demo CNN), ``echo`` and ``classifier`` (versions 1, 2).

    The entries are symlinks into the cache, so nothing is copied.
    """
    from gateway.model.demo import DemoArtifacts
    from gateway.model.testmodels import TEST_MODELS_RECIPE

    base = tmp_path_factory.mktemp("models")
    sources = [DemoArtifacts.at(model_cache_dir).model_base_path, model_cache_dir / TEST_MODELS_RECIPE]
    for source in sources:
        for model in source.iterdir():
            if model.is_dir():
                (base / model.name).symlink_to(model.resolve(), target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def model_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The reference model server on an ephemeral port, serving ``model_dir``."""
    argv = tfshield_argv("model-server", "--model-base-path", str(model_dir), "--port", "0")
    proc = start(argv, tmp_path_factory.mktemp("model-server"), "model-server")
    yield proc
    proc.stop()
