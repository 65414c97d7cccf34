import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model.transformer import IGNORE_INDEX


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough that a forward pass takes milliseconds, with every architectural feature on."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32,
                  q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  max_position_embeddings=128, routed_scaling_factor=2.5, num_nextn_predict_layers=0)
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def smallest_margin(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """min over learned positions (targets != IGNORE_INDEX) of (target logit - best other logit); negative where
    greedy decoding would miss. A test that asserts what a trained tiny model says checks this too: a margin of a
    nat or more cannot be flipped by another CPU's rounding, a margin of 1e-3 can."""
    logits = model(inputs).float()
    learned = targets != IGNORE_INDEX
    target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, targets.clamp(min=0).unsqueeze(-1), float("-inf")).amax(-1)
    return (target_logit - others)[learned].min().item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads per process make them
# 20-30x slower (measured by the serving tests). Subprocesses started by tests choose their own.
torch.set_num_threads(1)
