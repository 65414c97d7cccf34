"""What the tests share: tiny model configs and models, small tokenizers and checkpoints, a greedy
reference decoder, stand-in tokenizers, and the logit-margin check that keeps assertions on what a
trained tiny model says independent of the CPU's rounding. (pytest's own set-up is in conftest.py;
the server harness is serve_helpers.py, the schema fuzzer serve_fuzz.py.)"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek import ModelConfig, Transformer, save_model
from nanoseek.data.conversations import identity_conversations, task_conversations
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------- tiny models


# The tests' vision tower: one block, 32x32 tiles of 8x8 patches, up to 4 local tiles.
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    max_tiles=4,
)


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough that a forward pass takes milliseconds, with
    every architectural feature on."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=128,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def smallest_margin(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """min over learned positions (targets != IGNORE_INDEX) of (target logit - best other
    logit); negative where greedy decoding would miss. A test that asserts what a trained
    tiny model says checks this too: a margin of a nat or more cannot be flipped by
    another CPU's rounding, a margin of 1e-3 can."""
    logits = model(inputs).float()
    learned = targets != IGNORE_INDEX
    target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.clamp(min=0).unsqueeze(-1), float("-inf")).amax(-1)
    return (target_logit - others)[learned].min().item()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Engine tests run single-threaded: their tensors are tiny, and on a busy 2-core machine
    OpenMP's two threads wait on each other for every op (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with weights ten times the usual init scale: attention then
    shapes the output (at the default scale it is nearly uniform, and an attention
    bug can hide under the residual stream)."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(**{"initializer_range": 0.2, **overrides})).eval()


# The engine computes the same logits in another order, so they differ from the reference's by
# float rounding (under 1e-5: test_latent_cache_decode_attention_equals_expanded_attention;
# other CPUs' kernels round differently again). A greedy choice that the tests compare must win
# by ten times more.
MIN_GREEDY_MARGIN = 1e-4


@torch.no_grad()
def reference_greedy(
    model: Transformer, prompt: list[int], n: int, stop_ids: set[int] = frozenset()
) -> list[int]:
    """Greedy decoding the slow, obviously right way: model(ids) on the whole sequence for every
    token. Fails if a step is a near-tie, which rounding alone could flip on another CPU: pick
    another prompt or seed then."""
    ids = list(prompt)
    for step in range(n):
        top2 = model(torch.tensor([ids]))[0, -1].float().topk(2)
        margin = (top2.values[0] - top2.values[1]).item()
        assert margin >= MIN_GREEDY_MARGIN, (
            f"near-tie at greedy step {step} of {prompt}: margin {margin:.2e}"
        )
        ids.append(int(top2.indices[0]))
        if ids[-1] in stop_ids:
            break
    return ids[len(prompt) :]


class ByteTokenizer:
    """A stand-in for the real tokenizer: token i < 256 is byte i, so multi-byte
    characters span tokens the way byte-level BPE splits them. 0 is BOS and 1 is
    EOS (special: they decode to nothing)."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        specials = {self.bos_id, self.eos_id} if skip_special_tokens else set()
        return bytes(i for i in ids if i not in specials and i < 256).decode(
            "utf-8", errors="replace"
        )


class CharTokenizer:
    """One character per token: id t >= 2 is chr(t + 30); 0 is BOS and 1 is
    EOS. Fits a 128-token vocabulary."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 30 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i + 30) for i in ids if i >= 2 or not skip_special_tokens)


# ------------------------------------------------------------ small tokenizers and checkpoints

TASK_MIX = {
    "arithmetic": [1, 2],
    "countdown": [1],
    "word_problems": [1],
    "code": [1],
    "passkey": [1],
}


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    texts = []
    for conv in task_conversations(TASK_MIX, 100) + identity_conversations(20):
        texts += [m.get("reasoning_content", "") + "\n" + m["content"] for m in conv]
    return Tokenizer.train(texts, vocab_size=1024)


def save_tiny(path: Path, seed: int = 0, context: int = 512, **overrides) -> Path:
    tok = small_tokenizer()
    cfg = tiny_config(
        vocab_size=tok.vocab_size,
        max_position_embeddings=context,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        **overrides,
    )
    torch.manual_seed(seed)
    save_model(Transformer(cfg), path, tokenizer=tok)
    return path


def save_untrained_vision(path: Path, vision: dict) -> Path:
    """An untrained tiny vision-language checkpoint (seed 0, tower `vision`) whose images still move
    the logits: the default init gives tiny image features, so the projector is scaled up."""
    from nanoseek.checkpoint import save_vision_language_model
    from nanoseek.config import VisionConfig
    from nanoseek.model.vision import VisionLanguageModel

    tok = small_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    vlm = VisionLanguageModel.build(cfg, VisionConfig(**vision), tok.special_ids["image"])
    with torch.no_grad():
        for p in vlm.vision.projector.parameters():
            p.mul_(30.0)
    return save_vision_language_model(vlm.eval(), path, tokenizer=tok)


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def foreign_tokenizer(directory: Path) -> Path:
    """A ChatML-style tokenizer written to `directory`: none of nanoseek's special tokens (no tool
    tokens, no <think>, no FIM), a chat template of its own (CHATML_TEMPLATE)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    hf.train_from_iterator(
        ["hello world, how are you? fine thanks"] * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=[AddedToken(s, special=True) for s in specials],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    directory.mkdir(parents=True, exist_ok=True)
    hf.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return directory
