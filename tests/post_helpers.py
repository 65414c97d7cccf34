"""Shared fixtures for the post-training tests: a small tokenizer that knows the tasks' text, and tiny models
saved as checkpoints with it."""

import functools
from pathlib import Path

import torch

from nanoseek import save_model
from nanoseek.data.conversations import identity_conversations, task_conversations
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer

from conftest import tiny_config

TASK_MIX = {"arithmetic": [1, 2], "countdown": [1], "word_problems": [1], "code": [1], "passkey": [1]}


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    texts = []
    for conv in task_conversations(TASK_MIX, 100) + identity_conversations(20):
        texts += [m.get("reasoning_content", "") + "\n" + m["content"] for m in conv]
    return Tokenizer.train(texts, vocab_size=1024)


def save_tiny(path: Path, seed: int = 0, context: int = 512, **overrides) -> Path:
    tok = small_tokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=context, bos_token_id=tok.bos_id,
                      eos_token_id=tok.eos_id, **overrides)
    torch.manual_seed(seed)
    save_model(Transformer(cfg), path, tokenizer=tok)
    return path
