"""The compact embedding every monitor shares: a query as a few dozen numbers.

Monitors compare a query with a client's earlier queries (PRADA's minimum
distance, the stateful k-NN's neighbours). In the raw input space that costs
784 numbers per stored query for MNIST; per-client memory must stay bounded
(100,000 clients in 1 GiB), so the gateway embeds each request once and every
monitor reads ``QueryBatch.embedding``.

Two linear maps, numpy only, both ``z = (x − μ) W`` with ``W`` (d, k):

``pca`` (default)
    ``W`` holds the top-k principal directions of benign reference data, so
    Euclidean distances between embeddings are the distances between the
    inputs' projections onto the digit manifold. Perturbations off the
    manifold (an attacker's noise) shrink, which makes near-duplicate probes
    of one image even closer; what PRADA and the k-NN measure is how queries
    sit relative to each other, not how far from benign they are (that is the
    stateless detectors' job).
``random``
    a seeded Gaussian random projection scaled by 1/sqrt(k)
    (Johnson–Lindenstrauss: pairwise distances kept within 1 ± ε for
    k = O(log n / ε²)); needs no reference data beyond the mean.

The first columns of a PCA embedding carry the most variance, so a monitor
that wants fewer dimensions takes the first ones (``embedding[:, :k]``).

Saved as ``embedding.json`` + ``arrays.npz`` (``allow_pickle=False``), like the
detectors; never pickle.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Self

import numpy as np

from detectors.base import (
    ArtefactError,
    DetectorError,
    NotCalibrated,
    read_artefact_json,
    write_artefact_json,
)

__all__ = ["Embedding"]

FORMAT_VERSION = 1
METHODS = ("pca", "random")


class Embedding:
    """A linear map from flattened inputs (n, d) to (n, k) float32.

    Hyperparameters: ``method`` ("pca" or "random", default "pca"),
    ``n_components`` (k, default 32), ``seed`` (random projection only, default 0).
    Learned by ``fit``: ``mean_`` (d,) float32 and ``components_`` (d, k) float32.
    """

    params = ("method", "n_components", "seed")

    mean_: np.ndarray
    components_: np.ndarray

    def __init__(self, method: str = "pca", n_components: int = 32, seed: int = 0) -> None:
        if method not in METHODS:
            raise DetectorError(f"embedding: method must be one of {', '.join(METHODS)}, got {method!r}")
        if int(n_components) != n_components or n_components < 1:
            raise DetectorError(f"embedding: n_components must be an integer >= 1, got {n_components}")
        self.method = method
        self.n_components = int(n_components)
        self.seed = int(seed)

    def get_params(self) -> dict[str, object]:
        return {p: getattr(self, p) for p in self.params}

    @property
    def fitted(self) -> bool:
        return hasattr(self, "components_")

    @property
    def dims(self) -> int:
        """k, the number of output dimensions (after fit)."""
        return int(self.components_.shape[1])

    @property
    def features(self) -> int:
        """d, the number of input features (after fit)."""
        return int(self.components_.shape[0])

    def fit(self, x_ref: np.ndarray) -> Self:
        n = len(x_ref)
        x = np.asarray(x_ref).reshape(n, -1).astype(np.float64)
        if n < 2:
            raise DetectorError(f"embedding: fit needs at least 2 reference samples, got {n}")
        if not np.all(np.isfinite(x)):
            raise DetectorError("embedding: reference data holds NaN or Inf; clean it first")
        d = x.shape[1]
        mean = x.mean(axis=0)
        if self.method == "pca":
            k = min(self.n_components, n - 1, d)
            _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
            components = vt[:k].T
        else:
            k = self.n_components
            rng = np.random.default_rng(self.seed)
            components = rng.normal(0.0, 1.0 / math.sqrt(k), (d, k))
        self.mean_ = mean.astype(np.float32)
        self.components_ = np.ascontiguousarray(components, dtype=np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Embed a batch: any shape (n, ...) with d features per sample -> (n, k) float32."""
        if not self.fitted:
            raise NotCalibrated("embedding is not fitted; call fit(x_ref) first")
        n = len(x)
        flat = np.asarray(x).reshape(n, math.prod(np.shape(x)[1:]))
        if flat.shape[1] != self.features:
            raise DetectorError(
                f"embedding: samples have {flat.shape[1]} features; it was fitted on {self.features}"
            )
        return (flat.astype(np.float32, copy=False) - self.mean_) @ self.components_

    def fingerprint(self) -> str:
        """A short digest of the learned map: monitors calibrated on one embedding record it."""
        if not self.fitted:
            raise NotCalibrated("embedding is not fitted; call fit(x_ref) first")
        digest = hashlib.blake2b(digest_size=8)
        digest.update(self.mean_.tobytes())
        digest.update(self.components_.tobytes())
        return digest.hexdigest()

    # -- artefacts -----------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        if not self.fitted:
            raise NotCalibrated("embedding is not fitted; call fit(x_ref) before saving")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "arrays.npz", mean_=self.mean_, components_=self.components_)
        meta = {"embedding": self.method, "format_version": FORMAT_VERSION, "params": self.get_params()}
        write_artefact_json(folder / "embedding.json", meta)
        return folder

    @classmethod
    def load(cls, directory: str | Path) -> Embedding:
        folder = Path(directory)
        meta_path = folder / "embedding.json"
        meta = read_artefact_json(meta_path, "embedding metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtefactError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, this tfshield reads "
                f"{FORMAT_VERSION}; re-run tfshield calibrate"
            )
        embedding = cls(**meta["params"])
        try:
            with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
                embedding.mean_ = np.asarray(arrays["mean_"], dtype=np.float32)
                embedding.components_ = np.ascontiguousarray(arrays["components_"], dtype=np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise ArtefactError(f"{folder / 'arrays.npz'}: cannot load arrays: {exc}") from None
        if embedding.mean_.shape != (embedding.components_.shape[0],):
            raise ArtefactError(f"{folder / 'arrays.npz'}: mean_ and components_ shapes disagree")
        return embedding
