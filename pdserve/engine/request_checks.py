"""What the engine checks of a request before it is queued, and when a sampled token ends it.

Pure functions over the engine's limits (vocabulary, ``max_model_len``) and the request: every failure
is an :class:`~pdserve.common.errors.InvalidParameterError` or
:class:`~pdserve.common.errors.PromptTooLongError` naming the field, raised before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.common.errors import InvalidParameterError, PromptTooLongError
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, vocab_size: int, max_model_len: int, prompt: str | None,
                  prompt_token_ids: Sequence[int] | None) -> list[int]:
    """Validate a prompt (text xor token ids) and return its token ids."""
    if (prompt is None) == (prompt_token_ids is None):
        raise InvalidParameterError("prompt", "give exactly one of a prompt text or prompt token ids")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidParameterError("prompt", f"must be a string, got {type(prompt).__name__}")
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt_token_ids)  # type: ignore[arg-type]
        check_token_ids("prompt_token_ids", ids, vocab_size)
    if not ids:
        raise InvalidParameterError("prompt", "the prompt is empty")
    if len(ids) >= max_model_len:
        raise PromptTooLongError(len(ids), max_model_len)
    return ids


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int) -> None:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidParameterError(field, f"token id {t!r} is outside the vocabulary [0, {vocab_size})")


def check_resume(ids: list[int], params: SamplingParams, resumed: list[int], remote: bool, vocab_size: int,
                 max_model_len: int) -> list[int]:
    """``resumed`` (output a lost worker already generated), checked against the prompt ``ids``."""
    if not resumed:
        return resumed
    if remote:
        raise InvalidParameterError("resume_token_ids", "a resumed request is computed on the worker that "
                                    "resumes it, never prefilled remotely")
    check_token_ids("resume_token_ids", resumed, vocab_size)
    if params.max_tokens is not None and len(resumed) >= params.max_tokens:
        raise InvalidParameterError("resume_token_ids", f"{len(resumed)} tokens already reach max_tokens "
                                    f"({params.max_tokens})")
    if len(ids) + len(resumed) >= max_model_len:
        raise PromptTooLongError(len(ids) + len(resumed), max_model_len)
    return resumed


def stop_status(request: Request, token_id: int, stop_string: str | None, eos_token_ids: Sequence[int],
                max_model_len: int) -> RequestStatus | None:
    """How ``request`` ends now that ``token_id`` was appended (``stop_string``: the stop string the
    detokenizer matched), or ``None`` if it goes on; sets ``request.stop_reason`` where one applies."""
    params = request.params
    if stop_string is not None:
        request.stop_reason = stop_string
        return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens > params.min_tokens:  # the sampler blocks EOS/stop ids before
        if not params.ignore_eos and token_id in eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= params.max_tokens or request.num_known_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
