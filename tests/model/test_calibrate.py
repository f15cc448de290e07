"""``tfshield calibrate``: detectors fitted against the real model server, written as
artefacts the gateway loads, with thresholds that hold on held-out data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from detectors.manifest import load_artefacts
from gateway.model.calibrate import (
    CalibrationError,
    ReferenceSplit,
    calibrate,
    load_reference,
    main,
    next_version,
    parse_args,
    saved_model_function,
)
from tests.gateway.detect_fixtures import *  # noqa: F403  (the session fixtures)
from tests.gateway.detect_fixtures import AUTOENCODER, MODEL, TARGET_FPR

# -- reference data (no server) ----------------------------------------------------


def test_split_is_seeded_disjoint_and_sized_by_fraction() -> None:
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    split = ReferenceSplit.from_array(x, (0.5, 0.25, 0.25), seed=3)
    again = ReferenceSplit.from_array(x, (0.5, 0.25, 0.25), seed=3)
    other = ReferenceSplit.from_array(x, (0.5, 0.25, 0.25), seed=4)
    assert split.sizes() == {"fit": 500, "calibration": 250, "heldout": 250}
    assert np.array_equal(split.fit, again.fit) and not np.array_equal(split.fit, other.fit)
    everything = np.concatenate([split.fit, split.calibration, split.heldout]).ravel()
    assert sorted(everything.tolist()) == list(range(1000))


def test_too_few_reference_samples_are_refused() -> None:
    with pytest.raises(CalibrationError) as raised:
        ReferenceSplit.from_array(np.zeros((5, 2)), (0.5, 0.25, 0.25))
    assert str(raised.value) == (
        "5 reference samples are too few to split [0.5, 0.25, 0.25]: every part needs at least 2"
    )


def test_reference_without_x_says_how_to_save_it(tmp_path: Path) -> None:
    path = tmp_path / "ref.npz"
    np.savez(path, images=np.zeros((3, 2)))
    with pytest.raises(CalibrationError) as raised:
        load_reference(path)
    assert str(raised.value) == (
        f"{path}: no array named 'x' (found: images); save the reference inputs with np.savez(path, x=inputs)"
    )


def test_next_version_follows_the_largest_numeric_version(tmp_path: Path) -> None:
    assert next_version(tmp_path / "absent") == 1
    for name in ("1", "7", "training.json", "tmp"):
        (tmp_path / name).mkdir()
    assert next_version(tmp_path) == 8


def test_autoencoder_without_a_base_path_is_refused_before_any_work(reference) -> None:
    with pytest.raises(CalibrationError) as raised:
        calibrate(MODEL, reference, "127.0.0.1:1", "unused", detectors=["autoencoder"], log=lambda line: None)
    assert str(raised.value) == (
        "the autoencoder detector(s) need a model base path to export the trained autoencoder to (it is "
        "served as 'mnist_autoencoder' beside 'mnist'): pass --autoencoder-model-base-path (or "
        "--model-base-path), or leave autoencoder out of --detectors"
    )


def test_unknown_detector_lists_the_known_ones(reference) -> None:
    from detectors.base import DetectorError

    with pytest.raises(
        DetectorError, match="unknown detector 'magic'; known: autoencoder, feature_squeezing"
    ):
        calibrate(MODEL, reference, "127.0.0.1:1", "unused", detectors=["magic"], log=lambda line: None)


def test_fusion_alone_must_name_fused_detectors(reference) -> None:
    with pytest.raises(CalibrationError) as raised:
        calibrate(
            MODEL,
            reference,
            "127.0.0.1:1",
            "unused",
            detectors=["validation", "mahalanobis", "margin"],
            fusion_target_fpr=0.02,
            fusion_alone=["validation"],
            log=lambda line: None,
        )
    assert str(raised.value) == (
        "--fusion-alone names detectors that are not fused: ['validation']; fused: mahalanobis, margin"
    )


def test_fusion_alone_is_read_as_a_comma_separated_list_and_empty_means_none() -> None:
    base = ["--model", MODEL, "--from-demo", "--out", "unused", "--upstream", "127.0.0.1:1"]
    assert parse_args(base).fusion_alone is None  # the default: margin, when it is fused
    assert parse_args([*base, "--fusion-alone", "margin, mahalanobis"]).fusion_alone == (
        "margin",
        "mahalanobis",
    )
    assert parse_args([*base, "--fusion-alone", ""]).fusion_alone == ()


# -- against the real model server ------------------------------------------------------


def test_manifest_names_the_model_its_input_output_and_detectors(calibration) -> None:
    manifest, detectors = load_artefacts(calibration.out)
    assert (manifest.model, manifest.input, manifest.output) == ("mnist", "images", "probabilities")
    assert manifest.detectors == (
        "validation",
        "mahalanobis",
        "feature_squeezing",
        "autoencoder",
        "margin",
        "magnet_jsd",
    )
    assert manifest.fusion == ""  # no fusion unless asked for
    assert detectors["magnet_jsd"].autoencoder_model == AUTOENCODER
    assert detectors["margin"].output == "probabilities"
    assert manifest.target_fpr == TARGET_FPR
    assert manifest.heldout_fpr == {name: float(f.mean()) for name, f in calibration.heldout_flagged.items()}
    assert detectors["autoencoder"].model_name == AUTOENCODER


def test_validator_comes_from_the_models_signature(calibration) -> None:
    validator = calibration.detectors["validation"]
    assert (validator.dtype, validator.shape) == ("float32", (28, 28, 1))
    assert (float(validator.low_[0]), float(validator.high_[0])) == (0.0, 1.0)


def test_reloaded_detectors_score_bit_identically(calibration, reference, upstream_predictor) -> None:
    manifest, loaded = load_artefacts(calibration.out)
    x = np.concatenate([reference.heldout[:48], np.random.default_rng(0).random((16, 28, 28, 1), np.float32)])
    for name, fitted in calibration.detectors.items():
        predictor = upstream_predictor if fitted.needs_predictor else None
        assert loaded[name].get_params() == fitted.get_params(), name
        assert loaded[name].threshold_ == fitted.threshold_, name
        assert np.array_equal(loaded[name].score(x, predictor), fitted.score(x, predictor)), name


def test_thresholds_hit_the_target_fpr_on_held_out_data(calibration, reference) -> None:
    """Within 3 binomial standard deviations, counting both the calibration and held-out parts' error."""
    n_calibration, n_heldout = len(reference.calibration), len(reference.heldout)
    sigma = math.sqrt(TARGET_FPR * (1 - TARGET_FPR) * (1 / n_calibration + 1 / n_heldout))
    for name, flagged in calibration.heldout_flagged.items():
        fpr = float(flagged.mean())
        if name == "validation":  # a rule, not a score: benign digits never break it
            assert fpr == 0.0
        else:
            assert abs(fpr - TARGET_FPR) <= 3 * sigma, f"{name}: held-out FPR {fpr:.4f}, target {TARGET_FPR}"


def test_autoencoder_is_exported_as_the_first_version_beside_the_model(
    calibration, detect_model_base
) -> None:
    assert calibration.autoencoder_export == detect_model_base / AUTOENCODER / "1"
    assert (calibration.autoencoder_export / "saved_model.pb").is_file()


def test_the_served_autoencoder_reproduces_the_calibration_scores(
    calibration, reference, upstream_predictor
) -> None:
    """Calibration ran the exported SavedModel in process; the model server runs the same graph."""
    detector = calibration.detectors["autoencoder"]
    in_process = saved_model_function(calibration.autoencoder_export, "images", "reconstruction")
    x = reference.heldout[:200]
    local = detector.score(x, lambda _model, batch: in_process(batch))
    served = detector.score(x, upstream_predictor)
    np.testing.assert_allclose(served, local, rtol=1e-5)
    assert np.array_equal(served > detector.threshold_, local > detector.threshold_)


def test_unknown_model_says_the_server_does_not_serve_it(model_server, reference, tmp_path) -> None:
    with pytest.raises(CalibrationError) as raised:
        calibrate(
            "nope", reference, model_server.address(), tmp_path, detectors=["validation"], log=lambda _: None
        )
    assert str(raised.value) == (
        f"cannot read the signature of model 'nope' at {model_server.address()}: NOT_FOUND: "
        "Servable not found for request: Latest(nope); is the model server up and serving it?"
    )


def test_cli_calibrates_from_a_reference_file(model_server, model_cache_dir, tmp_path, capsys) -> None:
    from gateway.model.demo import DemoArtifacts

    out = tmp_path / "artefacts"
    argv = [
        "--model", "mnist", "--reference", str(DemoArtifacts.at(model_cache_dir).validation_npz),
        "--out", str(out), "--upstream", model_server.address(), "--target-fpr", "0.05",
        "--detectors", "validation,mahalanobis,feature_squeezing",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reference data: 250 fit, 125 calibration, 125 held-out samples" in printed
    assert "feature_squeezing" in printed and f"artefacts: {out}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["detectors"] == ["validation", "mahalanobis", "feature_squeezing"]
    assert sorted(manifest["heldout_fpr"]) == ["feature_squeezing", "mahalanobis", "validation"]


def test_a_fusion_is_calibrated_on_the_calibration_part_saved_and_reloaded(
    model_server, reference, tmp_path
) -> None:
    from detectors.manifest import load_fusion

    result = calibrate(
        MODEL,
        reference,
        model_server.address(),
        tmp_path / "fused",
        target_fpr=TARGET_FPR,
        detectors=["validation", "mahalanobis", "margin"],
        fusion_target_fpr=TARGET_FPR,
        log=lambda line: None,
    )
    manifest, _ = load_artefacts(tmp_path / "fused")
    fusion = load_fusion(tmp_path / "fused", manifest)
    assert manifest.fusion == "fisher" and fusion is not None
    assert fusion.members == ("mahalanobis", "margin")
    assert fusion.alone == ("margin",)  # by default, margin may flag by its own p-value
    assert fusion.part_thresholds_ == result.fusion.part_thresholds_
    assert (fusion.threshold_, fusion.target_fpr_) == (1.0, TARGET_FPR)
    flagged = result.heldout_flagged["fisher"]
    assert manifest.heldout_fpr["fisher"] == float(flagged.mean())
    n_calibration, n_heldout = len(reference.calibration), len(reference.heldout)
    sigma = math.sqrt(TARGET_FPR * (1 - TARGET_FPR) * (1 / n_calibration + 1 / n_heldout))
    assert abs(float(flagged.mean()) - TARGET_FPR) <= 3 * sigma
    # The gateway's verdict with a fusion: the fusion's or validation's, not any detector's.
    assert np.array_equal(result.combined_flagged, flagged | result.heldout_flagged["validation"])
