"""int8 weight-only quantization: error bounds, quality on held-out tokens,
the on-disk round trip, the engine."""

import pytest
import torch

from nanoseek import save_model
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.quant import (
    INT8_FILE,
    Int8Experts,
    Int8Linear,
    load_quantized,
    quantization_error,
    quantize_model,
    quantize_tensor,
    save_quantized,
)

from helpers import one_thread, reference_greedy, tiny_model  # noqa: F401


def test_per_channel_rounding_error_is_at_most_half_a_step():
    w = torch.randn(3, 16, 40) * torch.rand(3, 16, 1) * 5
    q, scale = quantize_tensor(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 16) and q.abs().max() == 127
    err = (q.float() * scale.unsqueeze(-1) - w).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()


def test_quantized_model_is_close_and_four_times_smaller_in_its_matrices():
    # the usual scale, not a chaotic one
    model = tiny_model(num_nextn_predict_layers=1, initializer_range=0.02)
    q = quantize_model(model)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) > 20
    # two MoE layers + the MTP block
    assert sum(isinstance(m, Int8Experts) for m in q.modules()) == 3
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # the original is untouched
    held_out = torch.randint(2, 128, (4, 64), generator=torch.Generator().manual_seed(5))
    report = quantization_error(model, q, held_out)
    assert report["max_logit_error"] < 0.05 * report["logit_scale"] + 0.01
    assert abs(report["perplexity_change"]) < 0.01
    assert report["weight_bytes_int8"] < 0.45 * report["weight_bytes_fp"]
    assert report["tokens"] == 4 * 63


def test_int8_round_trip_through_the_checkpoint_directory(tmp_path):
    model = tiny_model()
    q = quantize_model(model)
    save_model(model, tmp_path)
    save_quantized(q, tmp_path)
    assert (tmp_path / INT8_FILE).is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = load_quantized(tmp_path)
    ours = dict(q.named_buffers())
    theirs = dict(loaded.named_buffers())
    int8 = [k for k, v in ours.items() if v.dtype == torch.int8]
    assert int8 and all(torch.equal(ours[k], theirs[k]) for k in int8)
    ids = torch.randint(2, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(q(ids), loaded(ids))
    # the floating-point checkpoint in the same directory is untouched
    # and still loads in transformers
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_loading_checks_the_int8_file(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path)
    with pytest.raises(FileNotFoundError, match=INT8_FILE):
        load_quantized(tmp_path)
    other = tmp_path / "other"
    save_quantized(quantize_model(tiny_model(hidden_size=48)), other)
    (other / INT8_FILE).rename(tmp_path / INT8_FILE)
    with pytest.raises(ValueError, match="shape"):
        load_quantized(tmp_path)


def test_the_engine_runs_a_quantized_model_exactly_as_the_model_does():
    q = quantize_model(tiny_model(num_nextn_predict_layers=1))
    prompts = [[5, 6, 7, 8], list(range(2, 30))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for speculative in (False, True):
        outs = Engine(q, block_size=4, speculative=speculative).generate(prompts, params)
        assert [o.token_ids for o in outs] == [reference_greedy(q, p, 12) for p in prompts]
