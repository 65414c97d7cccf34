"""Scoring over HTTP: /v1/completions with echo + logprobs returns the prompt's logprobs (the first
null) followed by the completion's, as OpenAI's legacy completions and vLLM do; max_tokens=0 scores
only; vLLM's prompt_logprobs extra; /tokenize, /detokenize and /tokenizer_info in vLLM's shapes
(what lm-evaluation-harness's remote tokenizer reads); /metrics' cache usage and MTP acceptance.

The app runs in this process on real HTTP, with MTP speculation on and small prefill chunks; every
logprob is checked against log_softmax of a plain model(ids) on the same checkpoint (1e-4)."""

import json
import math

import httpx
import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer, save_model
from nanoseek.checkpoint import load_checkpoint
from nanoseek.serve.app import create_app
from nanoseek.serve.chat_format import TokenTable
from nanoseek.serve.config import ServerConfig
from nanoseek.tokenizer import load_tokenizer

from helpers import tiny_config
from serve_helpers import InProcessServer, build_tokenizer, metric

NAME = "scorer"
TEXT = "The quick brown fox jumps over the lazy dog. 你好，世界！"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights (ten times the usual scale, so the distributions are far from uniform) with an
    MTP module, and the serving tests' trained tokenizer."""
    tok = build_tokenizer()
    torch.manual_seed(3)
    model = Transformer(
        tiny_config(
            vocab_size=tok.vocab_size,
            max_position_embeddings=256,
            num_nextn_predict_layers=1,
            initializer_range=0.2,
        )
    )
    path = tmp_path_factory.mktemp("scoring") / "model"
    save_model(model.eval(), path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    config = ServerConfig(model_name=NAME)
    engine = dict(speculative=True, max_num_batched_tokens=16, block_size=4)
    app = create_app(config, lambda: load_checkpoint(checkpoint), engine_options=engine)
    with InProcessServer(app) as s:
        while httpx.get(s.url + "/health").status_code != 200:
            pass
        yield s


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint).model


@pytest.fixture(scope="module")
def tok(checkpoint):
    return load_tokenizer(checkpoint)


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r, status) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@torch.no_grad()
def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the distribution of the token after ids[: i + 1]."""
    return F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def check_echo_logprobs(model, tok, prompt: list[int], choice: dict, k: int, generated: int):
    """An echo + logprobs choice against the reference: the prompt's tokens (first null), then the
    generated ones, each logprob and its top-k within 1e-4."""
    lp = choice["logprobs"]
    n = len(prompt) + generated
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids = prompt + tokens_of(tok, lp["tokens"][len(prompt) :])
    ref = log_softmax(model, ids)
    for i in range(1, n):
        row = ref[i - 1]
        assert abs(lp["token_logprobs"][i] - row[ids[i]].item()) < 1e-4
        best = row.topk(k)
        top = lp["top_logprobs"][i]
        assert len(top) == k
        for (text, value), j, v in zip(top.items(), best.indices.tolist(), best.values.tolist()):
            assert text == token_text(tok, j) and abs(value - v) < 1e-4
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    return ids


_TABLES = {}


def token_text(tok, i: int) -> str:
    """How the API shows token i (its text; a special token's name; escapes for partial bytes)."""
    if id(tok) not in _TABLES:
        _TABLES[id(tok)] = TokenTable(tok)
    return _TABLES[id(tok)].text(i)


def tokens_of(tok, texts: list[str]) -> list[int]:
    """Token strings back to ids (every token of this vocabulary shows as a different string)."""
    index = {token_text(tok, i): i for i in range(tok.vocab_size)}
    assert len(index) == tok.vocab_size
    return [index[t] for t in texts]


def test_echo_logprobs_cover_the_prompt_then_the_completion(server, model, tok):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=1, max_tokens=1, temperature 0,
    a text prompt and then a batch of token-id prompts (one longer than a prefill chunk)."""
    body = {
        "prompt": TEXT,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
        "ignore_eos": True,
    }
    out = ok(post(server, "/v1/completions", {"model": NAME, **body}))
    choice = out["choices"][0]
    prompt = [tok.bos_id, *tok.encode(TEXT)]
    ids = check_echo_logprobs(model, tok, prompt, choice, 1, 1)
    assert choice["text"] == TEXT + tok.decode(ids[len(prompt) :], skip_special_tokens=True)
    assert choice["logprobs"]["tokens"][0] == tok.id_to_token(tok.bos_id)
    assert choice["logprobs"]["text_offset"][len(prompt)] == len(TEXT)  # the completion's start
    assert out["usage"]["prompt_tokens"] == len(prompt) and out["usage"]["completion_tokens"] == 1

    batch = [tok.encode("lazy dog jumps"), tok.encode(TEXT * 2)[:40], [5, 6]]
    body = {"prompt": batch, "echo": True, "logprobs": 3, "max_tokens": 2, "temperature": 0}
    body["ignore_eos"] = True
    out = ok(post(server, "/v1/completions", body))
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for prompt, choice in zip(batch, out["choices"]):
        check_echo_logprobs(model, tok, prompt, choice, 3, 2)
        assert choice["text"].startswith(tok.decode(prompt, skip_special_tokens=True))


def test_max_tokens_zero_with_echo_scores_the_prompt_only(server, model, tok):
    prompt = tok.encode(TEXT)
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0}
    out = ok(post(server, "/v1/completions", body))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == TEXT
    check_echo_logprobs(model, tok, prompt, choice, 2, 0)
    assert out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] == len(prompt)
    # a prompt may fill the whole context when nothing is generated
    context = ok(post(server, "/tokenize", {"prompt": "x"}))["max_model_len"]
    full = (prompt * 20)[:context]
    ok(post(server, "/v1/completions", {"prompt": full, "echo": True, "max_tokens": 0}))
    err = error_of(post(server, "/v1/completions", {"prompt": full, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    err = error_of(post(server, "/v1/completions", {"prompt": full + [5], "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"  # max_tokens=0 only scores: with echo or prompt_logprobs
    body = {"prompt": full + [5], "echo": True, "max_tokens": 0}
    assert error_of(post(server, "/v1/completions", body), 400)["param"] == "prompt"


def test_prompt_logprobs_in_vllms_shape(server, model, tok):
    """prompt_logprobs (vLLM's extra) on completions and chat: per prompt token None (the first) or
    {token id: {logprob, rank, decoded_token}} holding the prompt's token and the top-k."""
    prompt = tok.encode("Numbers like 12, 345 and 6789")
    out = ok(post(server, "/v1/completions", {"prompt": prompt, "prompt_logprobs": 2}))
    got = out["choices"][0]["prompt_logprobs"]
    assert "logprobs" in out["choices"][0] and out["choices"][0]["logprobs"] is None
    ref = log_softmax(model, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        row = ref[i - 1]
        entry = got[i]
        actual = entry[str(prompt[i])]
        assert abs(actual["logprob"] - row[prompt[i]].item()) < 1e-4
        assert actual["rank"] == int((row > row[prompt[i]]).sum()) + 1
        assert actual["decoded_token"] == token_text(tok, prompt[i])
        best = row.topk(2)
        expected = {str(j) for j in best.indices.tolist()} | {str(prompt[i])}
        assert set(entry) == expected
        for rank, j in enumerate(best.indices.tolist(), 1):
            assert entry[str(j)]["rank"] == rank
    # without it, no such key
    plain = ok(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1}))
    assert "prompt_logprobs" not in plain["choices"][0]

    messages = [{"role": "user", "content": "Hello"}]
    out = ok(
        post(server, "/v1/chat/completions", {"messages": messages, "prompt_logprobs": 0, "n": 2})
    )
    ids = ok(post(server, "/tokenize", {"messages": messages}))["tokens"]
    got = out["prompt_logprobs"]
    ref = log_softmax(model, ids)
    assert len(got) == len(ids) == out["usage"]["prompt_tokens"] and got[0] is None
    for i in range(1, len(ids)):
        assert abs(got[i][str(ids[i])]["logprob"] - ref[i - 1][ids[i]].item()) < 1e-4
    assert "prompt_logprobs" not in ok(post(server, "/v1/chat/completions", {"messages": messages}))


@pytest.mark.parametrize("max_tokens", [4, 0])
def test_streamed_echo_logprobs_equal_the_response(server, max_tokens):
    body = {"prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": max_tokens}
    body |= {"temperature": 0, "ignore_eos": True}
    whole = ok(post(server, "/v1/completions", body))["choices"][0]
    chunks = []
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    merged = {key: [] for key in whole["logprobs"]}
    for c in chunks:
        for key in merged:
            merged[key] += (c["logprobs"] or {}).get(key, [])
    assert merged == whole["logprobs"]
    assert chunks[0]["text"] == TEXT and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert [c["finish_reason"] for c in chunks if c["finish_reason"]] == ["length"]


def test_tokenize_and_detokenize_in_vllms_shapes(server, tok):
    out = ok(post(server, "/tokenize", {"model": NAME, "prompt": TEXT}))
    assert out["tokens"] == [tok.bos_id, *tok.encode(TEXT)] and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 256 and "token_strs" not in out or out["token_strs"] is None
    body = {"prompt": TEXT, "add_special_tokens": False, "return_token_strs": True}
    out = ok(post(server, "/tokenize", body))
    assert out["tokens"] == tok.encode(TEXT)
    assert out["token_strs"] == [tok.id_to_token(i) for i in out["tokens"]]
    assert ok(post(server, "/detokenize", {"tokens": out["tokens"]})) == {"prompt": TEXT}
    # the completions endpoint runs what /tokenize says
    usage = ok(post(server, "/v1/completions", {"prompt": TEXT, "max_tokens": 1}))["usage"]
    assert usage["prompt_tokens"] == len(tok.encode(TEXT)) + 1

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    chat = ok(post(server, "/tokenize", {"messages": messages}))
    usage = ok(post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}))
    assert chat["count"] == usage["usage"]["prompt_tokens"]
    thinking = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=True)
    assert chat["tokens"] == thinking
    plain = ok(
        post(
            server, "/tokenize", {"messages": messages, "chat_template_kwargs": {"thinking": False}}
        )
    )
    assert plain["tokens"] == tok.apply_chat_template(
        messages, add_generation_prompt=True, thinking=False
    )
    bare = ok(post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}))
    assert bare["tokens"] == tok.apply_chat_template(messages)
    prefix = messages + [{"role": "assistant", "content": "好"}]
    body = {"messages": prefix, "add_generation_prompt": False, "continue_final_message": True}
    cont = ok(post(server, "/tokenize", body))["tokens"]
    assert cont[: len(plain["tokens"])] == plain["tokens"]
    assert tok.decode(cont[len(plain["tokens"]) :]) == "好"


def test_tokenizer_info_and_bad_input(server, tok, checkpoint):
    info = ok(httpx.get(server.url + "/tokenizer_info"))
    assert info["eos_token"] == tok.id_to_token(tok.eos_id)
    assert info["bos_token"] == tok.id_to_token(tok.bos_id)
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((checkpoint / "tokenizer_config.json").read_text("utf-8"))
    assert info["chat_template"] == config["chat_template"]
    for path, body, param in [
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True},
            "continue_final_message",
        ),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
        (
            "/v1/completions",
            {"prompt": "a", "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
        ),
        ("/v1/completions", {"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "prompt_logprobs": -1},
            "prompt_logprobs",
        ),
    ]:
        assert error_of(post(server, path, body), 400)["param"] == param, (path, body)
    err = error_of(post(server, "/tokenize", {"model": "gpt-4", "prompt": "a"}), 404)
    assert err["param"] == "model"
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_report_cache_usage_and_mtp_acceptance(server):
    body = {"prompt": TEXT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    ok(post(server, "/v1/completions", body))
    text = httpx.get(server.url + "/metrics").text
    drafted = metric(text, "nanoseek_spec_decode_draft_tokens_total")
    accepted = metric(text, "nanoseek_spec_decode_accepted_tokens_total")
    assert drafted > 0 and 0 <= accepted <= drafted
    rate = metric(text, "nanoseek_spec_decode_acceptance_rate")
    assert math.isclose(rate, accepted / drafted)
    stats = server.state.engine_stats()
    usage = metric(text, "nanoseek_kv_cache_usage_ratio")
    assert usage == 1 - stats["free_blocks"] / stats["total_blocks"] and 0 <= usage <= 1
    assert metric(text, "nanoseek_kv_cache_capacity_tokens") == stats["capacity_tokens"]
    assert "# TYPE nanoseek_kv_cache_usage_ratio gauge" in text


def test_tokenizer_routes_need_the_api_key_when_one_is_set(checkpoint):
    """The key guards /tokenize, /detokenize and /tokenizer_info as it guards /v1/*; lm-eval's
    remote tokenizer sends it as a Bearer token (its auth_token model argument)."""
    app = create_app(ServerConfig(api_key="k3y"), lambda: load_checkpoint(checkpoint))
    with InProcessServer(app) as s:
        while httpx.get(s.url + "/health").status_code != 200:
            pass
        for method, path, body in [
            ("POST", "/tokenize", {"prompt": "a"}),
            ("POST", "/detokenize", {"tokens": [5]}),
            ("GET", "/tokenizer_info", None),
        ]:
            r = httpx.request(method, s.url + path, json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = httpx.request(
                method, s.url + path, json=body, headers={"Authorization": "Bearer k3y"}
            )
            assert r.status_code == 200, r.text
