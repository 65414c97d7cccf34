"""JSON mode and the other logits processors: the byte automaton, the token-level constraint on a
random-weight model (its output must parse), logit_bias and min_tokens, and the engine's
logits_processors hook."""

import json

import pytest
import torch

from nanoseek import Transformer
from nanoseek.engine import Engine, SamplingParams
from nanoseek.serve.chat_format import EngineTokenizer, TokenTable, chat_prompt, split_reasoning
from nanoseek.serve.logits import (
    START,
    JsonObjectProcessor,
    JsonVocab,
    LogitBias,
    MinTokens,
    need,
    step,
)

from helpers import tiny_config
from serve_helpers import build_tokenizer

VALID = [
    "{}",
    '{"a": 1}',
    '{ "a" : [ ] , "b" : [1, -2.5e+3, 0, 0.25E-1] }',
    '{\n  "a": {\n    "b": [\n      1\n    ]\n  }\n}',
    '{"s": "esc \\" \\\\ \\/ \\n \\u00e9"}',
    '{"t": true, "f": false, "n": null, "nested": {"x": [[], [{}], [[1]]]}}',
    '{"中文": "汉字 🙂"}',
    '{"neg": -0, "exp": 1e5, "frac": 10.01}',
]
INVALID = [
    b"[1]",
    b'"top-level string"',
    b'{"a": 01}',
    b'{"a" 1}',
    b"{,}",
    b'{"a": tru}',
    b'{"a": "\\x"}',
    b'{"a": "\x01"}',
    b'{"a": 1,}',
    b'{"a": [1,]}',
    b'{"a": -}',
    b'{"a": 1.}',
    b'{"a": .5}',
    b'{"a": "\xc0\xaf"}',
    b'{"a": "\xed\xa0\x80"}',
    b'{"a": "\xff"}',
    b"{} {}",
    b"{}x",
    b'{"a": NaN}',
    b"{'a': 1}",
    b' {"leading": "whitespace"}',
    b'{"a":' + b" " * 21 + b"1}",  # a run of whitespace over WS_MAX
]


def run(doc: bytes):
    state = START
    for b in doc:
        state = step(state, b)
        if state is None:
            return None
    return state


@pytest.mark.parametrize("doc", VALID)
def test_valid_json_objects_are_accepted_byte_by_byte(doc):
    assert run(doc.encode("utf-8"))[0] == "done"


@pytest.mark.parametrize("doc", INVALID)
def test_invalid_json_is_refused(doc):
    state = run(doc)
    assert state is None or state[0] != "done"
    if state is not None:  # a valid prefix (like '{"a": 1.'): must not be complete JSON
        with pytest.raises(ValueError):
            json.loads(doc)


CLOSERS = bytes(range(256))  # any byte that brings the end closer will do


@pytest.mark.parametrize("doc", VALID)
def test_need_is_exactly_the_bytes_that_close_every_prefix(doc):
    """From every prefix, some byte lowers need() by one; following such bytes closes the object in
    exactly need() bytes, and the result parses."""
    data = doc.encode("utf-8")
    for cut in range(len(data) + 1):
        state, out = run(data[:cut]), bytearray(data[:cut])
        if state is None or state[0] == "done":
            continue
        todo = need(state)
        for _ in range(todo):
            state, b = next(
                (step(state, b), b)
                for b in CLOSERS
                if step(state, b) is not None and need(step(state, b)) == need(state) - 1
            )
            out.append(b)
        assert state[0] == "done", out
        assert isinstance(json.loads(out.decode("utf-8")), dict)


@pytest.fixture(scope="module")
def random_engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's matmuls gain nothing from threads
    yield make_random_engine()
    torch.set_num_threads(threads)


def make_random_engine():
    tok = build_tokenizer()
    torch.manual_seed(3)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256)).eval()
    return Engine(model, EngineTokenizer(tok)), tok


@pytest.mark.parametrize("thinking", [False, True])
def test_a_random_weight_model_writes_valid_json(random_engine, thinking):
    engine, tok = random_engine
    vocab = JsonVocab(TokenTable(tok), tok.eos_id, tok.special_ids["end_think"])
    ids, in_reasoning = chat_prompt(tok, [{"role": "user", "content": "JSON please"}], thinking)
    params = []
    for seed in range(6):
        for max_tokens in (4, 9, 40):
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=1.0,
                    seed=seed,
                    logits_processors=[JsonObjectProcessor(vocab, max_tokens, in_reasoning)],
                )
            )
    outs = engine.generate([ids] * len(params), params)
    lengths = set()
    for out, p in zip(outs, params):
        reasoning, content = split_reasoning(out.text, in_reasoning)
        assert out.finish_reason == "stop", (out.text, p.max_tokens)
        assert isinstance(json.loads(content), dict), repr(out.text)
        assert len(out.token_ids) <= p.max_tokens and out.token_ids[-1] == tok.eos_id
        assert (reasoning is not None) == thinking
        lengths.add(len(content))
    # (a random model never ends its thought: "</think>" is forced when the budget runs out)
    if not thinking:
        # not only "{}": the model wrote JSON of its own where the budget allowed
        assert max(lengths) > 2


def test_json_needs_no_thought_when_thinking_is_off(random_engine):
    engine, tok = random_engine
    vocab = JsonVocab(TokenTable(tok), tok.eos_id, tok.special_ids["end_think"])
    proc = JsonObjectProcessor(vocab, 20, thinking=False)
    logits = torch.zeros(engine.config.vocab_size)
    allowed = torch.isfinite(proc([], logits)).nonzero().flatten().tolist()
    assert allowed and all(TokenTable(tok).bytes[i].strip() in (b"{", b"") for i in allowed)
    assert tok.special_ids["think"] not in allowed and tok.eos_id not in allowed


def test_json_follows_the_templates_newline_after_the_thought(random_engine):
    engine, tok = random_engine
    table = TokenTable(tok)
    vocab = JsonVocab(table, tok.eos_id, tok.special_ids["end_think"])
    proc = JsonObjectProcessor(vocab, 20, thinking=True)
    logits = torch.zeros(engine.config.vocab_size)
    closed = [*tok.encode("hmm"), tok.special_ids["end_think"]]
    newline = table.bytes.index(b"\n")

    def allowed(ids):
        return torch.isfinite(proc(ids, logits)).nonzero().flatten().tolist()

    assert newline in allowed(closed)
    assert allowed([*closed, newline]) == [i for i in allowed(closed) if i != newline]
    assert all(table.bytes[i].startswith(b"{") for i in allowed([*closed, newline]))


def test_logit_bias_and_min_tokens(random_engine):
    engine, tok = random_engine
    ids = [tok.bos_id, *tok.encode("hello")]
    target = tok.encode("la")[0]
    out = engine.generate(
        [ids],
        SamplingParams(max_tokens=5, temperature=0, logits_processors=[LogitBias({target: 100.0})]),
    )[0]
    assert out.token_ids == [target] * 5
    eos_first = LogitBias({tok.eos_id: 100.0})
    out = engine.generate(
        [ids],
        SamplingParams(
            max_tokens=10, temperature=0, logits_processors=[eos_first, MinTokens(4, [tok.eos_id])]
        ),
    )[0]
    assert (
        len(out.token_ids) == 5
        and out.token_ids[-1] == tok.eos_id
        and tok.eos_id not in out.token_ids[:4]
    )


def test_logprobs_stay_those_of_the_raw_model(random_engine):
    engine, tok = random_engine
    ids = [tok.bos_id, *tok.encode("hello")]
    plain = engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, logprobs=0))[0]
    forced_token = (plain.token_ids[0] + 1) % tok.vocab_size
    biased = engine.generate(
        [ids],
        SamplingParams(
            max_tokens=1,
            temperature=0,
            logprobs=0,
            logits_processors=[LogitBias({forced_token: 100.0})],
        ),
    )[0]
    assert biased.token_ids == [forced_token]
    assert biased.outputs[0].logprobs[0].logprob < plain.outputs[0].logprobs[0].logprob


def test_logits_processors_must_be_callables():
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=["not a function"])
