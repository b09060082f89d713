"""The byte-level tokenizer of the built-in ``tiny-random`` model.

Token id ``i`` is byte ``i`` for ``i`` in ``0..255``; three special tokens follow: ``<s>`` (256, BOS),
``</s>`` (257, EOS) and ``<pad>`` (258). The tokenizer is a real ``tokenizers`` pipeline, so it is
saved as an ordinary ``tokenizer.json`` and loads through :meth:`pdserve.engine.tokenizer.Tokenizer.from_dir`
and through ``transformers`` alike:

* vocabulary strings use the GPT-2 byte-to-unicode alphabet (each byte maps to one printable char);
* the model is BPE with exactly this 256-entry vocabulary and no merges, so every byte is one token;
* a ``ByteLevel`` pre-tokenizer (no prefix space) maps UTF-8 bytes to that alphabet and a ``ByteLevel``
  decoder maps them back, so ``decode(encode(text, add_special_tokens=False)) == text`` for any text
  (emoji, CJK, combining marks, whitespace), as long as it does not contain the literal special-token
  strings ``<s>``, ``</s>``, ``<pad>`` (those encode to the special ids, as in every HF tokenizer);
* a ``TemplateProcessing`` post-processor prepends ``<s>`` when ``add_special_tokens=True``.

Because every multi-byte character is split over several tokens, this tokenizer is also the worst
case for incremental detokenization, which makes it useful in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BYTE_VOCAB_SIZE = 259
"""256 byte tokens plus ``<s>``, ``</s>`` and ``<pad>``."""

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"

MODEL_MAX_LENGTH = 4096
"""Written to tokenizer_config.json; matches the tiny model's ``max_position_embeddings``."""

CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""A plain-text chat format: ``<s>``, then ``<|role|>\\n{content}\\n`` per message, then
``<|assistant|>\\n`` when a generation prompt is requested. The role markers are ordinary text
(bytes), not extra tokens."""


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-unicode table: a bijection from the 256 byte values to printable characters.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to themselves; the other 68
    bytes map, in increasing byte order, to ``chr(256)``, ``chr(257)``, ... so no vocabulary string
    holds whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def build_byte_tokenizer() -> Tokenizer:
    """Build the byte tokenizer in memory (see the module docstring for its exact layout).

    Postcondition: ``get_vocab_size(with_added_tokens=True) == BYTE_VOCAB_SIZE``, byte ``i`` encodes to
    id ``i``, and the special tokens have ids :data:`BOS_ID`, :data:`EOS_ID`, :data:`PAD_ID`.
    """
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    added = tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)]
    )
    ids = [tokenizer.token_to_id(tok) for tok in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)]
    if added != 3 or ids != [BOS_ID, EOS_ID, PAD_ID]:  # pragma: no cover - guards a tokenizers change
        raise RuntimeError(f"byte tokenizer: special tokens got ids {ids}, expected {[BOS_ID, EOS_ID, PAD_ID]}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tokenizer


def write_byte_tokenizer(directory: Path, *, model_max_length: int = MODEL_MAX_LENGTH) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of the byte tokenizer into ``directory``.

    The directory must exist. The files are loadable by :meth:`Tokenizer.from_dir
    <pdserve.engine.tokenizer.Tokenizer.from_dir>` and by ``transformers``' ``AutoTokenizer`` /
    ``PreTrainedTokenizerFast``. Existing files of those names are overwritten.
    """
    directory = Path(directory)
    build_byte_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
