"""The exceptions that the engine raises.

Every exception here derives from `EngineError`. The subclasses follow what
the caller does next: fix the input (`PipelineError`, `RecipeError`,
`ParameterError`), or retry later (`StreamUnavailableError`).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error that the engine raises on purpose."""


class PipelineError(EngineError):
    """A pipeline definition is invalid; fix the pipeline file."""


class ParameterError(EngineError):
    """A run parameter is missing or invalid; fix the `-p KEY=VALUE` options."""


class RecipeError(EngineError):
    """A node's recipe cannot be built or loaded on this host."""


class StreamError(EngineError):
    """A data stream operation failed."""


class StreamUnavailableError(StreamError):
    """The data stream cannot be reached; retry later or start the broker."""


class ProtocolError(EngineError):
    """An MMOP peer sent a frame or message that breaks the protocol."""


class AuthenticationError(ProtocolError):
    """An MMOP peer failed the shared-secret handshake."""
