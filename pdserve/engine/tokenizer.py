"""The engine's tokenizer: a thin, typed wrapper around a ``tokenizers.Tokenizer`` plus the metadata
a Hugging Face model directory keeps next to it (special tokens, EOS ids, chat template).

Only the ``tokenizers`` library is used at run time; ``transformers`` is not needed (the tests use it
to cross-check that both read the same files the same way).

Files read by :meth:`Tokenizer.from_dir`:

* ``tokenizer.json`` (required) -- the full tokenizer pipeline;
* ``tokenizer_config.json`` (optional) -- ``bos_token``, ``eos_token`` (a string or an
  ``{"content": ...}`` dict), ``chat_template`` (a string, or a list of ``{"name", "template"}`` of
  which ``"default"`` is used); ``add_bos_token`` / ``add_eos_token`` are informational only, since
  the ``tokenizer.json`` post-processor decides what ``add_special_tokens=True`` adds;
* ``chat_template.jinja`` or ``chat_template.json`` (optional) -- where newer ``transformers`` versions
  save the chat template; used only when tokenizer_config.json has none;
* ``generation_config.json`` (optional) -- ``eos_token_id`` (an int or a list);
* ``config.json`` (optional) -- ``eos_token_id`` / ``bos_token_id`` (an int or a list).

The EOS ids are the union, in this order and without duplicates, of generation_config's
``eos_token_id``, the id of tokenizer_config's ``eos_token`` and config.json's ``eos_token_id``.
A ``bos_token`` missing from tokenizer_config.json falls back to config.json's ``bos_token_id``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pdserve.common.errors import InvalidParameterError, ModelLoadError


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Thread-safety: all methods are read-only on the wrapped ``tokenizers.Tokenizer`` (which must not
    have padding/truncation enabled), so one instance can be shared by threads.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
        source: str,
        eos_token: str | None = None,
    ) -> None:
        """Wrap ``tokenizer``.

        ``bos_token`` is the BOS token's text (``None`` when the model has none); ``bos_token_id`` is
        its id, or ``None`` when it is not in the vocabulary. ``eos_token_ids`` are every id that ends generation. ``eos_token`` is the text
        given to chat templates as ``eos_token``; it defaults to the text of the first EOS id.
        ``source`` names where the tokenizer came from, for error messages.
        """
        self._tok = tokenizer
        self.source = source
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = bos_token
        self.bos_token_id: int | None = tokenizer.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        if eos_token is None and self.eos_token_ids:
            eos_token = tokenizer.id_to_token(self.eos_token_ids[0])
        self.eos_token: str | None = eos_token
        self.chat_template: str | None = chat_template
        self.special_token_ids: frozenset[int] = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )
        # Whether encode(..., add_special_tokens=True) puts BOS first (decided by the post-processor).
        bos_first = tokenizer.encode("", add_special_tokens=True).ids[:1]
        self._adds_bos = self.bos_token_id is not None and bos_first == [self.bos_token_id]

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the Hugging Face model directory ``path`` (see the module docstring).

        Raises :class:`ModelLoadError` naming the file when ``tokenizer.json`` is missing or cannot be
        parsed, or when an optional JSON file is malformed or holds an entry of the wrong type.
        """
        directory = Path(path)
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(
                f"{tok_file}: not found; expected a Hugging Face tokenizer.json in the model directory "
                f"{directory} (slow sentencepiece-only tokenizers are not supported)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises bare Exception subclasses for parse errors
            raise ModelLoadError(f"{tok_file}: cannot be parsed as a tokenizers tokenizer.json: {exc}") from exc
        tok.no_padding()
        tok.no_truncation()

        tok_config = _read_json(directory / "tokenizer_config.json")
        gen_config = _read_json(directory / "generation_config.json")
        model_config = _read_json(directory / "config.json")

        bos_token = _token_text(tok_config.get("bos_token"), directory / "tokenizer_config.json", "bos_token")
        if bos_token is None:
            bos_ids = _id_list(model_config.get("bos_token_id"), directory / "config.json", "bos_token_id")
            if bos_ids:
                bos_token = tok.id_to_token(bos_ids[0])

        eos_token = _token_text(tok_config.get("eos_token"), directory / "tokenizer_config.json", "eos_token")
        eos_ids = _id_list(gen_config.get("eos_token_id"), directory / "generation_config.json", "eos_token_id")
        eos_id = tok.token_to_id(eos_token) if eos_token is not None else None
        if eos_id is not None:  # an eos_token missing from the vocabulary contributes no id
            eos_ids.append(eos_id)
        eos_ids += _id_list(model_config.get("eos_token_id"), directory / "config.json", "eos_token_id")

        chat_template = _chat_template(tok_config.get("chat_template"), directory / "tokenizer_config.json")
        if chat_template is None:
            chat_template = _standalone_chat_template(directory)
        return cls(tok, bos_token=bos_token, eos_token_ids=eos_ids, chat_template=chat_template,
                   source=str(directory), eos_token=eos_token)

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` lets the post-processor add BOS etc."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; special tokens are dropped when ``skip_special_tokens``.

        Bytes that do not form complete UTF-8 characters decode to U+FFFD; ids outside the
        vocabulary are ignored (``tokenizers`` behaviour).
        """
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Decoded text of the single token ``token_id`` (special tokens included), for logprob display.

        A token holding only part of a multi-byte character shows as U+FFFD.
        """
        return self._tok.decode([token_id], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary string of ``token_id`` (e.g. ``'Ġthe'``), or ``None`` if out of range."""
        return self._tok.id_to_token(token_id)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> str:
        """Render ``messages`` with ``chat_template`` (default: the model's own template).

        The template is Jinja2, run in an immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``;
        it sees ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token`` (strings, ``""``
        when the model has none) and may call ``raise_exception(msg)`` and ``strftime_now(fmt)``.

        Raises :class:`InvalidParameterError`: field ``"chat_template"`` when there is no template or it
        does not compile; field ``"messages"`` when a message is not a mapping with string ``role`` and
        ``content``, or when rendering fails (including the template's own ``raise_exception``).
        """
        template_text = chat_template if chat_template is not None else self.chat_template
        if template_text is None:
            raise InvalidParameterError(
                "chat_template",
                f"the model at {self.source} has no chat template (no chat_template in "
                f"tokenizer_config.json); pass chat_template=... explicitly",
            )
        _check_messages(messages)
        template = _compile(template_text)
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except _TemplateRaised as exc:
            raise InvalidParameterError("messages", f"the chat template rejected the messages: {exc}") from exc
        except Exception as exc:
            raise InvalidParameterError(
                "messages", f"rendering the chat template failed: {type(exc).__name__}: {exc}"
            ) from exc

    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
    ) -> list[int]:
        """Render ``messages`` (see :meth:`apply_chat_template`) and encode the text, with exactly one BOS.

        If the rendered text already starts with the BOS token, it is encoded without special tokens.
        Otherwise BOS is prepended only if the tokenizer's post-processor would add one; nothing else
        the post-processor might add (an EOS, say) is added, since the prompt continues with the reply.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        chat_template=chat_template)
        ids = self.encode(text, add_special_tokens=False)
        if self._adds_bos and self.bos_token and not text.startswith(self.bos_token):
            assert self.bos_token_id is not None
            ids.insert(0, self.bos_token_id)
        return ids

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos_token_id={self.bos_token_id}, eos_token_ids={self.eos_token_ids})")


# ---------------------------------------------------------------------- helpers


class _TemplateRaised(jinja2.TemplateError):
    """Raised by a chat template's ``raise_exception(msg)``."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """JSON without HTML escaping (Jinja's built-in ``tojson`` escapes ``<``, ``>``, ``&``, ``'``)."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(template_text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template_text)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidParameterError(
            "chat_template", f"not a valid Jinja2 template: {exc.message} (line {exc.lineno})"
        ) from exc


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise InvalidParameterError("messages", f"must be a list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameterError("messages", f"message {i} must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise InvalidParameterError("messages", f"message {i} has no {key!r}")
            if not isinstance(message[key], str):
                raise InvalidParameterError(
                    "messages", f"message {i}: {key!r} must be a string, got {type(message[key]).__name__}"
                )


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, ``{}`` if the file does not exist; ModelLoadError if malformed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _token_text(value: Any, path: Path, key: str) -> str | None:
    """A special token entry: ``None``, a string, or an AddedToken dict ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelLoadError(f"{path}: {key} must be a string or an object with a 'content' string, got {value!r}")


def _id_list(value: Any, path: Path, key: str) -> list[int]:
    """A token-id entry: ``None``, an int or a list of ints, as a list."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ModelLoadError(f"{path}: {key} must be an integer or a list of integers, got {value!r}")
    return list(items)


def _chat_template(value: Any, path: Path) -> str | None:
    """tokenizer_config's ``chat_template``: a string, or a list of named templates (use ``default``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ModelLoadError(f"{path}: chat_template list entries must be {{'name': str, 'template': str}}")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            return None
        return named["default"]
    raise ModelLoadError(f"{path}: chat_template must be a string or a list of named templates, got {type(value).__name__}")


def _standalone_chat_template(directory: Path) -> str | None:
    """The template in ``chat_template.jinja``, else in ``chat_template.json``, else ``None``."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja_file}: cannot be read as UTF-8 text: {exc}") from exc
    json_file = directory / "chat_template.json"
    return _chat_template(_read_json(json_file).get("chat_template"), json_file)
