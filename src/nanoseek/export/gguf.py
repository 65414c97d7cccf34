"""GGUF export: a checkpoint as one llama.cpp `deepseek2` file (weights, metadata, tokenizer).

The file uses llama.cpp's MLA layout: `kv_b_proj` split into per-head `attn_k_b` [H, kv_rank, nope]
(transposed) and `attn_v_b` [H, v, kv_rank], one KV head, and the `_mla` head sizes that put the
loader on that path. MTP modules are left out (llama.cpp decodes without them). RoPE needs no
permutation: nanoseek and llama.cpp both rotate adjacent pairs. A checkpoint that llama.cpp would
run differently from nanoseek raises ExportError.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from nanoseek.checkpoint import load_model
from nanoseek.config import ModelConfig
from nanoseek.io import atomic_file
from nanoseek.tokenizer import CHAT_TEMPLATE, LLAMA_CPP_PRE, Tokenizer, load_tokenizer

ARCH = "deepseek2"
TYPES = ("f32", "bf16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block: a matrix whose rows are not a multiple of it stays F32


class ExportError(ValueError):
    """A checkpoint llama.cpp cannot load or would run differently; the message says why."""


def export_gguf(
    checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike, type: str = "f32"
) -> Path:
    """Write `checkpoint_dir` (a nanoseek / HF DeepseekV3 directory with its tokenizer) to
    `out_path` as GGUF, atomically, and return the path.

    type: "f32", "bf16" or "q8_0" for the matrices; norms, the router and its bias stay F32.
    Warns when the tokenizer's pre-tokenizer has no exact llama.cpp counterpart (revision-1
    nanoseek tokenizers): llama.cpp then splits some text differently from nanoseek.
    """
    import gguf  # needed by this command only

    if type not in TYPES:
        raise ExportError(f"type={type!r}: choose one of {', '.join(TYPES)}")
    checkpoint_dir = Path(checkpoint_dir)
    config_file = checkpoint_dir / "config.json"
    if config_file.is_file() and "vision_config" in json.loads(config_file.read_text("utf-8")):
        warnings.warn(
            f"{checkpoint_dir} is a vision-language checkpoint: the GGUF file holds its language "
            "model only (llama.cpp has no projector for this vision tower; docs/multimodal.md)",
            stacklevel=2,
        )
    model = load_model(checkpoint_dir, dtype=torch.float32)
    cfg = model.config
    check_supported(cfg)
    if not (checkpoint_dir / "tokenizer.json").is_file():
        raise ExportError(f"{checkpoint_dir}: no tokenizer.json; a GGUF file carries its tokenizer")
    tok = load_tokenizer(checkpoint_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    pre = tok.llama_cpp_pre
    if pre is None:
        pre = LLAMA_CPP_PRE
        warnings.warn(
            f"{checkpoint_dir}: this tokenizer (revision {tok.revision}) splits text with a "
            f"pattern llama.cpp does not implement; the GGUF names the closest one, '{pre}', so "
            "llama.cpp will tokenize some text differently from nanoseek (symbols, spaces, runs "
            "of line breaks). Tokenizers trained by this nanoseek version match exactly.",
            stacklevel=2,
        )

    tensors = _tensors(model)
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_name(checkpoint_dir.resolve().name)
        writer.add_file_type(_file_type(gguf, type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_architecture(writer, gguf, cfg)
        _add_tokenizer(writer, gguf, tok, cfg, pre, checkpoint_dir)
        for name, array in tensors:
            data, qtype = _encode(gguf, name, array, type)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out_path)


def check_supported(cfg: ModelConfig) -> None:
    """Raise ExportError for what llama.cpp's deepseek2 cannot load or would compute differently."""
    problems = []
    if cfg.attention_bias:
        problems.append("attention_bias=True: llama.cpp's deepseek2 has no attention biases")
    n_layers = cfg.num_hidden_layers
    lite = n_layers in (26, 27) or (n_layers == 48 and cfg.vocab_size == 128256)
    if lite and cfg.q_lora_rank is not None:
        problems.append(
            f"num_hidden_layers={n_layers} with q_lora_rank={cfg.q_lora_rank}: "
            "llama.cpp takes a model this deep for DeepSeek-V2-Lite (no q_lora_rank)"
        )
    if cfg.n_moe_layers:
        if cfg.n_shared_experts < 1:
            problems.append("n_shared_experts=0: llama.cpp's deepseek2 needs a shared expert")
        if cfg.scoring_func == "softmax" and cfg.topk_group < cfg.n_group:
            problems.append(
                "softmax routing limited to topk_group groups: nanoseek scores a group "
                "by its best expert (V2), llama.cpp by the sum of its best two"
            )
    rs = cfg.rope_scaling
    if rs is not None and cfg.yarn_factor > 1:
        if not rs.get("mscale_all_dim") or rs.get("mscale") != rs.get("mscale_all_dim"):
            problems.append(
                f"YaRN with mscale={rs.get('mscale')}, mscale_all_dim="
                f"{rs.get('mscale_all_dim')}: llama.cpp scales attention as DeepSeek "
                "does only when both are set and equal"
            )
        if (rs.get("beta_fast") or 32) != 32 or (rs.get("beta_slow") or 1) != 1:
            problems.append(
                f"YaRN beta_fast={rs.get('beta_fast')}, beta_slow="
                f"{rs.get('beta_slow')}: llama.cpp's deepseek2 always uses 32 and 1"
            )
    if problems:
        raise ExportError(
            "llama.cpp cannot run this checkpoint as nanoseek does:\n  " + "\n  ".join(problems)
        )


# ---------------------------------------------------------------------- metadata
def _file_type(gguf, type: str) -> int:
    names = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return int(getattr(gguf.LlamaFileType, names[type]))


def _add_architecture(w, gguf, cfg: ModelConfig) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)  # MTP modules are not exported
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: a plain q_proj
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is not None and cfg.yarn_factor > 1:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        # llama.cpp divides this key by 0.1 when it loads a deepseek2 file
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    gating = gguf.ExpertGatingFuncType
    w.add_expert_gating_func(gating.SIGMOID if cfg.scoring_func == "sigmoid" else gating.SOFTMAX)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)


def _add_tokenizer(w, gguf, tok: Tokenizer, cfg: ModelConfig, pre: str, checkpoint_dir: Path):
    tokens = []
    types = []
    for i in range(cfg.vocab_size):
        text = tok.id_to_token(i)
        if text is None:  # embedding rows past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if i in tok.control_ids else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(tok.bpe_merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)  # documents and chats start with bos, as in pretraining
    w.add_add_eos_token(False)
    config_file = checkpoint_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
    w.add_chat_template(config.get("chat_template") or CHAT_TEMPLATE)


# ---------------------------------------------------------------------- tensors
def _tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in PyTorch order) for every tensor llama.cpp reads: not MTP, not the
    rope tables or load counters."""
    cfg = model.config
    p = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = [
        ("token_embd.weight", p["embed_tokens.weight"]),
        ("output_norm.weight", p["norm.weight"]),
    ]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", p["lm_head.weight"]))
    H = cfg.num_attention_heads
    nope = cfg.qk_nope_head_dim
    for i in range(cfg.num_hidden_layers):
        a = f"layers.{i}."
        b = f"blk.{i}."
        attn = a + "self_attn."
        out += [
            (b + "attn_norm.weight", p[a + "input_layernorm.weight"]),
            (b + "ffn_norm.weight", p[a + "post_attention_layernorm.weight"]),
        ]
        if cfg.q_lora_rank is None:
            out.append((b + "attn_q.weight", p[attn + "q_proj.weight"]))
        else:
            out += [
                (b + "attn_q_a.weight", p[attn + "q_a_proj.weight"]),
                (b + "attn_q_a_norm.weight", p[attn + "q_a_layernorm.weight"]),
                (b + "attn_q_b.weight", p[attn + "q_b_proj.weight"]),
            ]
        kv_b = p[attn + "kv_b_proj.weight"].reshape(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        out += [
            (b + "attn_kv_a_mqa.weight", p[attn + "kv_a_proj_with_mqa.weight"]),
            (b + "attn_kv_a_norm.weight", p[attn + "kv_a_layernorm.weight"]),
            (b + "attn_k_b.weight", kv_b[:, :nope].transpose(0, 2, 1)),  # [H, kv_rank, nope]
            (b + "attn_v_b.weight", kv_b[:, nope:]),  # [H, v, kv_rank]
            (b + "attn_output.weight", p[attn + "o_proj.weight"]),
        ]
        mlp = a + "mlp."
        if not cfg.is_moe_layer(i):
            out += [
                (b + f"ffn_{n}.weight", p[mlp + f"{n}_proj.weight"]) for n in ("gate", "up", "down")
            ]
            continue
        I = cfg.moe_intermediate_size
        gate_up = p[mlp + "experts.gate_up_proj"]  # [E, 2I, d]: gate rows, then up rows
        out += [
            (b + "ffn_gate_inp.weight", p[mlp + "gate.weight"]),
            (b + "ffn_gate_exps.weight", gate_up[:, :I]),
            (b + "ffn_up_exps.weight", gate_up[:, I:]),
            (b + "ffn_down_exps.weight", p[mlp + "experts.down_proj"]),
        ]
        if cfg.scoring_func == "sigmoid":  # the balancing bias: added to the selection scores only
            out.append((b + "exp_probs_b.bias", p[mlp + "gate.e_score_correction_bias"]))
        out += [
            (b + f"ffn_{n}_shexp.weight", p[mlp + f"shared_experts.{n}_proj.weight"])
            for n in ("gate", "up", "down")
        ]
    return out


def _encode(gguf, name: str, array: np.ndarray, type: str):
    """(data, GGML type) to store: 1-D tensors and the router stay F32, as
    llama.cpp's converter keeps them."""
    F32 = gguf.GGMLQuantizationType.F32
    array = np.ascontiguousarray(array, dtype=np.float32)
    if type == "f32" or array.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return array, F32
    if type == "bf16":
        qtype = gguf.GGMLQuantizationType.BF16
    elif array.shape[-1] % Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
    else:
        return array, F32
    return gguf.quants.quantize(array, qtype), qtype
