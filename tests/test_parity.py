"""nanoseek and transformers' DeepseekV3ForCausalLM give the same
logits on the same weights, both ways."""

import pytest
import torch

from nanoseek import Transformer, load_model, save_model

from helpers import tiny_config

transformers = pytest.importorskip("transformers")

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VARIANTS = {
    "v3-like": dict(),
    "no-q-lora": dict(q_lora_rank=None),
    "yarn": dict(rope_scaling=YARN),
    "yarn-default-mscale": dict(
        rope_scaling={k: v for k, v in YARN.items() if not k.startswith("mscale")}
    ),
    "one-group": dict(n_group=1, topk_group=1, num_experts_per_tok=3),
    "no-renorm": dict(norm_topk_prob=False, routed_scaling_factor=1.0),
    "two-shared-tied": dict(n_shared_experts=2, tie_word_embeddings=True),
    "no-shared-all-moe": dict(n_shared_experts=0, first_k_dense_replace=0),
}


def _randomise(model: torch.nn.Module) -> None:
    """Spread the weights out so routing decisions are far from ties, and
    give the balancing bias values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 if ("gate.weight" in name or "router" in name) else 0.08)
            else:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)


def _hf_model(cfg):
    hf_cfg = transformers.DeepseekV3Config(
        **{k: v for k, v in cfg.to_dict().items() if k != "architectures"}
    )
    return transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_checkpoint_loads_in_nanoseek(variant, tmp_path):
    cfg = tiny_config(**VARIANTS[variant])
    hf = _hf_model(cfg)
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    # 40 > original_max_position_embeddings: YaRN matters
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nanoseek_checkpoint_loads_in_transformers(variant, tmp_path):
    cfg = tiny_config(**VARIANTS[variant])
    ours = Transformer(cfg).eval()
    _randomise(ours)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_mtp_checkpoint_round_trips_and_loads_in_transformers(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=1)
    ours = Transformer(cfg).eval()
    _randomise(ours)
    save_model(ours, tmp_path)
    again = load_model(tmp_path)
    assert len(again.mtp) == 1
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ours.compute_loss(ids, ids.roll(-1, 1)), again.compute_loss(ids, ids.roll(-1, 1))
    assert torch.equal(a.mtp_loss, b.mtp_loss)
    # ignores the MTP layer
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
