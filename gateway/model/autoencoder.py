"""MagNet's MNIST autoencoder: trained on benign digits, exported for TF Serving.

Paper: Meng & Chen, "MagNet: a Two-Pronged Defense against Adversarial
Examples", CCS 2017. Its MNIST detector I is a small convolutional
autoencoder with sigmoid activations (the paper's Table 1, "Detector I &
Reformer" column; ``defensive_models.py`` structure ``[3, "average", 3]``):

    Conv 3×3×3 sigmoid → AveragePooling 2×2 → Conv 3×3×3 sigmoid      (encoder)
    Conv 3×3×3 sigmoid → UpSampling 2×2 → Conv 3×3×3 sigmoid → Conv 3×3×1 sigmoid   (decoder)

trained with mean squared error on benign images to which Gaussian noise
(σ = ``noise``, MagNet's "noise volume" 0.1) is added, with an L2 weight
penalty of 1e-9, Adam. MagNet trains 100 epochs on 55,000 digits; here 10
epochs on the 3,500 bundled training digits (Adam at 1e-2, batches of 32)
take about 12 s on 2 shared CPU cores and reach a validation reconstruction
MSE of about 0.003. Sigmoid autoencoders sit on a plateau (a constant grey
output, MSE ≈ 0.097) for the first few hundred steps: with Adam at 3e-3 and
batches of 64 it took 8 epochs to leave it, hence the larger rate and smaller
batches.

The gateway never imports this module (it imports TensorFlow): ``tfshield
calibrate`` trains the autoencoder and exports it beside the protected model,
and the gateway reaches it over gRPC like any other model.

Exported signature ``serving_default``: input ``images`` float32
``[-1, 28, 28, 1]`` in [0, 1] → output ``reconstruction`` float32
``[-1, 28, 28, 1]`` in (0, 1).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gateway.model.data import IMAGE_SHAPE

DEFAULT_NAME = "mnist_autoencoder"
INPUT_NAME = "images"
OUTPUT_NAME = "reconstruction"
DEFAULT_EPOCHS = 10
DEFAULT_SEED = 0
NOISE = 0.1
WEIGHT_DECAY = 1e-9
LEARNING_RATE = 1e-2
BATCH_SIZE = 32


def build_autoencoder() -> Any:
    """The untrained MagNet MNIST detector-I autoencoder (a ``keras.Sequential``)."""
    import keras

    def conv(filters: int) -> Any:
        return keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="sigmoid",
            kernel_regularizer=keras.regularizers.L2(WEIGHT_DECAY),
        )

    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE, name=INPUT_NAME),
            conv(3),
            keras.layers.AveragePooling2D(2),
            conv(3),
            conv(3),
            keras.layers.UpSampling2D(2),
            conv(3),
            conv(1),
        ],
        name=DEFAULT_NAME,
    )


def train_autoencoder(
    x_train: np.ndarray,
    x_val: np.ndarray,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    noise: float = NOISE,
) -> Any:
    """Train the autoencoder on benign images ``x_train`` ((n, 28, 28, 1) float32 in [0, 1]).

    ``x_val`` is only evaluated, never trained on: its reconstruction mean
    squared error is left on the model as ``validation_mse_``. Seeded: the
    same data, epochs and seed give the same weights on the same machine.
    Returns the trained ``keras.Model``.
    """
    import keras

    x_train = np.asarray(x_train, dtype=np.float32)
    x_val = np.asarray(x_val, dtype=np.float32)
    keras.utils.set_random_seed(seed)
    model = build_autoencoder()
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
    # MagNet trains on noisy inputs to clean targets (a denoising autoencoder),
    # the noise drawn once before training as in its code.
    rng = np.random.default_rng(seed)
    noisy = np.clip(x_train + rng.normal(0.0, noise, x_train.shape).astype(np.float32), 0.0, 1.0)
    model.fit(noisy, x_train, epochs=epochs, batch_size=BATCH_SIZE, shuffle=True, verbose=0)
    model.validation_mse_ = float(model.evaluate(x_val, x_val, batch_size=256, verbose=0))
    return model


def export_autoencoder(
    model: Any, base_dir: str | os.PathLike[str], name: str = DEFAULT_NAME, version: int = 1
) -> Path:
    """Export ``model`` as a SavedModel for TF Serving at ``base_dir/name/version``; returns that path.

    Signature ``serving_default``: ``images`` float32 [-1, 28, 28, 1] →
    ``reconstruction`` float32 [-1, 28, 28, 1]. An existing export of the same
    version is replaced.
    """
    import tensorflow as tf

    export_dir = Path(base_dir) / name / str(version)

    class Autoencoder(tf.Module):
        def __init__(self, keras_model: Any) -> None:
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.float32, name=INPUT_NAME)])
        def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            return {OUTPUT_NAME: self.model(images, training=False)}

    module = Autoencoder(model)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.serve})
    return export_dir
