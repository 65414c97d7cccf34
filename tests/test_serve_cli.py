"""`nanoseek chat` with a local checkpoint and `nanoseek serve` as commands, in subprocesses (`chat
--url` is tested in test_serve_api.py, against its server)."""

import shutil

import httpx
import pytest
import torch
from safetensors.torch import save_file

from nanoseek.checkpoint import load_checkpoint
from nanoseek.cli import build_parser
from nanoseek.engine.quant import INT8_FILE, is_quantized

from serve_helpers import SCRIPT, ServerProcess, nanoseek, shared_checkpoint

HELLO, HELLO_THOUGHT, HELLO_ANSWER = SCRIPT[0]
NIHAO, NIHAO_THOUGHT, NIHAO_ANSWER = SCRIPT[1]


@pytest.fixture(scope="module")
def checkpoint():
    return shared_checkpoint()


def test_the_cli_registers_serve_and_chat():
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "ckpt", "--port", "9000", "--api-key", "k", "--max-queue", "3"]
    )
    assert (args.command, args.host, args.port, args.api_key, args.max_queue) == (
        "serve",
        "127.0.0.1",
        9000,
        "k",
        3,
    )
    args = parser.parse_args(["chat", "--url", "http://127.0.0.1:9000"])
    assert args.command == "chat" and args.checkpoint is None


def test_chat_with_a_local_checkpoint(checkpoint):
    r = nanoseek(
        "chat", str(checkpoint), "--temperature", "0", stdin=f"{HELLO}\n/reset\n{NIHAO}\n/exit\n"
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"<think>\n{HELLO_THOUGHT}\n</think>\n{HELLO_ANSWER}" in out
    assert f"<think>\n{NIHAO_THOUGHT}\n</think>\n{NIHAO_ANSWER}" in out
    assert "(new conversation)" in out


def test_chat_needs_a_checkpoint_or_a_url(tmp_path):
    r = nanoseek("chat")
    assert r.returncode == 2 and "checkpoint directory or --url" in r.stderr
    r = nanoseek("chat", "--url", "http://127.0.0.1:9", stdin="hi\n")
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_serve_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    r = nanoseek("serve", str(tmp_path), "--port", "0")
    assert r.returncode == 2 and "not a servable checkpoint (no config.json)" in r.stderr


def test_load_checkpoint_gives_what_every_command_needs(checkpoint):
    ckpt = load_checkpoint(checkpoint, "bfloat16")
    assert ckpt.model.embed_tokens.weight.dtype == torch.bfloat16
    assert ckpt.tokenizer.eos_id is not None
    assert ckpt.defaults == {"temperature": 0.6, "top_p": 0.95}
    assert not is_quantized(ckpt.model)
    assert is_quantized(load_checkpoint(checkpoint, int8=True).model)


def with_a_foreign_int8_file(checkpoint, tmp_path):
    """A copy of the checkpoint whose model.int8.safetensors is not ours:
    --int8 must fail on it, by name."""
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    save_file({"x": torch.zeros(1)}, copy / INT8_FILE, metadata={"format": "other"})
    return copy


@pytest.mark.parametrize("flags", [["--dtype", "float32"], ["--dtype", "bfloat16"], ["--int8"]])
def test_chat_loads_in_the_dtype_or_int8_asked(checkpoint, flags):
    r = nanoseek(
        "chat",
        str(checkpoint),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        *flags,
        stdin=f"{HELLO}\n/exit\n",
    )
    assert r.returncode == 0, r.stderr
    assert "assistant> <think>" in r.stdout and "error" not in r.stdout


def test_chat_and_generate_int8_read_the_int8_file(checkpoint, tmp_path):
    foreign = with_a_foreign_int8_file(checkpoint, tmp_path)
    # no --int8: the file is not read
    assert nanoseek("chat", str(foreign), stdin="/exit\n").returncode == 0
    for command in (["chat", str(foreign)], ["generate", str(foreign), HELLO]):
        r = nanoseek(*command, "--int8", stdin="/exit\n")
        assert r.returncode == 2 and f"{INT8_FILE} is not a nanoseek int8 file" in r.stderr, (
            r.stderr
        )


@pytest.mark.parametrize("flags", [["--dtype", "float32"], ["--dtype", "bfloat16"], ["--int8"]])
def test_generate_loads_in_the_dtype_or_int8_asked(checkpoint, flags):
    r = nanoseek(
        "generate", str(checkpoint), HELLO, "--max-tokens", "4", "--temperature", "0", *flags
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(HELLO) and "finish: length" in r.stderr


def test_generate_and_chat_pass_the_decode_path_to_the_engine(checkpoint):
    """--decode reaches the Engine: int8 weights have no compiled step, so asking for one falls
    back to eager with one warning that names why (and nothing compiles here)."""
    why = "no int8 kernels); decoding runs eager"
    r = nanoseek(
        "generate", str(checkpoint), HELLO, "--max-tokens", "4", "--int8", "--decode", "compiled"
    )
    assert r.returncode == 0 and why in r.stderr, r.stderr
    r = nanoseek("chat", str(checkpoint), "--int8", "--decode", "auto", stdin="/exit\n")
    assert r.returncode == 0 and why in r.stderr, r.stderr
    assert why not in nanoseek("chat", str(checkpoint), "--int8", stdin="/exit\n").stderr


def test_serve_int8(checkpoint, tmp_path):
    with ServerProcess(checkpoint, "--int8").wait_ready() as server:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            timeout=120,
            json={"messages": [{"role": "user", "content": HELLO}], "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    foreign = with_a_foreign_int8_file(checkpoint, tmp_path)
    r = nanoseek("serve", str(foreign), "--port", "0", "--int8")
    assert r.returncode == 1 and f"{INT8_FILE} is not a nanoseek int8 file" in r.stderr, r.stderr
