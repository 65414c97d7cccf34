"""The engine with images: a vision-language model's prompt carries images whose embeddings replace
its `<image>` positions at prefill. Every logprob the engine reports (prompt positions and generated
tokens) equals log_softmax of the full VisionLanguageModel forward, with chunked prefill and the
prefix cache on; the prefix cache reuses blocks for the same image and never for another image
behind the same token ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nanoseek.config import VisionConfig
from nanoseek.data.images import image_input
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model.vision import VisionLanguageModel

from helpers import TINY_VISION, small_tokenizer, tiny_config, tiny_model

TOL = 1e-4  # fp32 logprobs: the engine's packed, paged forward against the plain forward


def _vlm() -> tuple[VisionLanguageModel, object]:
    tok = small_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    vlm = VisionLanguageModel.build(
        cfg, VisionConfig(**TINY_VISION), tok.special_ids["image"]
    ).eval()
    # the tower's default init gives tiny features; scale them up so the image matters
    with torch.no_grad():
        for p in vlm.vision.projector.parameters():
            p.mul_(30.0)
    return vlm, tok


def _prompt(tok, vlm, before=(7, 8, 9, 10, 11), after=(20, 21, 22)) -> list[int]:
    image_id = tok.special_ids["image"]
    return [tok.bos_id, *before, *[image_id] * 13, *after]  # one 32x32 image: 13 positions


def _check(vlm, prompt, out, images, prompt_too: bool) -> None:
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = F.log_softmax(vlm(ids, images=images)[0].float(), dim=-1)
    V = logp.shape[-1]
    if prompt_too:
        assert out.prompt_logprobs[0] is None
        for p in range(1, len(prompt)):
            got = out.prompt_logprobs[p]
            assert got.token_id == prompt[p]
            assert abs(got.logprob - logp[p - 1, prompt[p]].item()) < TOL
            top = torch.tensor([lp for _, lp in got.top])
            assert len(got.top) == V
            torch.testing.assert_close(
                top, logp[p - 1].sort(descending=True).values, atol=TOL, rtol=0
            )
    for i, (t, lp) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == t and abs(lp.logprob - row[t].item()) < TOL
        top = torch.tensor([v for _, v in lp.top])
        torch.testing.assert_close(top, row.sort(descending=True).values, atol=TOL, rtol=0)


def test_engine_logits_with_an_image_equal_a_full_recompute_and_the_cache_keys_the_image():
    vlm, tok = _vlm()
    V = vlm.config.vocab_size
    red = image_input([Image.new("RGB", (32, 32), (255, 0, 0))], vlm.vision.config)
    blue = image_input([Image.new("RGB", (32, 32), (0, 0, 255))], vlm.vision.config)
    prompt = _prompt(tok, vlm)
    engine = Engine(vlm, block_size=4, max_num_batched_tokens=8, max_batch_size=2)
    gen = dict(max_tokens=5, temperature=0, ignore_eos=True, logprobs=V)

    # cold, chunked (8-token chunks cut through the image), every prompt position checked
    out = engine.generate([prompt], SamplingParams(prompt_logprobs=V, **gen), images=[red])[0]
    _check(vlm, prompt, out, red, prompt_too=True)
    assert out.cached_tokens == 0

    # the same image again: served from the prefix cache, same distributions
    again = engine.generate([prompt], SamplingParams(**gen), images=[red])[0]
    assert again.cached_tokens == 4 * ((len(prompt) - 1) // 4)
    _check(vlm, prompt, again, red, prompt_too=False)
    assert again.token_ids == out.token_ids

    # identical ids, another image: only the block before the image is shared
    other = engine.generate([prompt], SamplingParams(**gen), images=[blue])[0]
    assert other.cached_tokens == 4  # positions 0-3; the image starts at position 6
    _check(vlm, prompt, other, blue, prompt_too=False)
    with torch.no_grad():  # the two images do give different next-token distributions
        ids = torch.tensor([prompt])
        assert not torch.allclose(vlm(ids, images=red)[0, -1], vlm(ids, images=blue)[0, -1])

    # PIL images are tiled by the engine; two prompts with different images batched together
    pil = [[Image.new("RGB", (32, 32), (0, 0, 255))], [Image.new("RGB", (32, 32), (255, 0, 0))]]
    both = Engine(vlm, block_size=4, max_num_batched_tokens=8).generate(
        [prompt, prompt], SamplingParams(**gen), images=pil
    )
    _check(vlm, prompt, both[0], blue, prompt_too=False)
    _check(vlm, prompt, both[1], red, prompt_too=False)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


def test_images_are_checked_against_the_prompt():
    vlm, tok = _vlm()
    prompt = _prompt(tok, vlm)
    img = [Image.new("RGB", (32, 32))]
    engine = Engine(vlm)
    with pytest.raises(ValueError, match="13 <image> positions but no images"):
        engine.add_request(prompt, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="take 13 positions but the prompt has 0"):
        engine.add_request([tok.bos_id, 5, 6], SamplingParams(max_tokens=1), images=img)
    wide = [Image.new("RGB", (64, 32))]  # a 2x1 grid: 17 positions
    with pytest.raises(ValueError, match="take 17 positions but the prompt has 13"):
        engine.add_request(prompt, SamplingParams(max_tokens=1), images=wide)
    with pytest.raises(ValueError, match="need a vision-language model"):
        Engine(tiny_model()).add_request([1, 2, 3], SamplingParams(max_tokens=1), images=img)
    assert not engine.has_unfinished()
