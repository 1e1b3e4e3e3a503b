"""Exceptions whose message is the one line a user sees (the CLI prints it and exits 1)."""


class DispersionError(Exception):
    """Base class: bad input or a failed precondition, with a one-line message."""


class ConfigError(DispersionError):
    """A run config is missing, malformed or invalid; the message names the field."""


class DataError(DispersionError):
    """A dataset, text field or sampling request cannot be satisfied."""


class ModelError(DispersionError):
    """A model path, hub id or revision cannot be loaded, or does not fit the request."""


class NonFiniteError(DispersionError):
    """A perplexity or hidden state came out NaN or infinite."""
