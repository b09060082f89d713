"""The exception types pdserve raises at its edges.

Every error a user can cause derives from :class:`PdserveError`; the transport layers (gRPC, HTTP)
map these classes to status codes in one place, so the classes carry what the mapping needs (the
offending field for invalid arguments).
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base class of every error pdserve raises on purpose."""


class InvalidParameterError(PdserveError, ValueError):
    """A request or config parameter is out of range. ``field`` names it, so a client can fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownModelError(InvalidParameterError):
    """The request names a model this router does not serve (HTTP 404, as the OpenAI API answers;
    gRPC INVALID_ARGUMENT, as the proto documents)."""

    def __init__(self, requested: str, served: str) -> None:
        super().__init__("model", f"{requested!r} is not served here; this router serves {served!r}")


class PromptTooLongError(InvalidParameterError):
    """The prompt does not fit the model's context (checked before any compute)."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(
            "prompt",
            f"the prompt has {num_prompt_tokens} tokens but the model's context (max_model_len) is "
            f"{max_model_len}; at least one token must remain for the output. Shorten the prompt "
            f"or start the engine with a larger max_model_len.",
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class ModelLoadError(PdserveError):
    """A model directory is missing, broken or holds an architecture pdserve does not support."""


class ConfigError(PdserveError, ValueError):
    """A configuration file or value is invalid. ``key`` is the dotted path of the bad entry."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")
        self.key = key
        self.message = message
        self.source = source


class OutOfCapacityError(PdserveError):
    """A request can never be served by this engine (for example, it needs more KV blocks than exist)."""
