"""Byte-level BPE tokenizer (HF `tokenizers`) with DeepSeek-style special tokens and chat template.

Pre-tokenization, in order:
  1. a regex that isolates runs of CJK characters from Latin words, numbers, punctuation and whitespace, so
     Chinese merges form inside Chinese text and never glue onto neighbouring English;
  2. digits one by one, so numbers are spelled digit by digit (arithmetic generalises better);
  3. byte-level mapping, so every string encodes and there is no unknown token.
There is no normaliser: decode(encode(text)) == text for any string.

Special tokens are never produced from plain text: encode() treats their literal strings in user text as ordinary
characters unless allow_special=True. apply_chat_template() renders the same format as CHAT_TEMPLATE (the Jinja
template saved in tokenizer_config.json, which transformers uses), written out in Python so nanoseek needs no
template engine; the tests check the two agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.io import atomic_write_text

# Name -> string. The order fixes the ids of a trained tokenizer: bos 0, eos 1 (as in DeepSeek-V3's config).
SPECIAL_TOKENS = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",  # also the padding token
    "user": "<｜User｜>",
    "assistant": "<｜Assistant｜>",
    "think": "<think>",
    "end_think": "</think>",
    "answer": "<answer>",
    "end_answer": "</answer>",
    "fim_begin": "<｜fim▁begin｜>",
    "fim_hole": "<｜fim▁hole｜>",
    "fim_end": "<｜fim▁end｜>",
    **{f"reserved_{i}": f"<｜reserved▁{i}｜>" for i in range(5)},
}
REQUIRED_SPECIALS = ("bos", "eos", "user", "assistant")  # what a loaded tokenizer must have for chat

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
SPLIT_PATTERN = (
    rf"[{_CJK}]+"  # a run of CJK characters
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}&&[^{_CJK}]]+"  # a word, with one leading space or symbol
    r"|\p{N}+"  # numbers (then split into digits)
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"  # newlines; spaces, leaving the last one to the next word
)

# DeepSeek-R1 style: bos, the system prompts, then <｜User｜>… and <｜Assistant｜>…<｜end▁of▁sentence｜> turns.
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages if message['role'] == 'system' %}
    {%- if not loop.first %}{{- '\n\n' }}{% endif %}
    {{- message['content'] }}
{%- endfor %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' }}{{- message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' }}
        {%- if message['reasoning_content'] %}
            {{- '<think>' }}{{- '\n' }}{{- message['reasoning_content'] }}{{- '\n' }}{{- '</think>' }}{{- '\n' }}
        {%- endif %}
        {{- message['content'] }}{{- eos_token }}
    {%- elif message['role'] != 'system' %}
        {{- raise_exception('unknown role: ' ~ message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜>' }}
    {%- if thinking is not defined or thinking %}{{- '<think>' }}{{- '\n' }}{% endif %}
{%- endif %}"""


class TokenizerError(Exception):
    """A tokenizer cannot be trained or loaded; the message says why."""


def _chat_parts(messages: Sequence[Mapping], add_generation_prompt: bool, thinking: bool) -> list[tuple[str, bool]]:
    """CHAT_TEMPLATE in Python: a list of (text, is_control_token). Missing or None fields render as ''."""
    S = SPECIAL_TOKENS
    parts = [(S["bos"], True)]
    systems = [m.get("content") or "" for m in messages if m["role"] == "system"]
    parts.append(("\n\n".join(systems), False))
    for m in messages:
        if m["role"] == "user":
            parts += [(S["user"], True), (m.get("content") or "", False)]
        elif m["role"] == "assistant":
            parts.append((S["assistant"], True))
            if m.get("reasoning_content"):
                parts += [(S["think"], True), ("\n" + m["reasoning_content"] + "\n", False),
                          (S["end_think"], True), ("\n", False)]
            parts += [(m.get("content") or "", False), (S["eos"], True)]
        elif m["role"] != "system":
            raise ValueError(f"unknown role: {m['role']}")
    if add_generation_prompt:
        parts.append((S["assistant"], True))
        if thinking:
            parts += [(S["think"], True), ("\n", False)]
    return parts


class Tokenizer:
    """Encode/decode text, with special ids by name (`special_ids["think"]`) and the chat template."""

    def __init__(self, tokenizer: HFTokenizer, model_max_length: int = 4096):
        json_str = tokenizer.to_str()
        # Two copies of the same tokenizer, so neither call path toggles shared state:
        self._plain = HFTokenizer.from_str(json_str)  # special-token strings in text are ordinary text
        self._plain.encode_special_tokens = True
        self._special = HFTokenizer.from_str(json_str)  # special-token strings in text become special ids
        self.special_ids = {name: i for name, s in SPECIAL_TOKENS.items()
                            if (i := tokenizer.token_to_id(s)) is not None}
        missing = [SPECIAL_TOKENS[n] for n in REQUIRED_SPECIALS if n not in self.special_ids]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special tokens nanoseek needs: {', '.join(missing)}")
        self.model_max_length = model_max_length
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self.sha256 = hashlib.sha256(json_str.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False, length: int | None = None) -> Tokenizer:
        """Train on an iterator of documents. vocab_size counts the 256 bytes and the special tokens."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS.values()],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        seen = 0

        def counted(texts):  # an empty corpus should fail loudly, not give a 272-token tokenizer
            nonlocal seen
            for t in texts:
                seen += bool(t)
                yield t

        tok.train_from_iterator(counted(texts), trainer, length=length)
        if not seen:
            raise TokenizerError("cannot train a tokenizer on an empty corpus")
        # transformers' tokenizer(text) then starts with bos, as our documents do in pretraining.
        bos = SPECIAL_TOKENS["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        return cls(tok)

    # --------------------------------------------------------------------------------------- encode and decode

    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["eos"]

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        tok = self._special if allow_special else self._plain
        ids = tok.encode(text, add_special_tokens=False).ids  # bos added here, whatever the post-processor
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the work over all cores."""
        tok = self._special if allow_special else self._plain
        out = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id, *ids] for ids in out] if add_bos else out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._plain.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._plain.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._plain.token_to_id(token)

    # ------------------------------------------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            thinking: bool = True, tokenize: bool = True, sanitize: bool = False):
        """Render messages ({"role": system|user|assistant, "content", optional "reasoning_content"}).

        Returns ids (or the text if tokenize=False), exactly as transformers' apply_chat_template does with the
        saved template. Like transformers, special-token strings inside message content become special tokens;
        pass sanitize=True for untrusted content (= transformers' sanitize_control_tokens=True): then only the
        template's own control tokens are special.
        """
        parts = _chat_parts(messages, add_generation_prompt, thinking)
        if not tokenize:
            return "".join(text for text, _ in parts)
        ids: list[int] = []
        buf: list[str] = []
        for text, control in parts + [("", True)]:  # a sentinel flushes the last text
            if control:
                if sanitize:  # special strings in content: plain text, encoded apart (as transformers does)
                    for piece in self._special_re.split("".join(buf)):
                        ids += self.encode(piece)
                elif buf:
                    ids += self.encode("".join(buf), allow_special=True)
                buf = []
                if text:
                    tid = self.token_to_id(text)
                    ids += [tid] if tid is not None else self.encode(text)
            else:
                buf.append(text)
        return ids

    # ------------------------------------------------------------------------------------------------ save/load

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so that transformers' AutoTokenizer loads the directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        eos = SPECIAL_TOKENS["eos"]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS["bos"], "eos_token": eos, "pad_token": eos,
            "add_bos_token": True, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # keep decode lossless
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        for name, text in (("tokenizer.json", self._special.to_str(pretty=True)),
                           ("tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2))):
            atomic_write_text(out / name, text + "\n")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a directory with tokenizer.json (ours, or a DeepSeek one: special tokens are found by their strings)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json found")
    tok = HFTokenizer.from_file(str(file))
    # Make sure every special string we know that the vocabulary has is matched whole (in allow_special mode)
    # and skipped by decode(skip_special_tokens=True), whatever flags the file gave it.
    present = [s for s in SPECIAL_TOKENS.values() if tok.token_to_id(s) is not None]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in present])
    config_file = file.with_name("tokenizer_config.json")
    config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
    max_len = config.get("model_max_length")
    if not isinstance(max_len, (int, float)) or max_len >= 1e9:  # transformers writes 1e30 for "no limit"
        max_len = 4096
    try:
        return Tokenizer(tok, model_max_length=int(max_len))
    except TokenizerError as e:
        raise TokenizerError(f"{file}: {e}") from None


def bytes_per_token(tok: Tokenizer, texts_by_lang: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """UTF-8 bytes per token for each language: the compression the tokenizer gets (higher is better)."""
    report = {}
    for lang, texts in texts_by_lang.items():
        texts = list(texts)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        report[lang] = sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)
    return report
