"""Checkpoint directories: layout on disk, sharding, dtype, FP8
dequantization, and loud failures."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanoseek import CheckpointError, Transformer, load_model, save_model

from helpers import tiny_config


def _same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_disk_layout_uses_per_expert_keys_and_fp32_bias(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=1)
    save_model(Transformer(cfg), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        assert f.get_tensor("model.layers.1.mlp.experts.7.down_proj.weight").dtype == torch.bfloat16
    assert bias.dtype == torch.float32
    assert {
        "model.layers.1.mlp.experts.7.gate_proj.weight",
        "model.layers.1.mlp.experts.7.up_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "lm_head.weight",
    } <= keys
    assert not any("gate_up_proj" in k for k in keys)
    mtp = cfg.num_hidden_layers
    assert {
        f"model.layers.{mtp}.{name}"
        for name in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "self_attn.kv_b_proj.weight",
            "mlp.experts.0.gate_proj.weight",
        )
    } <= keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_nextn_predict_layers"] == 1


def test_sharded_save_round_trips_and_cleans_stale_files(tmp_path):
    model = Transformer(tiny_config())
    save_model(model, tmp_path)  # first a single file ...
    save_model(model, tmp_path, max_shard_size=100_000)  # ... then shards replace it
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert _same_weights(model, load_model(tmp_path))
    save_model(model, tmp_path)  # and back: no shard or index left behind
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_dtype_on_load_keeps_the_bias_in_fp32(tmp_path):
    model = Transformer(tiny_config())
    with torch.no_grad():
        model.layers[1].mlp.gate.e_score_correction_bias.fill_(0.0012345)
    save_model(model, tmp_path)
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    bias = half.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(0.0012345)
    # default: the dtype on disk
    assert load_model(tmp_path).embed_tokens.weight.dtype == torch.float32


def test_tied_embeddings_stay_tied(tmp_path):
    model = Transformer(tiny_config(tie_word_embeddings=True))
    save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert _same_weights(model, loaded)


def test_missing_unexpected_and_misshapen_tensors_are_all_listed(tmp_path):
    save_model(Transformer(tiny_config()), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    tensors["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert (
        "missing (2)" in msg
        and "model.layers.2.mlp.experts.3.up_proj.weight" in msg
        and "model.norm.weight" in msg
    )
    assert "unexpected (1)" in msg and "surprise" in msg
    assert "wrong shape (1)" in msg and "kv_b_proj.weight: checkpoint [3, 3]" in msg


def test_partial_mtp_is_an_error_but_absent_mtp_loads_without_it(tmp_path):
    cfg = tiny_config(num_nextn_predict_layers=1)
    save_model(Transformer(cfg), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    save_file(
        {k: v for k, v in tensors.items() if not k.startswith(mtp)}, tmp_path / "model.safetensors"
    )
    assert len(load_model(tmp_path).mtp) == 0  # what transformers' save_pretrained produces
    save_file(
        {k: v for k, v in tensors.items() if k != mtp + "eh_proj.weight"},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(CheckpointError, match="eh_proj"):
        load_model(tmp_path)


def test_fp8_block_quantized_weights_are_dequantized(tmp_path):
    model = Transformer(tiny_config())
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"  # [96, 64]: blocks of 128 cover it with one scale
    w = tensors[name]
    scale = w.abs().max() / 448.0
    tensors[name] = (w / scale).to(torch.float8_e4m3fn)
    tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert torch.allclose(loaded.layers[0].mlp.gate_proj.weight, w, rtol=0.07, atol=1e-3)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        load_model(tmp_path)


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = Transformer(tiny_config())
    save_model(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nanoseek.checkpoint.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(Transformer(tiny_config()), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
