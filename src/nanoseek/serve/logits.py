"""Logits processors behind API fields: `response_format: json_object`, `logit_bias`, `min_tokens`.
(json_schema, regexes, choices, grammars and tool calls: grammar.py, on llguidance.)

Each is a callable f(output_ids, logits[V]) -> logits[V] for SamplingParams.logits_processors. The
engine calls it for every completion (n > 1 shares one), so a processor derives everything from the
output ids it is given.

JSON mode is a token-level constraint: a pushdown automaton over the bytes of valid JSON says, for
the output so far, which tokens keep it a prefix of one JSON object; all others are masked. Once the
object closes, only EOS remains. To be sure the object closes within max_tokens, each state knows
how many bytes it still needs at least (one closing byte per open container, a quote for an open
string, ...), and a token is allowed only if what it leaves needed still fits in the tokens left
(every byte is a token in byte-level BPE). With thinking on, the thought comes first, unconstrained
but for a forced `</think>` when the budget runs short; JSON follows it (after the newline the
chat template puts there, if the model writes it). Whitespace: none before the object, at most
grammar.WS_MAX bytes in a row elsewhere (as in json_schema mode).

Why json_object keeps this automaton rather than running on llguidance like json_schema: that
property. llguidance answers "which tokens may come next", never "how many tokens does the shortest
completion from here take" (its matcher offers masks, forced tokens and rollback, nothing about
lengths), so on it a JSON object can run out of max_tokens half-written, which is what json_schema
does (finish_reason "length"). The price, measured on this CPU (benchmarks/grammar_mask.py,
docs/serving.md): the automaton's mask costs about as much as llguidance's for a 400-token
vocabulary (0.18 vs 0.14 ms a token) but 17 ms against 0.3 ms for a 32K one (up to 220 ms for a
new state), until its per-state mask cache is warm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from nanoseek.serve.chat_format import TokenTable
from nanoseek.serve.grammar import WS_MAX

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
# UTF-8 lead byte -> (continuation bytes, allowed range of the first one);
# excludes overlongs and surrogates.
UTF8 = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF),
    **{b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)},
    0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF),
    0xF1: (3, 0x80, 0xBF),
    0xF2: (3, 0x80, 0xBF),
    0xF3: (3, 0x80, 0xBF),
    0xF4: (3, 0x80, 0x8F),
}
NUMBER_DONE = {"int0", "int", "frac", "exp"}  # number states that may end here

# A state is (mode, stack, aux, ws): stack holds the open containers ("{" or "["), aux depends on
# the mode, ws counts the whitespace bytes just written (outside strings).
State = tuple
START: State = ("top", "", None, 0)


def step(state: State, b: int) -> State | None:
    """The automaton after one more byte, or None if the byte cannot come next."""
    nxt = _step(state[:3], b)
    if nxt is None:
        return None
    if b in WS and nxt[0] != "str":  # whitespace between tokens (not inside a string)
        return (*nxt, state[3] + 1) if state[3] < WS_MAX else None
    return (*nxt, 0)


def _step(state: tuple, b: int) -> tuple | None:
    mode, stack, aux = state
    if mode == "str":  # aux: (is_key, continuation bytes pending, lo, hi)
        key, pending, lo, hi = aux
        if pending:
            return (mode, stack, (key, pending - 1, 0x80, 0xBF)) if lo <= b <= hi else None
        if b == 0x22:
            return ("colon", stack, None) if key else ("after", stack, None)
        if b == 0x5C:
            return ("esc", stack, key)
        if b < 0x20:
            return None
        if b < 0x80:
            return state
        lead = UTF8.get(b)
        return None if lead is None else (mode, stack, (key, *lead))
    if mode == "esc":
        if b in ESCAPES:
            return ("str", stack, (aux, 0, 0, 0))
        return ("hex", stack, (aux, 4)) if b == ord("u") else None
    if mode == "hex":
        key, left = aux
        if b not in HEX:
            return None
        return ("str", stack, (key, 0, 0, 0)) if left == 1 else (mode, stack, (key, left - 1))
    if mode == "lit":
        if b != aux[0]:
            return None
        return ("lit", stack, aux[1:]) if len(aux) > 1 else ("after", stack, None)
    if mode in ("minus", "int0", "int", "dot", "frac", "e", "esign", "exp"):
        nxt = _number(mode, b)
        if nxt is not None:
            return (nxt, stack, None)
        return _step(("after", stack, None), b) if mode in NUMBER_DONE else None
    if b in WS:
        return state if mode not in ("done", "top") else None
    if mode == "top":
        return ("key?", "{", None) if b == ord("{") else None
    if mode == "val":
        if b == ord("]") and aux:  # "[]"
            return _close(stack)
        return _value(stack, b)
    if mode in ("key?", "key"):
        if b == 0x22:
            return ("str", stack, (True, 0, 0, 0))
        return _close(stack) if b == ord("}") and mode == "key?" else None
    if mode == "colon":
        return ("val", stack, False) if b == ord(":") else None
    if mode == "after":
        top = stack[-1]
        if b == ord(","):
            return ("key", stack, None) if top == "{" else ("val", stack, False)
        return _close(stack) if b == ord("}" if top == "{" else "]") else None
    return None  # done


def _value(stack: str, b: int) -> State | None:
    if b == ord("{"):
        return ("key?", stack + "{", None)
    if b == ord("["):
        return ("val", stack + "[", True)
    if b == 0x22:
        return ("str", stack, (False, 0, 0, 0))
    if b in LITERALS:
        return ("lit", stack, LITERALS[b])
    if b == ord("-"):
        return ("minus", stack, None)
    if b in DIGITS:
        return ("int0" if b == ord("0") else "int", stack, None)
    return None


def _number(mode: str, b: int) -> str | None:
    digit = b in DIGITS
    if mode == "minus":
        return ("int0" if b == ord("0") else "int") if digit else None
    if mode in ("int0", "int") and b == ord("."):
        return "dot"
    if mode in ("int0", "int", "frac") and b in b"eE":
        return "e"
    if mode == "e" and b in b"+-":
        return "esign"
    if digit:
        return {
            "int": "int",
            "dot": "frac",
            "frac": "frac",
            "e": "exp",
            "esign": "exp",
            "exp": "exp",
        }.get(mode)
    return None


def _close(stack: str) -> State:
    return ("done", "", None) if len(stack) == 1 else ("after", stack[:-1], None)


def need(state: State) -> int:
    """The fewest bytes that complete the object from here."""
    mode, stack, aux = state[:3]
    if mode == "str":
        key, pending = aux[0], aux[1]
        lexical = pending + (3 if key else 1)  # '"', then ':0' for a key
    elif mode == "esc":
        lexical = 4 if aux else 2
    elif mode == "hex":
        lexical = aux[1] + (3 if aux[0] else 1)
    elif mode == "lit":
        lexical = len(aux)
    elif mode == "val":
        lexical = 0 if aux else 1  # right after "[" the array may close at once
    else:
        lexical = _LEXICAL_NEED.get(mode, 0)
    return lexical + len(stack)


_LEXICAL_NEED = {"top": 2, "key": 4, "colon": 2, "minus": 1, "dot": 1, "e": 1, "esign": 1}


class _Trie:
    __slots__ = ("children", "ids")

    def __init__(self):
        self.children: dict[int, _Trie] = {}
        self.ids: list[int] = []


class JsonVocab:
    """What JSON mode needs to know about a vocabulary, built once per tokenizer: a byte
    trie of the tokens and, per automaton state, each token's `need` after it (a shared
    LRU cache: states repeat across requests)."""

    NEVER = 1 << 30

    def __init__(
        self, table: TokenTable, eos_id: int, end_think_id: int | None, cache_size: int = 512
    ):
        self.size = table.size
        self.eos_id = eos_id
        self.end_think_id = end_think_id
        self.table = table
        # the newline the chat template puts after `</think>` (the answer's JSON follows it)
        self.newline_id = next((i for i, b in enumerate(table.bytes) if b == b"\n"), None)
        self.root = _Trie()
        for i, b in enumerate(table.bytes):
            if b:  # special tokens (None) and empty tokens never advance JSON
                node = self.root
                for byte in b:
                    node = node.children.setdefault(byte, _Trie())
                node.ids.append(i)
        self._masks: OrderedDict[State, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def advance(self, state: State | None, token: int) -> State | None:
        b = self.table.bytes[token] if 0 <= token < self.size else None
        if state is None or not b:
            return state if state is not None and token == self.eos_id else None
        for byte in b:
            state = step(state, byte)
            if state is None:
                return None
        return state

    def needs_after(self, state: State) -> torch.Tensor:
        """int64 [V]: need() after each token from `state` (NEVER
        where the token is not allowed)."""
        hit = self._masks.get(state)
        if hit is not None:
            self._masks.move_to_end(state)
            return hit
        out = [self.NEVER] * self.size
        todo = [(self.root, state)]
        while todo:
            node, st = todo.pop()
            for byte, child in node.children.items():
                nxt = step(st, byte)
                if nxt is None:
                    continue
                if child.ids:
                    n = need(nxt)
                    for i in child.ids:
                        out[i] = n
                if child.children:
                    todo.append((child, nxt))
        if state[0] == "done":
            out[self.eos_id] = -1
        result = torch.tensor(out)
        self._masks[state] = result
        if len(self._masks) > self.cache_size:
            self._masks.popitem(last=False)
        return result


class JsonObjectProcessor:
    """Constrain the output (or, with thinking, what follows `</think>`) to
    one JSON object within max_tokens."""

    def __init__(self, vocab: JsonVocab, max_tokens: int, thinking: bool):
        self.vocab = vocab
        self.max_tokens = max_tokens
        self.thinking = thinking and vocab.end_think_id is not None
        # JSON state after a run of JSON tokens, keyed by (length, hash):
        # each call extends the previous one.
        self._states: OrderedDict[tuple[int, int], State | None] = OrderedDict()

    def state(self, output_ids: Sequence[int]) -> State | None:
        """The JSON state after these output tokens; None if the output
        can no longer be valid JSON."""
        ids = tuple(output_ids)
        if self.thinking:
            ids = ids[ids.index(self.vocab.end_think_id) + 1 :]
            if ids[:1] == (self.vocab.newline_id,):  # the template's newline after the thought
                ids = ids[1:]
        key = (len(ids), hash(ids))
        if key in self._states:
            return self._states[key]
        prev = (len(ids) - 1, hash(ids[:-1]))
        if not ids:
            st = START
        elif prev in self._states:
            st = self.vocab.advance(self._states[prev], ids[-1])
        else:  # a first look at this sequence (or an evicted one): replay it
            st = START
            for t in ids:
                st = self.vocab.advance(st, t)
        self._states[key] = st
        if len(self._states) > 4096:
            self._states.popitem(last=False)
        return st

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        left = self.max_tokens - len(output_ids)  # tokens left, this one included
        vocab = self.vocab
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        if self.thinking and vocab.end_think_id not in output_ids:
            if left > need(START) + 2:  # room for "</think>", the smallest object, EOS
                allowed[: vocab.size] = True
                allowed[vocab.eos_id] = False
            else:
                allowed[vocab.end_think_id] = True
        else:
            st = self.state(output_ids)
            if st is not None:
                allowed[: vocab.size] = (vocab.needs_after(st) <= left - 2).to(logits.device)
            just_thought = self.thinking and output_ids[-1] == vocab.end_think_id
            if just_thought and vocab.newline_id is not None and need(START) <= left - 2:
                allowed[vocab.newline_id] = True
        if not allowed.any():  # cannot happen with the budget kept; end rather than emit junk
            allowed[vocab.eos_id] = True
        return logits.masked_fill(~allowed, float("-inf"))


class LogitBias:
    """OpenAI logit_bias: {token id: bias in [-100, 100]} added to the logits."""

    def __init__(self, bias: Mapping[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[self.ids.to(logits.device)] += self.values.to(logits.device, logits.dtype)
        return logits


class MinTokens:
    """vLLM's min_tokens: EOS and stop tokens are masked until the output has this many tokens."""

    def __init__(self, min_tokens: int, stop_ids: Sequence[int]):
        self.min_tokens = min_tokens
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) >= self.min_tokens:
            return logits
        logits = logits.clone()
        logits[self.stop_ids.to(logits.device)] = float("-inf")
        return logits
