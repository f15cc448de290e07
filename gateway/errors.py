"""The root of tfshield's exceptions. Messages say what to do about the error."""

from __future__ import annotations


class TfshieldError(Exception):
    """Base class of every error tfshield raises on purpose."""


class ConfigError(TfshieldError):
    """A configuration value is missing or wrong; the message names its path."""


class InvalidInput(TfshieldError):
    """A request's input cannot be accepted; maps to INVALID_ARGUMENT.

    ``input_name`` names the offending input so the client can fix it;
    ``reason`` is a short fixed word for metrics labels (never free text).
    """

    def __init__(self, input_name: str, problem: str, reason: str = "malformed") -> None:
        super().__init__(f"input '{input_name}': {problem}")
        self.input_name = input_name
        self.problem = problem
        self.reason = reason
