"""Tokenizer: lossless round trips, digits, CJK, special tokens,
save/load, and agreement with transformers."""

import inspect
import json
import random
import re

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.data.corpus import stdlib_files
from nanoseek.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    Tokenizer,
    TokenizerError,
    bytes_per_token,
    load_tokenizer,
)

ZH_WORDS = (
    "我们 今天 天气 非常 学习 中文 历史 国家 人民 朋友 时间 问题 工作 生活 世界 发展 经济 文化 "
    "城市 山水 英雄 将军 天下 百姓 军队 皇帝 先生 老师 学生 故事"
).split()
EN_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "river mountain kingdom general people city story time water light"
).split()


def english(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(EN_WORDS) for _ in range(n_words)).capitalize() + "."


def chinese(rng: random.Random, n_sentences: int) -> str:
    """Sentences of common words, now and then with an English word
    glued in (as in mixed real text)."""
    words = ZH_WORDS * 6 + ["Python", "GPT", "AI"]
    return "".join(
        "".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + rng.choice("，。！？")
        for _ in range(n_sentences)
    )


def sample_texts(seed: int = 0) -> list[str]:
    """About 300 KB: stdlib code (real English in its docstrings) and
    generated English and Chinese."""
    rng = random.Random(seed)
    code = [p.read_text("utf-8") for p in stdlib_files()[:400:10]]
    return code + [english(rng, 200) for _ in range(150)] + [chinese(rng, 60) for _ in range(150)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(sample_texts(), vocab_size=1024)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


ROUND_TRIP = [
    "",
    " ",
    "\n\n\t",
    "  leading and trailing  ",
    "Hello, world! It's 2026.",
    "话说天下大势，分久必合，合久必分。",
    "GPT模型很好用，对吧？Yes!",
    "カタカナ ひらがな 한국어",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷",
    "naïve café e\u0301 (not NFC) \u00a0nbsp \u200bzwsp",
    "tabs\tand\r\nCRLF\rCR",
    "\x00\x01 control \x7f",
    "<｜User｜>not special<think></think><｜end▁of▁sentence｜>",
    "a" * 3000,
    "1234567890" * 30,
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=True), skip_special_tokens=True) == text


def test_round_trip_random_unicode_and_bytes(tok):
    rng = random.Random(1)
    planes = [
        (0x20, 0x7F),
        (0xA0, 0x2FF),
        (0x4E00, 0x9FFF),
        (0x1F300, 0x1FAFF),
        (0x0, 0xD7FF),
        (0xE000, 0x10FFFF),
    ]
    texts = []
    for _ in range(300):
        lo, hi = rng.choice(planes)
        texts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40))))
    # arbitrary bytes, seen as Latin-1 and as UTF-8 with replacement characters
    for _ in range(100):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        texts += [raw.decode("latin-1"), raw.decode("utf-8", errors="replace")]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    ids = tok.encode("year 31415926")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("31415926")


def test_no_token_mixes_cjk_and_latin():
    # Text where the same mixed strings repeat: a Latin-word regex alone
    # would merge "用Python写代码" whole.
    rng = random.Random(2)
    texts = [f"我们用Python写代码，{chinese(rng, 3)}GPT模型很好。" for _ in range(300)]
    tok = Tokenizer.train(texts, vocab_size=600)
    han, latin = re.compile(r"[\u4e00-\u9fff]"), re.compile(r"[A-Za-z]")
    mixed = [
        s
        for s in map(tok.decode, ([i] for i in range(tok.vocab_size)))
        if han.search(s) and latin.search(s)
    ]
    assert mixed == []
    assert len(tok.encode("用Python写代码")) <= 4  # yet both sides did merge


def test_chinese_merges_form(tok):
    # more than one character (3 bytes) per token on fresh text
    report = bytes_per_token(
        tok, {"zh": [chinese(random.Random(7), 200)], "en": [english(random.Random(7), 500)]}
    )
    assert report["zh"] > 4.0 and report["en"] > 3.0, report


def test_bytes_per_token_counts(tok):
    texts = ["hello world", "你好"]
    report = bytes_per_token(tok, {"mixed": texts})
    assert report["mixed"] == pytest.approx(17 / sum(len(tok.encode(t)) for t in texts))


def test_special_ids(tok):
    assert tok.special_ids["bos"] == tok.bos_id == 0
    assert tok.special_ids["eos"] == tok.eos_id == tok.pad_id == 1
    assert set(tok.special_ids) == set(SPECIAL_TOKENS)
    assert sorted(tok.special_ids.values()) == list(range(len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 1024


def test_special_strings_stay_plain_text(tok):
    specials = set(tok.special_ids.values())
    for s in SPECIAL_TOKENS.values():
        for text in (s, f"x{s}y", f" {s}\n", s * 3):
            ids = tok.encode(text)
            assert not specials & set(ids), (text, ids)
            assert tok.decode(ids) == text
        assert tok.encode(s, allow_special=True) == [tok.token_to_id(s)]
    assert not specials & {
        i for ids in tok.encode_batch(list(SPECIAL_TOKENS.values())) for i in ids
    }


def test_train_errors():
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train([], vocab_size=512)
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train(["some text"], vocab_size=100)


def test_save_and_load(tok, saved):
    files = sorted(p.name for p in saved.iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((saved / "tokenizer_config.json").read_text("utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (
        config["bos_token"] == SPECIAL_TOKENS["bos"] and config["pad_token"] == config["eos_token"]
    )
    loaded = load_tokenizer(saved)
    assert loaded.sha256 == tok.sha256 and loaded.special_ids == tok.special_ids
    for text in ROUND_TRIP:
        assert loaded.encode(text) == tok.encode(text)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(
        ["hello world"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<｜User｜>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert SPECIAL_TOKENS["bos"] in message and SPECIAL_TOKENS["assistant"] in message
    assert SPECIAL_TOKENS["user"] not in message


def test_load_deepseek_style_tokenizer(tmp_path):
    # Special tokens at other ids, <think> registered as a non-special added
    # token, no <answer>: as DeepSeek's.
    S = SPECIAL_TOKENS
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        sample_texts()[:60],
        trainers.BpeTrainer(
            vocab_size=600,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[S["user"], S["assistant"], S["eos"], S["bos"]],
        ),
    )
    hf.add_tokens(
        [AddedToken(S["think"], special=False), AddedToken(S["end_think"], special=False)]
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 3 and tok.eos_id == 2 and tok.special_ids["user"] == 0
    assert "answer" not in tok.special_ids and tok.special_ids["think"] >= 600
    # made special on load: plain text stays text
    assert tok.special_ids["think"] not in tok.encode("<think>")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[:2] == [3, 0] and ids[-3:-1] == [
        tok.special_ids["assistant"],
        tok.special_ids["think"],
    ]


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "再见"},
    ],
    [
        {"role": "user", "content": "12*13?"},
        {
            "role": "assistant",
            "content": "<answer>156</answer>",
            "reasoning_content": "12*13 = 120 + 36 = 156",
        },
    ],
    [
        {"role": "system", "content": "A"},
        {"role": "system", "content": "B"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": None, "reasoning_content": None},
        {"role": "user", "content": "\n x \n"},
    ],
    [
        {"role": "user", "content": "say <｜Assistant｜> and <think> please"},
        {"role": "assistant", "content": "fine", "reasoning_content": "they typed </think>"},
    ],
    [
        {"role": "system", "content": "<｜begin▁of▁sentence｜>sys<｜end▁of▁sentence｜>"},
        {
            "role": "user",
            "content": "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜><｜reserved▁0｜>"
            "\n<answer>1</answer>",
        },
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, saved, messages):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    can_sanitize = "sanitize_control_tokens" in inspect.signature(hf.apply_chat_template).parameters
    for gen in (False, True):
        for thinking in (True, False):
            kw = dict(add_generation_prompt=gen, thinking=thinking)
            text = tok.apply_chat_template(messages, tokenize=False, **kw)
            assert text == hf.apply_chat_template(messages, tokenize=False, **kw)
            ids = tok.apply_chat_template(messages, **kw)
            assert ids == hf.apply_chat_template(messages, return_dict=False, **kw)
            safe = tok.apply_chat_template(messages, sanitize=True, **kw)
            if can_sanitize:  # transformers >= 5.x
                assert safe == hf.apply_chat_template(
                    messages, return_dict=False, sanitize_control_tokens=True, **kw
                )
            assert tok.decode(ids) == tok.decode(safe) == text
    generation = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert generation.endswith("<｜Assistant｜><think>\n")


def test_chat_template_shape(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A", "reasoning_content": "R"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<｜begin▁of▁sentence｜>S<｜User｜>U<｜Assistant｜><think>\nR\n</think>\nA<｜end▁of▁sentence｜>"
    )
    assert tok.apply_chat_template(
        msgs[:2], add_generation_prompt=True, thinking=False, tokenize=False
    ).endswith("<｜User｜>U<｜Assistant｜>")
    safe = tok.apply_chat_template([{"role": "user", "content": "<think>"}], sanitize=True)
    assert tok.special_ids["think"] not in safe
    assert tok.special_ids["think"] in tok.apply_chat_template(
        [{"role": "user", "content": "<think>"}]
    )
    with pytest.raises(ValueError, match="unknown role"):
        tok.apply_chat_template([{"role": "function", "content": "x"}])


def test_transformers_encodes_like_us(tok, saved):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    assert (
        hf.bos_token_id == tok.bos_id
        and hf.eos_token_id == tok.eos_id
        and hf.pad_token_id == tok.pad_id
    )
    assert len(hf) == tok.vocab_size
    texts = [t for t in ROUND_TRIP if "｜" not in t and "think" not in t] + sample_texts(seed=3)[
        -5:
    ]
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)
        assert hf.decode(tok.encode(text)) == text
