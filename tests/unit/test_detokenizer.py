"""Tests of pdserve.engine.detokenizer.IncrementalDetokenizer.

Key property: streaming the output ids one at a time (or in chunks) and concatenating every delta
gives exactly ``tokenizer.decode(output_ids)``, and no delta ever shows a half-decoded character
(U+FFFD) that the full decode does not have.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pdserve.common.errors import InvalidParameterError
from pdserve.engine.byte_tokenizer import EOS_ID, write_byte_tokenizer
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.tokenizer import Tokenizer

FFFD = "\ufffd"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Café crème brûlée, naïve façade, señor, Ångström, résumé, jalapeño.",
    "日本語のテキストです。中文文本处理。한국어 문장입니다。",
    "Emoji: 😀 😃 👍🏽 👨‍👩‍👧 🇯🇵 ❤️ 🎉🎉 🚀 — done. e\u0301 a\u0308",
] * 20
PIECES = [
    "hello", " world", "the", " fox", ".", ",", " ", "  ", "\n", "\t", "Café", " naïve", "e\u0301", "a\u0308",
    "日本語", "中文", "한국어", "。", "😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "🦀", "🏳️‍🌈", "∑", "≈", "ß", "ø", "123", "<>",
]


def train_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return Tokenizer.from_dir(directory)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory: Path = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(directory)
    return Tokenizer.from_dir(directory)


@pytest.fixture(params=["bpe", "byte_tok"])
def any_tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def stream(tok: Tokenizer, prompt: Sequence[int], output: Sequence[int], chunks: Sequence[int] | None = None,
           **kwargs: object) -> tuple[list[str], IncrementalDetokenizer, str | None]:
    """Push ``output`` in ``chunks`` (sizes; default one id at a time); return the deltas."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)  # type: ignore[arg-type]
    sizes = list(chunks) if chunks is not None else [1] * len(output)
    deltas: list[str] = []
    pos, stop = 0, None
    for size in sizes:
        stop = detok.push(output[pos:pos + size])
        pos += size
        deltas.append(detok.take_delta(finished=False))
        if stop is not None:
            break
    deltas.append(detok.take_delta(finished=True))
    return deltas, detok, stop


def random_chunks(rng: random.Random, total: int) -> list[int]:
    sizes = []
    while total > 0:
        sizes.append(min(total, rng.randint(1, 5)))
        total -= sizes[-1]
    return sizes


# ---------------------------------------------------------------------- the key property


def test_deltas_concatenate_to_full_decode(any_tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for trial in range(150):
        prompt = any_tok.encode(random_text(rng, rng.randint(0, 6)))
        output = any_tok.encode(random_text(rng, rng.randint(1, 12)), add_special_tokens=False)
        full = any_tok.decode(output)
        assert FFFD not in full
        chunks = None if trial % 2 == 0 else random_chunks(rng, len(output))
        deltas, detok, stop = stream(any_tok, prompt, output, chunks)
        assert stop is None
        assert "".join(deltas) == full == detok.text
        assert all(FFFD not in d for d in deltas), deltas


def test_multibyte_char_emitted_once_complete(byte_tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_tok, byte_tok.encode("say:"))
    family = "👨‍👩‍👧".encode()
    for i, byte in enumerate(family):
        detok.push([byte])
        delta = detok.take_delta(finished=False)
        assert FFFD not in delta
        # Complete characters appear as soon as their last byte arrives, never before.
        assert detok.text == family[: i + 1].decode("utf-8", errors="ignore")
    assert detok.take_delta(finished=True) == ""
    assert detok.text == "👨‍👩‍👧"


def test_random_ids_including_invalid_utf8(any_tok: Tokenizer) -> None:
    """Arbitrary id sequences (broken UTF-8 included) still stream exactly the full decode."""
    rng = random.Random(99)
    normal = [i for i in range(any_tok.vocab_size) if i not in any_tok.special_token_ids]
    for _ in range(100):
        output = [rng.choice(normal) for _ in range(rng.randint(1, 20))]
        deltas, _, _ = stream(any_tok, any_tok.encode("x"), output, random_chunks(rng, len(output)))
        assert "".join(deltas) == any_tok.decode(output)


def test_trailing_incomplete_char_flushed_at_finish(byte_tok: Tokenizer) -> None:
    output = [*b"ok ", *"日".encode()[:2]]
    deltas, detok, _ = stream(byte_tok, [], output)
    assert deltas[:-1] == ["o", "k", " ", "", ""]
    assert deltas[-1] == FFFD == byte_tok.decode(output)[-1]
    assert detok.text == "ok " + FFFD


def test_special_tokens(byte_tok: Tokenizer) -> None:
    output = [*b"hi", EOS_ID]
    deltas, _, _ = stream(byte_tok, [], output)
    assert "".join(deltas) == "hi"
    deltas, _, _ = stream(byte_tok, [], output, skip_special_tokens=False)
    assert "".join(deltas) == "hi</s>"


def test_prompt_context_is_not_emitted(bpe: Tokenizer) -> None:
    prompt = bpe.encode("Hello world, the quick brown")
    output = bpe.encode(" fox jumps", add_special_tokens=False)
    deltas, _, _ = stream(bpe, prompt, output)
    assert "".join(deltas) == " fox jumps"
    # A prompt cut in the middle of a character gives no context, but output is still exact.
    cut = bpe.encode("日本", add_special_tokens=False)
    deltas, _, _ = stream(bpe, [*prompt, *cut[:1]], output)
    assert "".join(deltas) == " fox jumps"


def test_prompt_context_keeps_sentencepiece_leading_space(tmp_path: Path) -> None:
    """With a Metaspace (SentencePiece-style) decoder the first output token keeps its space."""
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.decoder = decoders.Metaspace(prepend_scheme="first")
    raw.train_from_iterator(["hello world the fox jumps over"] * 10,
                            trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("hello world the fox")
    prompt, output = ids[:1], ids[1:]
    assert tok.decode(output) == "world the fox"  # decoded alone, the leading space is stripped
    deltas, _, _ = stream(tok, prompt, output)
    assert "".join(deltas) == " world the fox" == tok.decode(ids)[len(tok.decode(prompt)):]


def test_decode_window_is_bounded(byte_tok: Tokenizer) -> None:
    """Each push decodes a window of recent tokens, not the whole output."""
    lengths: list[int] = []
    real_decode = byte_tok.decode

    class Spy(Tokenizer):
        def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            lengths.append(len(token_ids))
            return real_decode(token_ids, skip_special_tokens)

    spy = Spy.__new__(Spy)
    spy.__dict__.update(byte_tok.__dict__)
    output = byte_tok.encode(random_text(random.Random(5), 400), add_special_tokens=False)
    deltas, _, _ = stream(spy, byte_tok.encode("prompt"), output)
    assert "".join(deltas) == real_decode(output)
    assert len(output) > 1000 and max(lengths) <= 12


# ---------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates(any_tok: Tokenizer, include: bool) -> None:
    rng = random.Random(7)
    for _ in range(60):
        text = random_text(rng, rng.randint(3, 10))
        start = rng.randrange(len(text) - 1)
        stop_str = text[start:start + rng.randint(1, 4)]
        output = any_tok.encode(text, add_special_tokens=False)
        chunks = random_chunks(rng, len(output)) if rng.random() < 0.5 else None
        deltas, detok, stop = stream(any_tok, [], output, chunks, stop=[stop_str, "NEVER"],
                                     include_stop_str_in_output=include)
        first = text.find(stop_str)
        expected = text[: first + len(stop_str) if include else first]
        assert stop == stop_str
        assert detok.text == expected == "".join(deltas)
        assert detok.stop_hit == stop_str
        with pytest.raises(RuntimeError, match="after stop string"):
            detok.push([1])


def test_stop_string_spanning_tokens(bpe: Tokenizer) -> None:
    output = bpe.encode("hello world the fox", add_special_tokens=False)
    stop_str = "lo wor"
    pieces = [bpe.decode([i]) for i in output]
    assert not any(stop_str in p for p in pieces)  # it really spans several tokens
    deltas, detok, stop = stream(bpe, [], output, stop=[stop_str])
    assert (stop, detok.text, "".join(deltas)) == (stop_str, "hel", "hel")
    deltas, detok, stop = stream(bpe, [], output, stop=[stop_str], include_stop_str_in_output=True)
    assert (stop, detok.text, "".join(deltas)) == (stop_str, "hello wor", "hello wor")


def test_earliest_stop_wins(byte_tok: Tokenizer) -> None:
    output = list(b"abcdef")
    _, detok, stop = stream(byte_tok, [], output, chunks=[6], stop=["def", "bcd", "cd"])
    assert (stop, detok.text) == ("bcd", "a")


def test_partial_stop_is_held_back(byte_tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_tok, [], stop=["STOP"])
    assert detok.push(list(b"abcST")) is None
    assert detok.take_delta(finished=False) == "ab"  # "cST" (3 = len("STOP") - 1) held back
    assert detok.push(list(b"OX")) is None  # "STOX" is not a stop
    assert detok.take_delta(finished=False) == "cS"  # "TOX" held back: the rule is by length only
    assert detok.push(list(b"yzST")) is None
    assert detok.take_delta(finished=False) == "TOXy"
    assert detok.push(list(b"OP")) == "STOP"
    assert detok.take_delta(finished=False) == "z"  # once stopped, nothing is held back
    assert detok.take_delta(finished=True) == ""
    assert detok.text == "abcSTOXyz"


def test_partial_stop_released_when_finished(byte_tok: Tokenizer) -> None:
    deltas, detok, stop = stream(byte_tok, [], list(b"ends with ST"), stop=["STOP"])
    assert stop is None and deltas[-1] == " ST" and "".join(deltas) == "ends with ST"
    with pytest.raises(RuntimeError, match="after take_delta"):
        detok.push([65])


def test_stop_inside_multibyte_text(byte_tok: Tokenizer) -> None:
    text = "日本語のテキスト🦀です"
    deltas, detok, stop = stream(byte_tok, [], list(text.encode()), stop=["🦀"])
    assert (stop, detok.text, "".join(deltas)) == ("🦀", "日本語のテキスト", "日本語のテキスト")
    assert all(FFFD not in d for d in deltas)


def test_invalid_stop_strings(byte_tok: Tokenizer) -> None:
    with pytest.raises(InvalidParameterError, match="non-empty"):
        IncrementalDetokenizer(byte_tok, [], stop=[""])
    with pytest.raises(InvalidParameterError, match="not a single string"):
        IncrementalDetokenizer(byte_tok, [], stop="STOP")
