"""tfshield: an inference-time security gateway for TensorFlow Serving.

The gateway package never imports TensorFlow (DESIGN.md, decision 1); the
model-side tools that need it live in :mod:`gateway.model` and are imported
only by their own subcommands.
"""

__version__ = "0.1.0"
