"""lm-evaluation-harness drives a real `nanoseek serve`, offline: two tasks defined here (a task
YAML and JSONL data in tmp_path, read by HF datasets' local json loader), `local-completions` on a
multiple-choice task and `local-chat-completions` on a generation task, each run as the `lm_eval`
command with --log_samples.

- Every loglikelihood lm-eval logs equals a plain log_softmax of model(ids) on the same checkpoint
  (1e-4), with the ids lm-eval's own context/continuation split gives: it tokenizes through the
  server's /tokenize (its `auto` backend finds /tokenizer_info and /tokenize), sends token ids, and
  sums the echoed prompt logprobs after the context.
- Every generation equals greedy decoding done here with model(ids), token by token.
- Nothing reaches the network: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, and a sitecustomize in the
  lm_eval process that refuses any connection but to 127.0.0.1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_checkpoint
from nanoseek.tokenizer import load_tokenizer

from serve_helpers import SCRIPT, ServerProcess, metric, shared_checkpoint

pytest.importorskip("lm_eval", reason="pip install 'lm-eval[api]' (in the test extra)")

NAME = "nanoseek-lm-eval"
MAX_GEN = 48

# lm_eval's process may talk to the server on 127.0.0.1 and to nothing else
NO_NETWORK = """
import socket

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1"):
        raise OSError(f"test: lm_eval tried to reach {address!r}")
    return _connect(self, address)


socket.socket.connect = _local_only
"""

MC_DOCS = [
    {
        "question": "The quick brown fox jumps over the",
        "choices": ["lazy dog", "user"],
        "answer": 0,
    },
    {"question": "你好，世界！今天天气", "choices": ["很好", "模型", "la la"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "answer": 0},
    {"question": "Numbers like 12, 345 and", "choices": [" 6789", " digits", "!"], "answer": 0},
]

MC_TASK = """task: nanoseek_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

GEN_TASK = """task: nanoseek_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<｜User｜>"]
  max_gen_toks: {max_gen}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def checkpoint():
    return shared_checkpoint()


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(checkpoint, "--model-name", NAME) as s:
        yield s.wait_ready()


def write_task(directory: Path, template: str, docs: list[dict], name: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    (directory / f"{name}.yaml").write_text(
        template.format(data=json.dumps(str(data)), max_gen=MAX_GEN), "utf-8"
    )


def run_lm_eval(tmp_path: Path, model: str, model_args: str, task: str, *extra: str) -> list[dict]:
    """`lm_eval run` offline on the tasks in tmp_path/tasks -> its logged samples."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    out = tmp_path / f"out-{task}"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),  # nothing cached from elsewhere is read either
        OPENAI_API_KEY="",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        task,
        "--include_path",
        str(tmp_path / "tasks"),
        "--output_path",
        str(out),
        "--log_samples",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "tried to reach" not in proc.stderr, proc.stderr[-3000:]
    files = list(out.rglob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, list(out.rglob("*"))
    return [json.loads(line) for line in files[0].read_text("utf-8").splitlines()]


@torch.no_grad()
def reference_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from one model(ids) call, with the ids lm-eval builds: trailing
    spaces of the context move to the continuation, the whole is encoded, the context's tokens are
    the first len(encode(context)) (no BOS: lm-eval's default add_bos_token=False)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctxlen = len(tok.encode(context))
    logp = F.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(ctxlen, len(whole)))


@torch.no_grad()
def reference_chat_reply(model, tok, messages: list[dict], stop: list[str]) -> str:
    """What the chat endpoint answers, by greedy decoding with model(ids) on the whole sequence for
    every token: the prompt as the chat template renders it (thinking on, the server's default),
    up to EOS or MAX_GEN tokens; the answer is the text after </think> (its newline dropped), cut
    at a stop string."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, thinking=True)
    generated = []
    for _ in range(MAX_GEN):
        token = model(torch.tensor([ids + generated]))[0, -1].argmax().item()
        if token == tok.eos_id:
            break
        generated.append(token)
    text = tok.decode(generated)
    assert "</think>" in text, text
    answer = text.split("</think>", 1)[1].lstrip("\n")
    for s in stop:
        answer = answer.split(s)[0]
    return answer


def test_lm_eval_local_completions_loglikelihoods_equal_the_model(server, checkpoint, tmp_path):
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks", MC_TASK, MC_DOCS, "nanoseek_mc")
    base = server.url + "/v1/completions"
    samples = run_lm_eval(
        tmp_path,
        "local-completions",
        f"model={NAME},base_url={base},max_length=512,num_concurrent=1,max_retries=1",
        "nanoseek_mc",
    )
    ckpt = load_checkpoint(checkpoint)
    tok = load_tokenizer(checkpoint)
    assert sorted(s["doc_id"] for s in samples) == list(range(len(MC_DOCS)))
    scored = 0
    for sample in samples:
        doc = MC_DOCS[sample["doc_id"]]
        requests = sorted(sample["arguments"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
        assert len(requests) == len(sample["resps"]) == len(doc["choices"])
        for (_, args), resp, choice in zip(requests, sample["resps"], doc["choices"]):
            context, continuation = args["arg_0"], args["arg_1"]
            assert context == doc["question"] and continuation == " " + choice
            got = float(resp[0][0])
            want = reference_loglikelihood(ckpt.model, tok, context, continuation)
            # a sum of per-token log-probabilities (-66 here): the server's forward and the
            # reference's round differently on each CPU, so the tolerance grows with the sum
            assert abs(got - want) <= 1e-4 + 1e-5 * abs(want), (context, continuation, got, want)
            scored += 1
    assert scored == sum(len(d["choices"]) for d in MC_DOCS)
    # lm-eval tokenized through the server: its auto backend found /tokenizer_info and /tokenize
    text = httpx.get(server.url + "/metrics").text
    for endpoint in ("/tokenizer_info", "/tokenize"):
        assert metric(text, f'nanoseek_requests_total{{endpoint="{endpoint}",status="200"}}') > 0


def test_lm_eval_local_chat_completions_generations_equal_greedy(server, checkpoint, tmp_path):
    (tmp_path / "tasks").mkdir()
    docs = [{"question": user, "answer": answer} for user, _, answer in SCRIPT]
    write_task(tmp_path / "tasks", GEN_TASK, docs, "nanoseek_gen")
    base = server.url + "/v1/chat/completions"
    samples = run_lm_eval(
        tmp_path,
        "local-chat-completions",
        f"model={NAME},base_url={base},max_retries=1",
        "nanoseek_gen",
        "--apply_chat_template",
    )
    ckpt = load_checkpoint(checkpoint)
    tok = load_tokenizer(checkpoint)
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
    for sample in samples:
        doc = docs[sample["doc_id"]]
        # the chat prompt lm-eval sent: a JsonChatStr (logged as [json text])
        (chat,) = sample["arguments"]["gen_args_0"]["arg_0"]
        messages = json.loads(chat)
        assert messages == [{"role": "user", "content": doc["question"]}]
        want = reference_chat_reply(ckpt.model, tok, messages, ["<｜User｜>"])
        assert sample["resps"] == [[want]]
        if not doc["answer"].startswith("la "):  # "Sing" runs past MAX_GEN tokens
            assert want == doc["answer"]
            assert sample["exact_match"] == 1.0
