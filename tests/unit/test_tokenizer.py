"""Tests of pdserve.engine.tokenizer.Tokenizer and pdserve.engine.byte_tokenizer.

A real byte-level BPE tokenizer is trained in the test (tokenizers' BpeTrainer), saved as a Hugging
Face directory and loaded back; ``transformers`` cross-checks that both libraries read it alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from pdserve.common.errors import InvalidParameterError, ModelLoadError
from pdserve.engine.byte_tokenizer import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    CHAT_TEMPLATE,
    EOS_ID,
    PAD_ID,
    build_byte_tokenizer,
    bytes_to_unicode,
    write_byte_tokenizer,
)
from pdserve.engine.tokenizer import Tokenizer

SPECIALS = ["<s>", "</s>", "<pad>", "<|im_end|>"]  # ids 0, 1, 2, 3 after training
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Café crème brûlée, naïve façade, señor, Ångström, résumé, jalapeño.",
    "Unicode combining: e\u0301 a\u0308 n\u0303 o\u0302 and tabs\tand\nnew lines\r\n  indented",
    "日本語のテキストです。中文文本处理。한국어 문장입니다。東京、北京、서울。",
    "Emoji: 😀 😃 👍🏽 👨‍👩‍👧 🇯🇵 🇫🇷 ❤️ 🎉🎉 🚀 — done.",
    "Numbers 0123456789, symbols <>&'\" {json: [1, 2]} and math ∑ ∫ √ π ≈ 3.14159",
] * 20

TEMPLATE_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
TEMPLATE_NO_BOS = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "Café crème brûlée",
    "e\u0301 a\u0308 combining marks",
    "日本語のテキストです。中文。한국어",
    "👨‍👩‍👧 family, 👍🏽 thumbs, 🇯🇵 flag, 🦀 crab (unseen in training)",
    "mixed 😀日本 é\u0301 end",
    "",
]


def train_bpe(vocab_size: int = 500) -> HFTokenizer:
    """A byte-level BPE tokenizer trained on CORPUS, with BOS prepended by the post-processor."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return tok


def write_model_dir(directory: Path, tok_config: dict | None = None, **extra_files: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train_bpe().save(str(directory / "tokenizer.json"))
    if tok_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name, content in extra_files.items():
        (directory / f"{name}.json").write_text(json.dumps(content))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
              "pad_token": "<pad>", "chat_template": TEMPLATE_WITH_BOS, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return write_model_dir(tmp_path_factory.mktemp("bpe"), config,
                           generation_config={"eos_token_id": [3, 1]}, config={"eos_token_id": [1, 2]})


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


# ---------------------------------------------------------------------- trained BPE tokenizer


def test_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 500
    assert tok.bos_token_id == 0
    # generation_config first, then tokenizer_config's eos_token, then config.json; deduplicated.
    assert tok.eos_token_ids == (3, 1, 2)
    assert tok.special_token_ids == frozenset({0, 1, 2, 3})
    assert tok.chat_template == TEMPLATE_WITH_BOS


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos == [0, *ids]
    assert tok.decode(with_bos) == text
    assert tok.decode(with_bos, skip_special_tokens=False) == "<s>" + text


def test_multibyte_chars_are_split_across_tokens(tok: Tokenizer) -> None:
    """The unseen emoji must be split into byte tokens whose single texts are incomplete."""
    ids = tok.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1
    assert "\ufffd" in "".join(tok.token_text(i) for i in ids)
    assert tok.decode(ids) == "🦀"


def test_special_tokens_skipped(tok: Tokenizer) -> None:
    ids = [0, *tok.encode("hi there", add_special_tokens=False), 3, 1]
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi there<|im_end|></s>"
    assert tok.token_text(1) == "</s>"
    assert tok.token_text(tok.encode("Hello", add_special_tokens=False)[0]).startswith("H")


def test_matches_transformers(model_dir: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    for text in TEXTS:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    auto = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": "Héllo 👋"}, {"role": "assistant", "content": "日本"}]
    assert tok.apply_chat_template(messages) == auto.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    hf_ids = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(messages) == list(hf_ids)


# ---------------------------------------------------------------------- chat templates


def test_chat_template_and_single_bos(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s>[user] hi</s>\n[assistant] "
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<s>[user] hi</s>\n"
    ids = tok.encode_chat(messages)
    assert ids.count(0) == 1 and ids[0] == 0
    assert tok.decode(ids, skip_special_tokens=False) == text
    # A template without BOS still gets exactly one, from the post-processor's convention.
    ids = tok.encode_chat(messages, chat_template=TEMPLATE_NO_BOS)
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.decode(ids) == "user: hi\n"


def test_chat_template_helpers(tok: Tokenizer) -> None:
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('only one message, got ' ~ messages|length) }}{% endif %}"
        "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}"
    )
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}], chat_template=template)
    year, payload = out.split("|", 1)
    assert year.isdigit() and len(year) == 4
    assert json.loads(payload) == {"role": "user", "content": "<é>"}
    with pytest.raises(InvalidParameterError, match="only one message, got 2") as info:
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2, chat_template=template)
    assert info.value.field == "messages"


def test_chat_template_trim_blocks(tok: Tokenizer) -> None:
    template = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template) == "x\n"


@pytest.mark.parametrize("messages", [
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": 3}],
    ["just a string"],
])
def test_bad_messages(tok: Tokenizer, messages: list) -> None:
    with pytest.raises(InvalidParameterError) as info:
        tok.apply_chat_template(messages)
    assert info.value.field == "messages"


def test_template_errors(tok: Tokenizer) -> None:
    with pytest.raises(InvalidParameterError) as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    assert info.value.field == "chat_template"
    with pytest.raises(InvalidParameterError) as info:  # the sandbox forbids mutation
        tok.apply_chat_template([{"role": "user", "content": "x"}],
                                chat_template="{{ messages.append(1) }}")
    assert info.value.field == "messages"


def test_missing_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(InvalidParameterError, match="has no chat template.*chat_template=") as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert info.value.field == "chat_template"
    assert tok.eos_token_ids == (1,)


def test_named_template_list_and_config_fallbacks(tmp_path: Path) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": "default:{{ bos_token }}"}]}
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, config, config={"bos_token_id": 0, "eos_token_id": 3}))
    assert tok.apply_chat_template([]) == "default:<s>"
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (3,)


def test_no_configs_at_all(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_model_dir(tmp_path))
    assert tok.bos_token_id is None and tok.eos_token_ids == () and tok.chat_template is None
    assert tok.decode(tok.encode("日本 ok")) == "日本 ok"


# ---------------------------------------------------------------------- load errors


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*not found") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "Nope"}}', "[]"])
def test_broken_tokenizer_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: cannot be parsed"):
        Tokenizer.from_dir(tmp_path)


def test_broken_optional_json(tmp_path: Path) -> None:
    write_model_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: cannot be read as JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: eos_token_id must be an integer"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer_layout() -> None:
    raw = build_byte_tokenizer()
    assert raw.get_vocab_size(with_added_tokens=True) == BYTE_VOCAB_SIZE
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "Ġ"
    assert [raw.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [BOS_ID, EOS_ID, PAD_ID]
    data = bytes(range(256))
    text = data.decode("latin-1")  # every byte value once as a code point (<= 0xFF -> 1 or 2 bytes)
    assert raw.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))


@pytest.mark.parametrize("text", [*TEXTS, "\x00\x01\x7f control", "🏳️‍🌈 ZWJ flag", "a" * 1000])
def test_byte_tokenizer_round_trip(tmp_path: Path, text: str) -> None:
    write_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text) == [BOS_ID, *ids]


def test_byte_tokenizer_directory(tmp_path: Path) -> None:
    write_byte_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_ID}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == BYTE_VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_ids) == (BOS_ID, (EOS_ID,))
    assert tok.special_token_ids == frozenset({BOS_ID, EOS_ID, PAD_ID})
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo 👋"}]
    text = tok.apply_chat_template(messages)
    assert text == "<s><|system|>\nbe brief\n<|user|>\nhéllo 👋\n<|assistant|>\n"
    ids = tok.encode_chat(messages)
    assert ids == [BOS_ID, *text[len("<s>"):].encode("utf-8")]
    assert tok.encode_chat(messages, add_generation_prompt=False)[-1] == ord("\n")

    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert auto.model_max_length == 4096
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    for sample in TEXTS:
        assert auto.encode(sample) == tok.encode(sample)
        assert auto.decode(tok.encode(sample), skip_special_tokens=True) == sample
