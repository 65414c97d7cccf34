"""`nanoseek chat` with a local checkpoint and `nanoseek serve` as commands, in subprocesses (`chat --url` is
tested in test_serve_api.py, against its server)."""

import pytest

from nanoseek.cli import build_parser

from serve_helpers import SCRIPT, nanoseek, shared_checkpoint

HELLO, HELLO_THOUGHT, HELLO_ANSWER = SCRIPT[0]
NIHAO, NIHAO_THOUGHT, NIHAO_ANSWER = SCRIPT[1]


@pytest.fixture(scope="module")
def checkpoint():
    return shared_checkpoint()


def test_the_cli_registers_serve_and_chat():
    parser = build_parser()
    args = parser.parse_args(["serve", "ckpt", "--port", "9000", "--api-key", "k", "--max-queue", "3"])
    assert (args.command, args.host, args.port, args.api_key, args.max_queue) == ("serve", "127.0.0.1", 9000, "k", 3)
    args = parser.parse_args(["chat", "--url", "http://127.0.0.1:9000"])
    assert args.command == "chat" and args.checkpoint is None


def test_chat_with_a_local_checkpoint(checkpoint):
    r = nanoseek("chat", str(checkpoint), "--temperature", "0", stdin=f"{HELLO}\n/reset\n{NIHAO}\n/exit\n")
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
