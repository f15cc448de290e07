"""The folder `tfshield calibrate` writes and the gateway loads at start.

Layout::

    DIR/manifest.json        what was calibrated, for which model and input
    DIR/<detector name>/     one folder per detector (Detector.save)

``manifest.json``::

    {"format_version": 1, "model": "mnist", "input": "images",
     "output": "probabilities", "detectors": ["validation", "mahalanobis", ...],
     "target_fpr": 0.01, "heldout_fpr": {"mahalanobis": 0.008, ...},
     "created_unix_s": 1790000000.0, "fusion": "fisher"}

``fusion`` (optional, empty when absent) names a fusion of the detectors'
scores (:mod:`detectors.fusion`) saved in ``DIR/<fusion name>/``.

Plain JSON and ``.npz`` only; nothing is unpickled or evaluated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from detectors.base import ArtefactError, Detector
from detectors.fusion import FisherFusion

MANIFEST = "manifest.json"
MANIFEST_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    model: str
    # The request input the detectors read, and the response output that
    # model-in-the-loop detectors (feature squeezing) read.
    input: str
    output: str
    detectors: tuple[str, ...]
    target_fpr: float
    heldout_fpr: dict[str, float] = field(default_factory=dict)
    created_unix_s: float = 0.0
    # The fusion saved beside the detectors ("fisher"), or "" for none.
    fusion: str = ""
    format_version: int = MANIFEST_FORMAT_VERSION


def write_artefacts(
    directory: str | Path,
    manifest: Manifest,
    detectors: dict[str, Detector],
    fusion: FisherFusion | None = None,
) -> Path:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name, detector in detectors.items():
        detector.save(folder / name)
    if (fusion.name if fusion is not None else "") != manifest.fusion:
        raise ArtefactError(f"the manifest names fusion {manifest.fusion!r}; pass that fusion to write it")
    if fusion is not None:
        unknown = [m for m in fusion.members if m not in detectors]
        if unknown:
            raise ArtefactError(f"fusion '{fusion.name}' fuses detectors that are not saved: {unknown}")
        fusion.save(folder / fusion.name)
    data = asdict(manifest)
    data["detectors"] = list(manifest.detectors)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True))
    return folder


def load_artefacts(directory: str | Path) -> tuple[Manifest, dict[str, Detector]]:
    """Read a calibrated folder; every error names the file and says what to do."""
    folder = Path(directory)
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ArtefactError(
            f"{path}: cannot read ({exc.strerror}); run tfshield calibrate --out {folder}"
        ) from None
    except json.JSONDecodeError as exc:
        raise ArtefactError(f"{path}: not valid JSON ({exc})") from None
    if data.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ArtefactError(
            f"{path}: format_version {data.get('format_version')!r}, this tfshield reads "
            f"{MANIFEST_FORMAT_VERSION}; re-run tfshield calibrate"
        )
    try:
        manifest = Manifest(
            model=str(data["model"]),
            input=str(data["input"]),
            output=str(data["output"]),
            detectors=tuple(str(d) for d in data["detectors"]),
            target_fpr=float(data["target_fpr"]),
            heldout_fpr={str(k): float(v) for k, v in data.get("heldout_fpr", {}).items()},
            created_unix_s=float(data.get("created_unix_s", 0.0)),
            fusion=str(data.get("fusion", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtefactError(f"{path}: missing or malformed field {exc}") from None
    return manifest, {name: Detector.load(folder / name) for name in manifest.detectors}


def load_fusion(directory: str | Path, manifest: Manifest) -> FisherFusion | None:
    """The fusion the manifest names (None when it names none); its members must be its detectors."""
    if not manifest.fusion:
        return None
    if manifest.fusion != FisherFusion.name:
        raise ArtefactError(
            f"{Path(directory) / MANIFEST}: unknown fusion '{manifest.fusion}'; known: {FisherFusion.name}"
        )
    fusion = FisherFusion.load(Path(directory) / manifest.fusion)
    unknown = [m for m in fusion.members if m not in manifest.detectors]
    if unknown:
        raise ArtefactError(
            f"{Path(directory) / manifest.fusion}: fuses detectors the manifest does not list: {unknown}"
        )
    return fusion
