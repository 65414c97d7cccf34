"""ModelConfig reads what transformers 4.x, 5.x and DeepSeek write, writes
what they read, and refuses nonsense."""

import json

import pytest

from nanoseek import ConfigError, ModelConfig

from helpers import tiny_config

transformers = pytest.importorskip("transformers")


def test_reads_transformers_4x_legacy_rope_fields():
    yarn = {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    }
    cfg = ModelConfig.from_dict(
        {**tiny_config().to_dict(), "rope_theta": 50000.0, "rope_scaling": yarn}
    )
    assert (
        cfg.rope_theta == 50000.0
        and cfg.rope_scaling["factor"] == 40
        and cfg.rope_scaling["mscale"] == 0.707
    )


def test_reads_transformers_5x_rope_parameters(tmp_path):
    hf = transformers.DeepseekV3Config(
        **{
            k: v
            for k, v in tiny_config(
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
            )
            .to_dict()
            .items()
        }
    )
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written  # the 5.x form
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.rope_scaling["original_max_position_embeddings"] == 32


def test_plain_rope_in_5x_form_means_no_scaling():
    cfg = ModelConfig.from_dict(
        {**tiny_config().to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    )
    assert cfg.rope_scaling is None


def test_written_config_loads_in_transformers_with_the_same_fields(tmp_path):
    cfg = tiny_config(
        q_lora_rank=None,
        rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
    )
    cfg.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    # the legacy pair, for 4.x
    assert "rope_theta" in written and written["rope_scaling"]["type"] == "yarn"
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "deepseek_v3" and hf.q_lora_rank is None
    for name in (
        "hidden_size",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "first_k_dense_replace",
        "routed_scaling_factor",
    ):
        assert getattr(hf, name) == getattr(cfg, name), name
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 2.0
    assert ModelConfig.from_pretrained(tmp_path) == cfg


def test_deepseek_release_config_fields():
    """The fields of DeepSeek-V3's own config.json (official names and aliases) are understood."""
    official = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "ep_size": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "torch_dtype": "bfloat16",
    }
    cfg = ModelConfig.from_dict(official)
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert cfg.kv_cache_bytes_per_token() == 70272  # 576 values x 61 layers x bf16, as in the spec
    assert cfg.extra["quantization_config"]["quant_method"] == "fp8"
    v2 = ModelConfig.from_dict(
        {
            **official,
            "num_experts": 64,
            "n_routed_experts": None,
            "q_lora_rank": 0,
            "scoring_func": "softmax",
            "n_group": 1,
            "topk_group": 1,
            "num_experts_per_tok": 6,
        }
    )
    assert v2.n_routed_experts == 64 and v2.q_lora_rank is None


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_group", 3, "n_group=3: must divide n_routed_experts=8"),
        ("topk_group", 5, "topk_group=5"),
        ("num_experts_per_tok", 5, "num_experts_per_tok=5: must lie in [1, 4]"),
        ("qk_rope_head_dim", 7, "qk_rope_head_dim=7"),
        ("num_key_value_heads", 2, "num_key_value_heads=2"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("scoring_func", "relu", "scoring_func='relu'"),
        ("first_k_dense_replace", 9, "first_k_dense_replace=9"),
        ("hidden_size", 0, "hidden_size=0"),
    ],
)
def test_impossible_configs_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**{field: value})
    assert message in str(err.value)


def test_rope_scaling_other_than_yarn_is_refused():
    with pytest.raises(ConfigError, match="only 'yarn'"):
        tiny_config(rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        tiny_config(rope_scaling={"type": "yarn", "factor": 2.0})


def test_broken_json_and_missing_file_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
