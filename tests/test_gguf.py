"""GGUF export: the file's keys and tensors, and llama.cpp running a tiny trained model as nanoseek.

The model is trained for a few seconds on one bilingual passage, so its next-token logits have
margins that float rounding cannot flip. llama.cpp (through llama-cpp-python) must tokenize English,
Chinese, code and digits to nanoseek's ids and compute the same logits within a stated tolerance at
every position, past YaRN's original context too; greedy continuations are compared only while
nanoseek's top-1 margin exceeds the tolerance. The llama.cpp tests skip only when llama_cpp cannot
be imported (the test extras install it).
"""

import json
import random

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek import save_model
from nanoseek.cli import main
from nanoseek.export import ExportError, export_gguf
from nanoseek.model import Transformer
from nanoseek.tokenizer import LLAMA_CPP_PRE, REVISION, SPECIAL_TOKENS, Tokenizer, load_tokenizer

from helpers import tiny_config

# Largest |llama.cpp logit - nanoseek logit| allowed; the logits span about -13..19. fp32 differs
# only in summation order (measured: 4e-5 at most). bf16 (8-bit mantissas) and q8_0 (8-bit values,
# one scale per 32, activations rounded too) round every weight, and that can flip an expert choice
# at a token whose routing is close, so for them the bound holds at 90% of the positions (measured:
# bf16 all within 0.5, 95% within 0.07; q8_0 97% within 1.0, median 0.10).
TOLERANCE = {"f32": 1e-3, "bf16": 0.5, "q8_0": 1.0}

PASSAGE = (
    "The river runs to the sea, and the mountain keeps the city. 我们今天学习中文，天气非常好。"
    "def add(a, b):\n    return a + b  # 12 + 345 = 357\n"
    "Numbers like 2026, 31415 and 6789 are spelled digit by digit. 话说天下大势，分久必合。"
)
SAMPLES = {
    "english": "The general keeps the city; they would not go to the river when it was dark.",
    "chinese": "话说天下大势，分久必合，合久必分。我们用Python写代码，GPT模型很好。",
    "code": "def f(x):\n\tif x >= 10:\n        return {'a': [1, 2.5e-3]}  # c\r\n    return x*x\n",
    "digits": "year 31415926, 1234567890 and 3.14 (or 3..3); phone 010-8888-6666; 12,345.50 元",
    "mixed": "emoji 🤖 and naïve café, カタカナ ひらがな 한국어  \n\n  tabs\tend",
}


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = "the of and to in a is that for it river mountain city story time water light".split()
    zh = "我们 今天 天气 非常 学习 中文 历史 国家 人民 朋友 时间 问题 工作 生活 世界".split()
    out = [PASSAGE, *SAMPLES.values()]
    for _ in range(200):
        out.append(" ".join(rng.choice(words) for _ in range(30)) + f" {rng.randint(0, 99999)}.")
        out.append("".join(rng.choice(zh) for _ in range(12)) + "。")
        out.append(f"def f{rng.randint(0, 9)}(x):\n    return x + {rng.randint(0, 999)}\n")
    return out


def _yarn_config(vocab_size: int):
    """tiny_config (sigmoid router, groups, a dense first layer) with YaRN: factor 2 over an
    original 64-token context, so the prompts below go past it."""
    yarn = {
        "type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    return tiny_config(vocab_size=vocab_size, max_position_embeddings=256, rope_scaling=yarn)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint dir, model, tokenizer): a tiny model that has learned PASSAGE."""
    torch.manual_seed(0)
    tok = Tokenizer.train(_corpus(), vocab_size=600)
    model = Transformer(_yarn_config(tok.vocab_size))
    ids = torch.tensor([tok.encode(PASSAGE, add_bos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # the balancing bias shifts selection only, llama.cpp's too once exported
        for moe in model.moe_layers():
            bias = moe.gate.e_score_correction_bias
            bias.copy_(torch.randn_like(bias) * 0.05)
    model.eval()
    path = tmp_path_factory.mktemp("ckpt")
    save_model(model, path, tokenizer=tok)
    return path, model, tok


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(trained[0], out / f"model-{t}.gguf", type=t) for t in TOLERANCE}


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_metadata(trained, exported):
    _, model, tok = trained
    cfg = model.config
    r = gguf.GGUFReader(exported["f32"])
    arch = {
        "block_count": 3,
        "context_length": 256,
        "embedding_length": 64,
        "feed_forward_length": 96,
        "attention.head_count": 4,
        "attention.head_count_kv": 1,
        "attention.q_lora_rank": 48,
        "attention.kv_lora_rank": 32,
        "attention.key_length": 32 + 8,
        "attention.value_length": 32,
        "attention.key_length_mla": 16 + 8,
        "attention.value_length_mla": 16,
        "rope.dimension_count": 8,
        "leading_dense_block_count": 1,
        "expert_count": 8,
        "expert_used_count": 2,
        "expert_shared_count": 1,
        "expert_feed_forward_length": 32,
        "expert_weights_norm": True,
        "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
        "expert_group_count": 4,
        "expert_group_used_count": 2,
        "rope.scaling.type": "yarn",
        "rope.scaling.original_context_length": 64,
        "vocab_size": cfg.vocab_size,
    }
    assert {k: _field(r, f"deepseek2.{k}") for k in arch} == arch
    assert _field(r, "deepseek2.expert_weights_scale") == pytest.approx(2.5)
    assert _field(r, "deepseek2.rope.scaling.factor") == pytest.approx(2.0)
    # 0.1 x mscale_all_dim: the loader divides by 0.1
    assert _field(r, "deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)
    assert "deepseek2.nextn_predict_layers" not in r.fields
    general = {
        "general.architecture": "deepseek2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": LLAMA_CPP_PRE,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
    }
    assert {k: _field(r, k) for k in general} == general
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    assert tokens[:3] == [SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["user"]]
    assert {types[i] for i in tok.special_ids.values()} == {int(gguf.TokenType.CONTROL)}
    assert len(_field(r, "tokenizer.ggml.merges")) == len(tok.bpe_merges) > 0


def test_tensors(trained, exported):
    _, model, _ = trained
    r = gguf.GGUFReader(exported["f32"])
    tensors = {t.name: t for t in r.tensors}
    attn = {
        "attn_norm",
        "ffn_norm",
        "attn_q_a",
        "attn_q_a_norm",
        "attn_q_b",
        "attn_kv_a_mqa",
        "attn_kv_a_norm",
        "attn_k_b",
        "attn_v_b",
        "attn_output",
    }
    dense = {"ffn_gate", "ffn_up", "ffn_down"}
    moe = {
        "ffn_gate_inp",
        "ffn_gate_exps",
        "ffn_up_exps",
        "ffn_down_exps",
        "ffn_gate_shexp",
        "ffn_up_shexp",
        "ffn_down_shexp",
    }
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(3):
        expected |= {f"blk.{i}.{n}.weight" for n in attn | (dense if i == 0 else moe)}
        expected |= {f"blk.{i}.exp_probs_b.bias"} if i > 0 else set()
    assert set(tensors) == expected  # no MTP, no legacy attn_kv_b

    def array(name):  # ggml order reversed back into PyTorch's
        t = tensors[name]
        return np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))

    kv_b = model.layers[1].self_attn.kv_b_proj.weight.detach().numpy().reshape(4, 16 + 16, 32)
    k_b = array("blk.1.attn_k_b.weight")
    v_b = array("blk.1.attn_v_b.weight")
    assert k_b.shape == (4, 32, 16) and v_b.shape == (4, 16, 32)
    np.testing.assert_array_equal(np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1), kv_b)
    mlp = model.layers[1].mlp
    bias = mlp.gate.e_score_correction_bias.numpy()
    np.testing.assert_array_equal(array("blk.1.exp_probs_b.bias"), bias)
    up = mlp.experts.gate_up_proj.detach()[:, 32:].numpy()
    np.testing.assert_array_equal(array("blk.1.ffn_up_exps.weight"), up)
    q8 = {t.name: t.tensor_type for t in gguf.GGUFReader(exported["q8_0"]).tensors}
    Q = gguf.GGMLQuantizationType
    assert q8["blk.1.ffn_up_exps.weight"] == Q.Q8_0
    assert q8["blk.1.ffn_gate_inp.weight"] == q8["output_norm.weight"] == Q.F32
    assert gguf.GGUFReader(exported["bf16"]).tensors[0].tensor_type == Q.BF16


def test_new_tokenizers_carry_the_revision(trained):
    path, _, tok = trained
    assert tok.revision == REVISION and tok.llama_cpp_pre == LLAMA_CPP_PRE
    config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
    assert config["nanoseek_tokenizer_revision"] == REVISION == 2
    loaded = load_tokenizer(path)
    assert loaded.revision == REVISION and loaded.llama_cpp_pre == LLAMA_CPP_PRE
    assert {"tool_calls_begin", "tool_sep", "image", "grounding"} <= set(loaded.special_ids)


def test_old_tokenizer_loads_and_export_warns(trained, tmp_path):
    path, model, _ = trained
    hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
    # a revision-1 style pre-tokenizer: one CJK-aware regex, then single digits
    old_split = Regex(r"\p{Han}+|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+|\s+|.")
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(old_split, behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    Tokenizer(hf).save(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "tokenizer_config.json"
    config = json.loads(config_file.read_text("utf-8"))
    del config["nanoseek_tokenizer_revision"]  # written before revisions were recorded
    config_file.write_text(json.dumps(config), "utf-8")
    save_model(model, tmp_path / "ckpt")
    old = load_tokenizer(tmp_path / "ckpt")
    assert old.revision == 1 and old.llama_cpp_pre is None
    assert old.decode(old.encode(PASSAGE)) == PASSAGE
    with pytest.warns(UserWarning, match="llama.cpp will tokenize some text differently"):
        export_gguf(tmp_path / "ckpt", tmp_path / "old.gguf")
    assert _field(gguf.GGUFReader(tmp_path / "old.gguf"), "tokenizer.ggml.pre") == LLAMA_CPP_PRE


def test_export_errors(trained, tmp_path):
    path, _, _ = trained
    with pytest.raises(ExportError, match="type="):
        export_gguf(path, tmp_path / "x.gguf", type="q4_0")
    save_model(Transformer(tiny_config(attention_bias=True)), tmp_path / "bias")
    with pytest.raises(ExportError, match="attention_bias"):
        export_gguf(tmp_path / "bias", tmp_path / "x.gguf")
    yarn = {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "mscale_all_dim": 0.7,
    }
    save_model(Transformer(tiny_config(rope_scaling=yarn)), tmp_path / "yarn")
    with pytest.raises(ExportError, match="mscale"):
        export_gguf(tmp_path / "yarn", tmp_path / "x.gguf")
    save_model(Transformer(tiny_config()), tmp_path / "no-tokenizer")
    with pytest.raises(ExportError, match="tokenizer"):
        export_gguf(tmp_path / "no-tokenizer", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_command_line(trained, tmp_path, capsys):
    path = trained[0]
    out = tmp_path / "model.gguf"
    assert main(["export", str(path), "--gguf", str(out), "--type", "q8_0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert _field(gguf.GGUFReader(out), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert main(["export", str(tmp_path / "missing"), "--gguf", str(out)]) == 2
    assert "nanoseek export: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------- llama.cpp
def _llama(path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')"
    )
    # the cache in F32 (default F16), so that the fp32 comparison measures the export alone
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_batch=256,
        n_ubatch=256,
        n_threads=1,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        flash_attn=False,
        verbose=False,
    )


@pytest.fixture(scope="module")
def llama_f32(exported):
    return _llama(exported["f32"])


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@torch.no_grad()
def _nanoseek_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].double().numpy()


@torch.no_grad()
def _routing_margin(model, ids: list[int]) -> float:
    """The smallest gap, over tokens and MoE layers, between a chosen and a passed-over expert's
    biased score (and group score): below float rounding, llama.cpp could pick other experts."""
    captured = []
    hooks = [
        moe.gate.register_forward_hook(lambda m, x, out: captured.append((m, out[2])))
        for moe in model.moe_layers()
    ]
    model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    margins = []
    for router, scores in captured:
        choice = (scores + router.e_score_correction_bias).unflatten(-1, (router.n_group, -1))
        group = choice.topk(2, dim=-1).values.sum(-1)  # [tokens, groups]
        g = router.topk_group
        if g < router.n_group:
            ranked_groups = group.sort(-1, descending=True).values
            margins.append(ranked_groups[:, g - 1] - ranked_groups[:, g])
        dropped = torch.ones_like(group, dtype=torch.bool).scatter_(1, group.topk(g).indices, False)
        masked = choice.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        ranked = masked.sort(-1, descending=True).values
        margins.append(ranked[:, router.top_k - 1] - ranked[:, router.top_k])
    margin = min(m.min() for m in margins)
    return float(margin)


@pytest.mark.parametrize("name", [*SAMPLES, "passage"])
def test_llama_cpp_tokenizes_like_nanoseek(trained, llama_f32, name):
    tok = trained[2]
    text = SAMPLES.get(name, PASSAGE)
    theirs = llama_f32.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert theirs == tok.encode(text)
    assert llama_f32.detokenize(tok.encode(text)).decode("utf-8") == text


def test_llama_cpp_logits_match_fp32(trained, llama_f32):
    _, model, tok = trained
    ids = tok.encode(PASSAGE + " " + SAMPLES["english"], add_bos=True)[:160]
    assert len(ids) > 64 + 32  # well past YaRN's original context
    # no expert choice close enough for fp32 rounding (~1e-6 in the router's scores) to flip
    assert _routing_margin(model, ids) > 1e-5
    ours = _nanoseek_logits(model, ids)
    theirs = _llama_logits(llama_f32, ids)
    error = np.abs(theirs - ours).max(axis=-1)
    assert error.max() < TOLERANCE["f32"], error


def test_llama_cpp_greedy_continuation(trained, llama_f32):
    """Step by step, while nanoseek's top-1 margin exceeds twice the tolerance, llama.cpp's next
    token is nanoseek's."""
    _, model, tok = trained
    ids = tok.encode(PASSAGE, add_bos=True)[:24]
    llama_f32.reset()
    llama_f32.eval(ids)
    checked = 0
    for _ in range(40):
        ours = _nanoseek_logits(model, ids)[-1]
        theirs = np.array(llama_f32.scores[llama_f32.n_tokens - 1], dtype=np.float64)
        assert np.abs(theirs - ours).max() < TOLERANCE["f32"]
        top2 = np.sort(ours)[-2:]
        if top2[1] - top2[0] <= 2 * TOLERANCE["f32"]:
            break  # a near tie: the two may rightly part from here on
        assert int(theirs.argmax()) == int(ours.argmax())
        ids.append(int(ours.argmax()))
        llama_f32.eval([ids[-1]])
        checked += 1
    assert checked >= 20, f"only {checked} tokens had a margin above the tolerance"


@pytest.mark.parametrize("type", ["bf16", "q8_0"])
def test_llama_cpp_low_precision_exports(trained, exported, type):
    """bf16 and q8_0 files load; their logits stay within the tolerance at 90% of the positions of
    the learned passage, and their top-1 token is nanoseek's at 90% of the positions where its
    margin exceeds twice the tolerance. Not at all of them: rounded weights can rightly route a
    token to other experts (seen with AVX2 kernels: an error of 7.5 at a margin of 5.5)."""
    _, model, tok = trained
    ids = tok.encode(PASSAGE, add_bos=True)
    ours = _nanoseek_logits(model, ids)
    theirs = _llama_logits(_llama(exported[type]), ids)
    error = np.abs(theirs - ours).max(axis=-1)
    assert (error < TOLERANCE[type]).mean() >= 0.9, np.quantile(error, [0.5, 0.9, 1.0])
    top2 = np.sort(ours, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    clear = margin > 2 * TOLERANCE[type]
    assert clear.mean() > 0.5  # the model has learned the passage
    agree = theirs.argmax(-1)[clear] == ours.argmax(-1)[clear]
    assert agree.mean() >= 0.9, [(i, margin[i], error[i]) for i in np.flatnonzero(clear)[~agree]]
