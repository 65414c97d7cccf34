"""Structured output with a grammar engine (llguidance): JSON schemas, regexes, choices, Lark/GBNF
grammars and DeepSeek tool calls, compiled into a token mask per decoding step.

`GrammarVocab` is the token table llguidance needs, built once per server from the exact bytes of
every token (chat_format.TokenTable; special tokens are named, never matched by text).
`compile()` turns a grammar into something a request can use, or a GrammarError naming the field
and llguidance's reason. `GrammarProcessor` is a SamplingParams logits processor: it keeps one
llguidance matcher per output prefix (the engine shares one processor among a request's n
completions and may ask about speculative drafts), so it derives everything from the ids it is
given. With thinking on, the thought is free (but EOS is masked: the answer must follow) and the
grammar applies to what follows `</think>` (and the newline the chat template puts after it, if
the model writes it); a `trigger` token (a tool call's opener under tool_choice auto) likewise
leaves the output free until the model writes it.

When max_tokens runs out before the grammar is complete, the output stops there: finish_reason
"length" with the partial text, as OpenAI does. llguidance cannot promise to close within a budget
(it does not expose the shortest completion of a state); json_object mode keeps its own automaton
for that reason (logits.py).

JSON whitespace: none before the value, at most WS_MAX bytes between two tokens (llguidance's
default lets a model pad forever).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper, grammar_from

from nanoseek.serve.chat_format import TokenTable

WS_MAX = 20  # whitespace bytes between two JSON tokens (json_object mode uses the same cap)
WHITESPACE = rf"[\x20\x0A\x0D\x09]{{0,{WS_MAX}}}"
JSON_OPTIONS = {"whitespace_pattern": WHITESPACE}
# matchers a processor keeps: 4 per sequence sharing it (its prefix, the one before, a draft's),
# plus this many; an evicted prefix is replayed from the start
MATCHERS = 64
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class GrammarError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Tokens:
    """What llguidance's TokenizerWrapper reads: token bytes (special tokens as 0xFF + name, which
    text never matches) and an encoder."""

    def __init__(self, table: TokenTable, encode, eos_id: int, bos_id: int | None):
        self.eos_token_id = eos_id
        self.bos_token_id = bos_id
        self.tokens = [
            b if b is not None else b"\xff" + table.names[i].encode("utf-8")
            for i, b in enumerate(table.bytes)
        ]
        self.special_token_ids = [i for i, b in enumerate(table.bytes) if b is None]
        self._encode = encode

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # llguidance probes for a bytes encoder: there is none
        return self._encode(text)


class GrammarVocab:
    """A tokenizer's token table for llguidance (2 ms for 400 tokens, 0.23 s for 32K on the
    development machine): build once per server."""

    def __init__(self, table: TokenTable, tok):
        self.size = table.size
        self.eos_id = tok.eos_id
        self.end_think_id = tok.special_ids.get("end_think")
        self.special_ids = dict(tok.special_ids)
        # the newline the chat template puts after `</think>`: allowed there, before the grammar
        self.newline_id = next((i for i, b in enumerate(table.bytes) if b == b"\n"), None)
        wrapper = TokenizerWrapper(_Tokens(table, tok.encode, tok.eos_id, tok.bos_id))
        self.tokenizer = LLTokenizer(wrapper, n_vocab=table.size, eos_token=tok.eos_id)

    def compile(self, grammar: str, param: str | None = None) -> Grammar:
        """A checked grammar (llguidance's serialised form), or GrammarError with the reason."""
        try:
            failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except Exception as e:  # a grammar the validator itself chokes on
            failed = True
            messages = [str(e)]
        if not failed:
            matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
            failed = matcher.is_error()
            messages = [matcher.get_error()]
        if failed:
            raise GrammarError(
                f"the grammar engine cannot compile it: {_short(messages[0])}", param
            )
        return Grammar(grammar, matcher)

    def build(self, kind: str, value, param: str | None = None) -> Grammar:
        """A structured-output mode's grammar: kind json_schema (value: a schema), regex, choice (a
        list of strings) or grammar (Lark or GBNF text)."""
        builders = {
            "json_schema": json_schema_grammar,
            "regex": regex_grammar,
            "choice": choice_grammar,
            "grammar": text_grammar,
        }
        try:
            text = builders[kind](value)
        except Exception as e:  # whatever the client's grammar breaks is the client's 400
            message = f"the grammar engine cannot compile it: {_short(str(e))}"
            raise GrammarError(message, param) from None
        return self.compile(text, param)

    def mask(self, matcher: LLMatcher, width: int, device) -> torch.Tensor:
        """bool [width]: the tokens the matcher allows next (ids past the tokenizer: never)."""
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.size].astype(bool)
        out = torch.zeros(width, dtype=torch.bool)
        n = min(width, self.size)
        out[:n] = torch.from_numpy(allowed[:n])
        return out.to(device)


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: its text and a fresh matcher to copy for each output."""

    text: str
    start: LLMatcher


def _short(error: str) -> str:
    """llguidance's message without the parser state and grammar it appends."""
    error = error.split("\n<state>")[0].split("\n<grammar>")[0].strip()
    return error[:500]


# ------------------------------------------------------------------------------------ grammar text


def json_schema_grammar(schema: dict | bool) -> str:
    """A JSON value that validates against `schema` (whitespace capped, see the module doc)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def regex_grammar(pattern: str) -> str:
    return LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: Sequence[str]) -> str:
    """Exactly one of the strings."""
    return LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_str(c) for c in choices))


def text_grammar(grammar: str) -> str:
    """A Lark grammar or a GBNF one (llama.cpp's syntax), as vLLM's guided_grammar takes them."""
    return grammar_from("grammar", grammar)


def _lark_str(text: str) -> str:
    # json.dumps escapes quotes, backslashes and control characters the way Lark's strings read them
    return json.dumps(text, ensure_ascii=False)


def _token(vocab: GrammarVocab, name: str) -> str:
    i = vocab.special_ids.get(name)
    if i is None:
        raise GrammarError(f"the tokenizer has no {name} token")
    return f"<[{i}]>"


def wrapped_json_grammar(
    vocab: GrammarVocab,
    parts: Sequence[str | int | dict],
) -> str:
    """A sequence of literal text (str), special tokens (int ids) and JSON values (dict: a schema),
    in order: e.g. ["NAME\\n```json\\n", schema, "\\n```", call_end_id]."""
    return LLMatcher.grammar_from_lark("start: " + _sequence(vocab, parts, "v"))


def _sequence(vocab: GrammarVocab, parts: Sequence[str | int | dict], prefix: str) -> str:
    items = []
    rules = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            if part:
                items.append(_lark_str(part))
        elif isinstance(part, int) and not isinstance(part, bool):
            if not 0 <= part < vocab.size:
                raise GrammarError(f"token id {part} is outside the vocabulary")
            items.append(f"<[{part}]>")
        elif isinstance(part, dict):
            name = f"{prefix}_{i}"
            schema = {**part, "x-guidance": JSON_OPTIONS}
            rules.append(f"{name}: %json {json.dumps(schema)}")
            items.append(name)
        else:
            raise TypeError(f"a grammar part is text, a token id or a schema, not {part!r}")
    return " ".join(items) + "".join(f"\n{r}" for r in rules)


def tool_calls_grammar(
    vocab: GrammarVocab,
    tools: Sequence[tuple[str, dict]],
    style: str = "v3",
    parallel: bool = True,
    opened: bool = False,
    prefilled: str | None = None,
) -> str:
    """DeepSeek tool calls whose arguments match each function's parameter schema.

    tools: (name, parameters schema) pairs; the model may call any of them. With CB, CE, SEP for
    `<｜tool▁call▁begin｜>`, `<｜tool▁call▁end｜>`, `<｜tool▁sep｜>`: style "v3" writes each call as
    CB "function" SEP NAME "\\n```json\\n" ARGS "\\n```" CE, later calls after a newline (V3's
    template; R1's has none, also allowed); "v31" as CB NAME SEP ARGS CE, chained (V3.1's). All
    calls sit between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>`; after that only EOS.
    parallel=False: exactly one call. Where the grammar starts (what is already written, by the
    model or by a prompt the server prefilled), `prefilled`:
      "none"       it starts with `<｜tool▁calls▁begin｜>` (the default; opened=False);
      "calls"      after `<｜tool▁calls▁begin｜>` (opened=True: the processor's trigger, for
                   tool_choice auto);
      "call"       after `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>` (tool_choice required);
      "arguments"  after the head of a call of the first tool, up to its arguments (a named
                   tool_choice: serve.tools.generation_prefix), so only that function's arguments
                   and the close follow; with parallel, more calls of any of the tools may too."""
    if style not in ("v3", "v31"):
        raise ValueError(f"tool-call style is v3 or v31, not {style!r}")
    prefilled = prefilled or ("calls" if opened else "none")
    if prefilled not in ("none", "calls", "call", "arguments"):
        raise ValueError(f"prefilled is none, calls, call or arguments, not {prefilled!r}")
    if not tools:
        raise GrammarError("no tools to call")
    begin = _token(vocab, "tool_calls_begin")
    end = _token(vocab, "tool_calls_end")
    call_begin = vocab.special_ids.get("tool_call_begin")
    call_end = vocab.special_ids.get("tool_call_end")
    sep = vocab.special_ids.get("tool_sep")
    if None in (call_begin, call_end, sep):
        raise GrammarError("the tokenizer lacks DeepSeek's tool-call tokens")
    rules = []
    names = []
    firsts = []
    for k, (name, schema) in enumerate(tools):
        if not FUNCTION_NAME.fullmatch(name):
            raise GrammarError(f"function name {name!r} is not [A-Za-z0-9_-]{{1,64}}")
        if style == "v3":
            parts = [call_begin, "function", sep, f"{name}\n```json\n", schema, "\n```", call_end]
        else:
            parts = [call_begin, name, sep, schema, call_end]
        rules.append(f"call_{k}: " + _sequence(vocab, parts, f"args_{k}"))
        names.append(f"call_{k}")
        # the first call, for a grammar that starts inside it
        if prefilled == "call":
            rest = parts[1:]
        elif prefilled == "arguments" and k == 0:
            rest = parts[next(i for i, p in enumerate(parts) if isinstance(p, dict)) :]
        else:
            continue
        rules.append(f"first_{k}: " + _sequence(vocab, rest, f"first_args_{k}"))
        firsts.append(f"first_{k}")
    separator = '"\\n"? ' if style == "v3" else ""  # R1's template leaves the newline out
    first = "call" if prefilled in ("none", "calls") else "first"
    calls = f"{first} ({separator}call)*" if parallel else first
    head = f"{begin} " if prefilled == "none" else ""
    lines = [f"start: {head}{calls} {end}", "call: " + " | ".join(names), *rules]
    if firsts:
        lines.append("first: " + " | ".join(firsts))
    return LLMatcher.grammar_from_lark("\n".join(lines))


# ---------------------------------------------------------------------------------------- processor


class GrammarProcessor:
    """Masks every token that the grammar does not allow next; see the module doc for thinking and
    the trigger."""

    def __init__(
        self,
        vocab: GrammarVocab,
        grammar: Grammar,
        thinking: bool = False,
        trigger: int | None = None,
        sequences: int = 1,
    ):
        """sequences: how many outputs share this processor (prompts x n), to size its cache."""
        self.vocab = vocab
        self.capacity = 4 * sequences + MATCHERS
        self.grammar = grammar
        self.thinking = thinking and vocab.end_think_id is not None
        self.trigger = trigger
        self._matchers: OrderedDict[tuple[int, int], LLMatcher] = OrderedDict()

    def constrained(self, output_ids: Sequence[int]) -> list[int] | None:
        """The part of the output the grammar reads; None while it is not engaged yet."""
        ids = list(output_ids)
        if self.thinking:
            if self.vocab.end_think_id not in ids:
                return None
            ids = ids[ids.index(self.vocab.end_think_id) + 1 :]
            if ids[:1] == [self.vocab.newline_id]:
                ids = ids[1:]
        if self.trigger is not None:
            if self.trigger not in ids:
                return None
            ids = ids[ids.index(self.trigger) + 1 :]
        return ids

    def matcher(self, ids: list[int]) -> LLMatcher:
        """The matcher after these tokens (in an error state if they break the grammar)."""
        key = (len(ids), hash(tuple(ids)))
        found = self._matchers.get(key)
        if found is not None:
            self._matchers.move_to_end(key)
            return found
        prev = self._matchers.get((len(ids) - 1, hash(tuple(ids[:-1])))) if ids else None
        if prev is not None:
            m = prev.deep_copy()
            m.consume_token(ids[-1])
        else:  # the start, or a prefix evicted from the cache: replay
            m = self.grammar.start.deep_copy()
            m.consume_tokens(ids)
        self._matchers[key] = m
        if len(self._matchers) > self.capacity:
            self._matchers.popitem(last=False)
        return m

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        ids = self.constrained(output_ids)
        if ids is None:
            if self.thinking and self.vocab.end_think_id not in output_ids:
                logits = logits.clone()
                logits[self.vocab.eos_id] = float("-inf")  # the answer must follow the thought
            return logits
        m = self.matcher(ids)
        if m.is_error():  # only after a token the mask refused (a rejected draft): end
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            allowed[self.vocab.eos_id] = True
        else:
            allowed = self.vocab.mask(m, logits.shape[-1], logits.device)
            just_thought = self.thinking and output_ids[-1] == self.vocab.end_think_id
            if just_thought and self.trigger is None and self.vocab.newline_id is not None:
                allowed[self.vocab.newline_id] = True
        return logits.masked_fill(~allowed, float("-inf"))
