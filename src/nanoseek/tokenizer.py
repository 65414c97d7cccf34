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

from nanoseek import chat_template as chat_template_module
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


# DeepSeek-R1 style: bos, the system prompts (then the tool list, if any), then <｜User｜>… and
# <｜Assistant｜>…<｜end▁of▁sentence｜> turns. Tool calls follow DeepSeek-V3.1's form (name, then
# the raw JSON arguments); each tool result is one <｜tool▁output▁begin｜>…<｜tool▁output▁end｜>
# block, and the next assistant turn opens with <｜Assistant｜> as any other (docs/serving.md).
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages if message['role'] == 'system' %}
    {%- if not loop.first %}{{- '\n\n' }}{% endif %}
    {{- message['content'] }}
{%- endfor %}
{%- if tools %}
    {%- if messages | selectattr('role', 'equalto', 'system') | list %}{{- '\n\n' }}{% endif %}
    {{- '## Tools\nYou can call these functions. Each line is one function: its name, '
        ~ 'what it does, and a JSON schema of its arguments.' }}
    {%- for tool in tools %}
        {{- '\n' }}{{- (tool['function'] if tool['function'] is defined else tool) | tojson }}
    {%- endfor %}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' }}
        {%- if message['content'] is string %}{{- message['content'] }}
        {%- else %}
            {%- for part in message['content'] %}
                {%- if part['type'] == 'text' %}{{- part['text'] }}{% else %}{{- '<image>' }}{% endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' }}
        {%- if message['reasoning_content'] %}
            {{- '<think>' }}{{- '\n' }}{{- message['reasoning_content'] }}{{- '\n' }}{{- '</think>' }}{{- '\n' }}
        {%- endif %}
        {{- message['content'] or '' }}
        {%- if message['tool_calls'] %}
            {{- '<｜tool▁calls▁begin｜>' }}
            {%- for call in message['tool_calls'] %}
                {%- set function = call['function'] if call['function'] is defined else call %}
                {{- '<｜tool▁call▁begin｜>' }}{{- function['name'] }}{{- '<｜tool▁sep｜>' }}
                {%- if function['arguments'] is string %}{{- function['arguments'] }}
                {%- else %}{{- function['arguments'] | tojson }}{% endif %}
                {{- '<｜tool▁call▁end｜>' }}
            {%- endfor %}
            {{- '<｜tool▁calls▁end｜>' }}
        {%- endif %}
        {{- eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '<｜tool▁output▁begin｜>' }}{{- message['content'] }}{{- '<｜tool▁output▁end｜>' }}
    {%- elif message['role'] != 'system' %}
        {{- raise_exception('unknown role: ' ~ message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜>' }}
    {%- if thinking is not defined or thinking %}{{- '<think>' }}{{- '\n' }}{% endif %}
{%- endif %}"""  # noqa: E501 (the template text is saved with every tokenizer)
# Earlier versions of CHAT_TEMPLATE (sha256 of the text): a checkpoint that saved one of them uses
# nanoseek's own renderer, which renders everything they rendered the same way.
LEGACY_CHAT_TEMPLATES = frozenset(
    {
        "5fda978504f806532beccaedd5e6958624843bc1a5e705987584b4b67e419da5",
        # before image content parts
        "3123150506d98d37dac4fa9993278871c707dea1c685c0af7a99a3a3c0d5222a",
    }
)
TOOLS_HEADER = (
    "## Tools\nYou can call these functions. Each line is one function: its name, what it does, "
    "and a JSON schema of its arguments."
)


def tool_declaration(tools: Sequence[Mapping]) -> str:
    """The tool list as CHAT_TEMPLATE writes it after the system prompts (OpenAI-shaped tools
    {"type": "function", "function": {...}}, or the function objects themselves)."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return "\n".join([TOOLS_HEADER, *lines])


def tool_arguments(arguments) -> str:
    """A call's arguments as the template writes them: a string as it is, else JSON."""
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class TokenizerError(Exception):
    """A tokenizer cannot be trained or loaded; the message says why."""


def _chat_parts(
    messages: Sequence[Mapping],
    add_generation_prompt: bool,
    thinking: bool,
    tools: Sequence[Mapping] | None = None,
) -> list[tuple[str, bool]]:
    """CHAT_TEMPLATE in Python: a list of (text, is_control_token).
    Missing or None fields render as ''."""
    S = SPECIAL_TOKENS
    parts = [(S["bos"], True)]
    systems = [m.get("content") or "" for m in messages if m["role"] == "system"]
    system = "\n\n".join(systems)
    if tools:
        system += ("\n\n" if systems else "") + tool_declaration(tools)
    parts.append((system, False))
    for m in messages:
        if m["role"] == "user":
            parts.append((S["user"], True))
            content = m.get("content") or ""
            if isinstance(content, str):
                parts.append((content, False))
            else:  # content parts: text, and an image as one <image> control token where it stands
                for part in content:
                    text = part["type"] == "text"
                    parts.append((part["text"], False) if text else (S["image"], True))
        elif m["role"] == "assistant":
            parts.append((S["assistant"], True))
            if m.get("reasoning_content"):
                parts += [
                    (S["think"], True),
                    ("\n" + m["reasoning_content"] + "\n", False),
                    (S["end_think"], True),
                    ("\n", False),
                ]
            parts.append((m.get("content") or "", False))
            if m.get("tool_calls"):
                parts.append((S["tool_calls_begin"], True))
                for call in m["tool_calls"]:
                    function = call.get("function", call)
                    parts += [
                        (S["tool_call_begin"], True),
                        (function["name"], False),
                        (S["tool_sep"], True),
                        (tool_arguments(function["arguments"]), False),
                        (S["tool_call_end"], True),
                    ]
                parts.append((S["tool_calls_end"], True))
            parts.append((S["eos"], True))
        elif m["role"] == "tool":
            parts += [
                (S["tool_output_begin"], True),
                (m.get("content") or "", False),
                (S["tool_output_end"], True),
            ]
        elif m["role"] != "system":
            raise ValueError(f"unknown role: {m['role']}")
    if add_generation_prompt:
        parts.append((S["assistant"], True))
        if thinking:
            parts += [(S["think"], True), ("\n", False)]
    return parts


# sanitizing a checkpoint's own template: special-token strings in untrusted text, between markers
# from Unicode's supplementary private use area
_MARK_OPEN = "\U000f0000"
_MARK_CLOSE = "\U000f0001"
_MARKED = re.compile(f"{_MARK_OPEN}(.*?){_MARK_CLOSE}", re.S)


def _mark(value, special_re: re.Pattern):
    """Every string in a JSON value with its special-token strings wrapped in markers."""
    if isinstance(value, str):
        clean = value.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
        return special_re.sub(lambda m: _MARK_OPEN + m.group(0) + _MARK_CLOSE, clean)
    if isinstance(value, Mapping):
        return {k: _mark(v, special_re) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, special_re) for v in value]
    return value


class Tokenizer:
    """Encode/decode text, with special ids by name
    (`special_ids["think"]`) and the chat template."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        model_max_length: int = 4096,
        revision: int = 1,
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ):
        """chat_template: a checkpoint's own Jinja template (None: nanoseek's, rendered in Python);
        template_tokens: its tokenizer_config's special tokens by name ("bos_token": "<s>", ...),
        which also say which tokens are BOS and EOS."""
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
        self.chat_template = chat_template
        self.template_tokens = {
            name: text
            for name, text in (template_tokens or {}).items()
            if tokenizer.token_to_id(text) is not None
        }
        for name in ("bos", "eos"):  # the config's BOS and EOS, whatever their strings
            if f"{name}_token" in self.template_tokens:
                self.special_ids[name] = tokenizer.token_to_id(
                    self.template_tokens[f"{name}_token"]
                )
        if chat_template is not None:
            chat_template_module.check(chat_template)
        # with its own template, a tokenizer needs only an EOS to stop generation
        required = REQUIRED_SPECIALS if chat_template is None else ("eos",)
        missing = [SPECIAL_TOKENS[n] for n in required if n not in self.special_ids]
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
    def bos_id(self) -> int | None:
        """None only for a tokenizer with a template of its own and no BOS (such as Qwen's)."""
        return self.special_ids.get("bos")

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
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the work over all cores."""
        tok = self._special if allow_special else self._plain
        out = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        if not add_bos or self.bos_id is None:
            return out
        return [[self.bos_id, *ids] for ids in out]

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
        tools: Sequence[Mapping] | None = None,
        **template_kwargs,
    ):
        """Render messages ({"role": system|user|assistant|tool, "content", optional
        "reasoning_content", "tool_calls"}) and tools (OpenAI-shaped function definitions).

        Returns ids (or the text if tokenize=False), exactly as transformers' apply_chat_template
        does with the saved template. Like transformers, special-token strings inside message
        content become special tokens; pass sanitize=True for untrusted content (= transformers'
        sanitize_control_tokens=True): then only the template's own control tokens are special.
        With a checkpoint's own template, `thinking` and template_kwargs are template variables.
        """
        if self.chat_template is not None:
            return self._apply_own_template(
                messages,
                add_generation_prompt,
                tokenize,
                sanitize,
                tools,
                thinking=thinking,
                **template_kwargs,
            )
        parts = _chat_parts(messages, add_generation_prompt, thinking, tools)
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

    def _apply_own_template(self, messages, add_generation_prompt, tokenize, sanitize, tools, **kw):
        """A checkpoint's own Jinja template. sanitize: special-token strings in the messages
        and tools are wrapped in private-use markers before rendering, and encoded as plain text
        after."""
        if sanitize and tokenize:
            messages = _mark(messages, self._special_re)
            tools = _mark(tools, self._special_re)
        text = chat_template_module.render(
            self.chat_template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.template_tokens,
            **kw,
        )
        if not tokenize:
            return text
        if not sanitize:
            return self.encode(text, allow_special=True)
        ids: list[int] = []
        for i, piece in enumerate(_MARKED.split(text)):
            if piece:  # odd pieces were marked: plain text
                ids += self.encode(piece) if i % 2 else self.encode(piece, allow_special=True)
        return ids

    # ------------------------------------------------------------------------------------ save/load

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so that transformers'
        AutoTokenizer loads the directory."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        bos = self.template_tokens.get("bos_token", SPECIAL_TOKENS["bos"])
        eos = self.template_tokens.get("eos_token", SPECIAL_TOKENS["eos"])
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos if self.bos_id is not None else None,
            "eos_token": eos,
            "pad_token": self.template_tokens.get("pad_token", eos),
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # keep decode lossless
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template or CHAT_TEMPLATE,
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
    template = _own_template(file.with_name("chat_template.jinja"), config)
    try:
        return Tokenizer(
            tok,
            model_max_length=int(max_len),
            revision=int(config.get("nanoseek_tokenizer_revision", 1)),
            chat_template=template,
            template_tokens=_template_tokens(config) if template is not None else None,
        )
    except (TokenizerError, chat_template_module.TemplateError) as e:
        raise TokenizerError(f"{file}: {e}") from None


def _own_template(jinja_file: Path, config: Mapping) -> str | None:
    """A checkpoint's own chat template (chat_template.jinja, as transformers 5 saves it, else
    tokenizer_config.json's "chat_template", a string or a list of named ones: "default"), or None
    when it has none or it is nanoseek's (any version)."""
    template = config.get("chat_template")
    if jinja_file.is_file():
        template = jinja_file.read_text("utf-8")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        return None
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()
    return None if template == CHAT_TEMPLATE or digest in LEGACY_CHAT_TEMPLATES else template


def _template_tokens(config: Mapping) -> dict[str, str]:
    """tokenizer_config.json's special tokens as transformers hands them to a template: strings
    by name (a token may be written as {"content": ...})."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token"):
        value = config.get(name)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def bytes_per_token(tok: Tokenizer, texts_by_lang: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """UTF-8 bytes per token for each language: the compression the
    tokenizer gets (higher is better)."""
    report = {}
    for lang, texts in texts_by_lang.items():
        texts = list(texts)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        report[lang] = sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)
    return report
