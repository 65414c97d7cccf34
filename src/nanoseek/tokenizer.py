"""Byte-level BPE tokenizer (HF `tokenizers`) with DeepSeek-style special tokens and chat template.

New tokenizers (revision 2, what Tokenizer.train builds) pre-tokenize exactly as llama.cpp's
`deepseek-coder` type does, so a GGUF export tokenizes as nanoseek does. Each of its regexes splits
the pieces the previous one left, keeping its matches apart:
  1. every line break on its own;
  2. a letter run with at most one leading space;
  3. a punctuation run with at most one leading space;
  4. runs of CJK characters (Han, kana, Hangul among them), cut out of those pieces, so Chinese
     merges form inside Chinese text and never glue onto neighbouring English;
  5. digits one by one, so numbers are spelled digit by digit (arithmetic generalises better);
then the byte-level mapping, so every string encodes and there is no unknown token.
Revision 1 tokenizers (one CJK-aware regex, then single digits) still load and encode as they were
trained. tokenizer_config.json records the revision (`nanoseek_tokenizer_revision`; absent: 1).
There is no normaliser: decode(encode(text)) == text for any string.

Special tokens are never produced from plain text: encode() treats their literal strings in user
text as ordinary characters unless allow_special=True. Revision 2 also reserves DeepSeek-V3's
tool-call tokens and DeepSeek-VL2's image, grounding and padding tokens (older tokenizers load
without them). apply_chat_template() renders the same format as CHAT_TEMPLATE (the Jinja template
saved in tokenizer_config.json, which transformers uses), written out in Python so nanoseek needs no
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

# Name -> string. The order fixes the ids of a trained tokenizer: bos 0,
# eos 1 (as in DeepSeek-V3's config).
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
    # revision 2: DeepSeek-V3's tool-call tokens, DeepSeek-VL2's image, grounding and padding tokens
    "tool_calls_begin": "<｜tool▁calls▁begin｜>",
    "tool_calls_end": "<｜tool▁calls▁end｜>",
    "tool_call_begin": "<｜tool▁call▁begin｜>",
    "tool_call_end": "<｜tool▁call▁end｜>",
    "tool_outputs_begin": "<｜tool▁outputs▁begin｜>",
    "tool_outputs_end": "<｜tool▁outputs▁end｜>",
    "tool_output_begin": "<｜tool▁output▁begin｜>",
    "tool_output_end": "<｜tool▁output▁end｜>",
    "tool_sep": "<｜tool▁sep｜>",
    "image": "<image>",
    "ref": "<|ref|>",
    "end_ref": "<|/ref|>",
    "det": "<|det|>",
    "end_det": "<|/det|>",
    "grounding": "<|grounding|>",
    "vl_pad": "<｜▁pad▁｜>",
}
# what a loaded tokenizer must have for chat
REQUIRED_SPECIALS = ("bos", "eos", "user", "assistant")

REVISION = 2  # what Tokenizer.train builds
LLAMA_CPP_PRE = "deepseek-coder"  # llama.cpp's name for revision 2's pre-tokenizer
# llama.cpp's deepseek-coder regexes (src/llama-vocab.cpp), in its order: line
# breaks, letter runs, punctuation runs, CJK and Hangul runs (U+4E00-U+9FA5,
# U+0800-U+4E00, U+AC00-U+D7FF), single digits.
SPLIT_PATTERNS = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    r"\p{N}",
)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Revision 2's pre-tokenizer: SPLIT_PATTERNS, each match isolated, then bytes to characters."""
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLIT_PATTERNS]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


# DeepSeek-R1 style: bos, the system prompts, then <｜User｜>… and
# <｜Assistant｜>…<｜end▁of▁sentence｜> turns.
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
{%- endif %}"""  # noqa: E501 (the template text is saved with every tokenizer)


class TokenizerError(Exception):
    """A tokenizer cannot be trained or loaded; the message says why."""


def _chat_parts(
    messages: Sequence[Mapping], add_generation_prompt: bool, thinking: bool
) -> list[tuple[str, bool]]:
    """CHAT_TEMPLATE in Python: a list of (text, is_control_token).
    Missing or None fields render as ''."""
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
                parts += [
                    (S["think"], True),
                    ("\n" + m["reasoning_content"] + "\n", False),
                    (S["end_think"], True),
                    ("\n", False),
                ]
            parts += [(m.get("content") or "", False), (S["eos"], True)]
        elif m["role"] != "system":
            raise ValueError(f"unknown role: {m['role']}")
    if add_generation_prompt:
        parts.append((S["assistant"], True))
        if thinking:
            parts += [(S["think"], True), ("\n", False)]
    return parts


class Tokenizer:
    """Encode/decode text, with special ids by name
    (`special_ids["think"]`) and the chat template."""

    def __init__(self, tokenizer: HFTokenizer, model_max_length: int = 4096, revision: int = 1):
        json_str = tokenizer.to_str()
        self.revision = revision  # nanoseek's tokenizer revision (see the module docstring)
        # Two copies of the same tokenizer, so neither call path toggles shared state:
        # special-token strings in text are ordinary text
        self._plain = HFTokenizer.from_str(json_str)
        self._plain.encode_special_tokens = True
        # special-token strings in text become special ids
        self._special = HFTokenizer.from_str(json_str)
        self.special_ids = {
            name: i
            for name, s in SPECIAL_TOKENS.items()
            if (i := tokenizer.token_to_id(s)) is not None
        }
        missing = [SPECIAL_TOKENS[n] for n in REQUIRED_SPECIALS if n not in self.special_ids]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks the special tokens nanoseek needs: {', '.join(missing)}"
            )
        self.model_max_length = model_max_length
        specials = sorted(
            (t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
            key=len,
            reverse=True,
        )
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self.control_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.sha256 = hashlib.sha256(json_str.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
        length: int | None = None,
    ) -> Tokenizer:
        """Train on an iterator of documents. vocab_size counts the 256
        bytes and the special tokens."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(
                f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=[
                AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS.values()
            ],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        seen = 0

        def counted(texts):  # an empty corpus should fail loudly, not give a bytes-only tokenizer
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
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
        return cls(tok, revision=REVISION)

    # ---------------------------------------------------------------------------- encode and decode

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
        # bos added here, whatever the post-processor
        ids = tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the work over all cores."""
        tok = self._special if allow_special else self._plain
        out = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id, *ids] for ids in out] if add_bos else out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._plain.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def llama_cpp_pre(self) -> str | None:
        """The llama.cpp pre-tokenizer type that splits text exactly as this one does, or None."""
        reference = HFTokenizer(models.BPE())
        reference.pre_tokenizer = pre_tokenizer()
        ours = json.loads(self._plain.to_str())["pre_tokenizer"]
        return LLAMA_CPP_PRE if ours == json.loads(reference.to_str())["pre_tokenizer"] else None

    @property
    def bpe_merges(self) -> list[str]:
        """The BPE merges in rank order, as "left right" strings."""
        merges = json.loads(self._plain.to_str())["model"]["merges"]
        return [m if isinstance(m, str) else " ".join(m) for m in merges]  # newer: pairs

    def id_to_token(self, i: int) -> str | None:
        return self._plain.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._plain.token_to_id(token)

    # ----------------------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = False,
        thinking: bool = True,
        tokenize: bool = True,
        sanitize: bool = False,
    ):
        """Render messages ({"role": system|user|assistant, "content", optional
        "reasoning_content"}).

        Returns ids (or the text if tokenize=False), exactly as transformers' apply_chat_template
        does with the saved template. Like transformers, special-token strings inside message
        content become special tokens; pass sanitize=True for untrusted content (= transformers'
        sanitize_control_tokens=True): then only the template's own control tokens are special.
        """
        parts = _chat_parts(messages, add_generation_prompt, thinking)
        if not tokenize:
            return "".join(text for text, _ in parts)
        ids: list[int] = []
        buf: list[str] = []
        for text, control in parts + [("", True)]:  # a sentinel flushes the last text
            if control:
                # special strings in content: plain text, encoded apart (as transformers does)
                if sanitize:
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

    # ------------------------------------------------------------------------------------ save/load

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so that transformers'
        AutoTokenizer loads the directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        eos = SPECIAL_TOKENS["eos"]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS["bos"],
            "eos_token": eos,
            "pad_token": eos,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # keep decode lossless
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
            "nanoseek_tokenizer_revision": self.revision,
        }
        for name, text in (
            ("tokenizer.json", self._special.to_str(pretty=True)),
            ("tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2)),
        ):
            atomic_write_text(out / name, text + "\n")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a directory with tokenizer.json (ours, or a DeepSeek one: special
    tokens are found by their strings)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json found")
    tok = HFTokenizer.from_file(str(file))
    # Make sure every special string we know that the vocabulary has is matched whole (in
    # allow_special mode) and skipped by decode(skip_special_tokens=True), whatever flags the
    # file gave it.
    present = [s for s in SPECIAL_TOKENS.values() if tok.token_to_id(s) is not None]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in present])
    config_file = file.with_name("tokenizer_config.json")
    config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
    max_len = config.get("model_max_length")
    # transformers writes 1e30 for "no limit"
    if not isinstance(max_len, (int, float)) or max_len >= 1e9:
        max_len = 4096
    try:
        return Tokenizer(
            tok,
            model_max_length=int(max_len),
            revision=int(config.get("nanoseek_tokenizer_revision", 1)),
        )
    except TokenizerError as e:
        raise TokenizerError(f"{file}: {e}") from None


def bytes_per_token(tok: Tokenizer, texts_by_lang: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """UTF-8 bytes per token for each language: the compression the
    tokenizer gets (higher is better)."""
    report = {}
    for lang, texts in texts_by_lang.items():
        texts = list(texts)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        report[lang] = sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)
    return report
