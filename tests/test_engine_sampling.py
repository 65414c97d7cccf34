"""The sampler and the speculative acceptance rule, on hand-made distributions."""

import random

import torch

from nanoseek.engine.sampling import Row, Sampler, SamplingParams
from nanoseek.engine.speculative import SpeculativeDecoder

from helpers import one_thread  # noqa: F401

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.1])


def row(seed: int = 0, prompt=(), output=(), **params) -> Row:
    return Row(
        SamplingParams(**params), random.Random(seed), list(prompt) + list(output), len(prompt)
    )


def kept(**params) -> list[int]:
    """The tokens a row with these params may draw from PROBS."""
    probs = Sampler().probabilities(PROBS.log().unsqueeze(0), [row(**params)])
    return probs[0].nonzero().flatten().tolist()


def test_truncation_keeps_the_right_tokens():
    assert kept(temperature=1.0) == [0, 1, 2, 3]
    assert kept(temperature=1.0, top_k=2) == [0, 1]
    assert kept(temperature=1.0, top_p=0.7) == [0, 1]  # 0.5 < 0.7, then 0.75 reaches it
    assert kept(temperature=1.0, top_p=0.75) == [0, 1]
    assert kept(temperature=1.0, top_p=0.76) == [0, 1, 2]
    assert kept(temperature=1.0, top_p=0.01) == [0]  # the best token always survives
    assert kept(temperature=1.0, min_p=0.25) == [0, 1, 2]  # p >= 0.25 * 0.5
    assert kept(temperature=1.0, top_k=3, top_p=0.6, min_p=0.1) == [0, 1]


def test_temperature_reshapes_and_truncation_renormalises():
    s = Sampler()
    hot = s.probabilities(PROBS.log().unsqueeze(0), [row(temperature=2.0)])[0]
    assert torch.allclose(hot, PROBS.sqrt() / PROBS.sqrt().sum(), atol=1e-6)
    cut = s.probabilities(PROBS.log().unsqueeze(0), [row(temperature=1.0, top_k=2)])[0]
    assert torch.allclose(cut, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=1e-6)


def test_draws_follow_the_distribution_and_skip_impossible_tokens():
    probs = torch.tensor([[0.0, 0.6, 0.0, 0.3, 0.1, 0.0]])
    rng = random.Random(0)
    drawn = Sampler.draw(probs.expand(20000, -1), [rng.random() for _ in range(20000)])
    counts = torch.bincount(drawn, minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    assert (counts / counts.sum() - probs[0]).abs().max() < 0.015
    assert Sampler.draw(probs, [1.0])[0] == 4  # the very top of the cdf is the last possible token


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    r = row(temperature=0, prompt=[0], output=[1, 2, 2], repetition_penalty=2.0)
    assert torch.allclose(
        Sampler().apply_penalties(logits, [r]), torch.tensor([[1.0, -2.0, 0.25, 1.0]])
    )
    r = row(
        temperature=0, prompt=[0], output=[1, 2, 2], presence_penalty=0.5, frequency_penalty=0.25
    )
    assert torch.allclose(
        Sampler().apply_penalties(logits, [r]), torch.tensor([[2.0, -1.75, -0.5, 1.0]])
    )
    # a penalty can change the greedy choice; without one the logits are untouched
    assert Sampler().sample(logits, [row(temperature=0, prompt=[0], repetition_penalty=4.0)]) == [3]
    assert Sampler().apply_penalties(logits, [row(temperature=0)]) is logits


def test_greedy_rows_draw_no_randomness_and_seeded_rows_repeat():
    logits = torch.randn(3, 50)
    rows = [row(seed=5, temperature=0), row(seed=5, temperature=1.0), row(seed=6, temperature=1.0)]
    first = Sampler().sample(logits, rows)
    assert first[0] == int(logits[0].argmax())
    assert rows[0].rng.random() == random.Random(5).random()  # untouched by the greedy row
    again = Sampler().sample(
        logits,
        [row(seed=5, temperature=0), row(seed=5, temperature=1.0), row(seed=6, temperature=1.0)],
    )
    assert again == first


def test_logprobs_and_top_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    (lp,) = Sampler.logprobs(logits, [2], [2])
    ref = logits.log_softmax(-1)[0]
    assert lp.token_id == 2 and abs(lp.logprob - ref[2].item()) < 1e-6
    assert [t for t, _ in lp.top] == [1, 2] and abs(lp.top[0][1] - ref[1].item()) < 1e-6
    assert Sampler.logprobs(logits, [0], [0])[0].top == []


class _Seq:
    def __init__(self, seed, **params):
        self.params = SamplingParams(**params)
        self.rng = random.Random(seed)
        self.token_ids = [0]
        self.num_prompt = 1

    @property
    def output_ids(self):
        return self.token_ids[1:]


def test_speculative_acceptance_keeps_the_target_distribution():
    """Draft d accepted with probability P(d), otherwise a draw from P without d:
    the first token is P-distributed and, after an accepted draft, the second
    follows the next position's distribution."""
    p_first = torch.tensor([0.1, 0.5, 0.3, 0.1])
    p_second = torch.tensor([0.7, 0.1, 0.1, 0.1])
    logits = torch.stack([p_first.log(), p_second.log()])
    spec = SpeculativeDecoder(Sampler())
    first, second = torch.zeros(4), torch.zeros(4)
    trials = 20000
    seqs = [_Seq(i, temperature=1.0) for i in range(trials)]
    # draft: token 2, which P gives 0.3
    outs = spec.verify(logits.repeat(trials, 1), seqs, [2] * trials)
    for i, out in enumerate(outs):
        first[out[0][0]] += 1
        if len(out) == 2:
            assert out[0] == (2, 2 * i) and out[1][1] == 2 * i + 1
            second[out[1][0]] += 1
    assert (first / trials - p_first).abs().max() < 0.015
    assert abs(spec.acceptance_rate - 0.3) < 0.015
    assert (second / second.sum() - p_second).abs().max() < 0.02


def test_greedy_speculation_accepts_exactly_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    spec = SpeculativeDecoder(Sampler())
    assert spec.verify(logits, [_Seq(0, temperature=0)], [1]) == [[(1, 0), (0, 1)]]
    assert spec.verify(logits, [_Seq(0, temperature=0)], [2]) == [[(1, 0)]]
    assert spec.drafted == 2 and spec.accepted == 1


def test_greedy_argmax_is_torch_argmax_with_ties_and_nan():
    """The sampler's greedy pick (numpy for fp32 CPU rows) is torch.argmax's: the first of tied
    maxima, the first NaN when there is one, in fp32 and bf16, for strided rows too."""
    from nanoseek.engine.sampling import _argmax

    rows = torch.tensor(
        [
            [1.0, 3.0, 3.0, -2.0, 0.5],
            [0.0, float("nan"), 5.0, float("nan"), 1.0],
            [float("-inf"), float("-inf"), -1.0, -1.0, float("-inf")],
            [2.0, 2.0, 2.0, 2.0, 2.0],
        ]
    )
    rows = torch.cat([rows, torch.randn(6, 5, generator=torch.Generator().manual_seed(0))])
    for x in (rows, rows.bfloat16(), rows.t().contiguous().t(), rows[::2]):
        assert _argmax(x) == x.argmax(dim=-1).tolist()


def test_draw_equals_the_full_inverse_cdf_formula():
    """draw skips the last-possible-token search when no row ran past the end; its tokens equal the
    full formula's (first cdf entry above u x total, capped at the last nonzero token) for rows with
    zeros inside and at the end, and uniforms at 0 and next to 1."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 50, generator=gen)
    probs[probs < 0.4] = 0.0
    probs[:, -7:] = 0.0
    probs /= probs.sum(-1, keepdim=True)
    uniforms = torch.rand(64, generator=gen).tolist()
    uniforms[:3] = [0.0, 1.0 - 2**-53, 1.0]
    cdf = probs.double().cumsum(dim=-1)
    u = torch.tensor(uniforms, dtype=torch.float64).unsqueeze(1) * cdf[:, -1:]
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    want = torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(1), last)
    assert Sampler.draw(probs, uniforms).tolist() == want.tolist()
    for i in range(64):  # one row at a time too: most rows take the shortcut alone
        assert Sampler.draw(probs[i : i + 1], uniforms[i : i + 1]).tolist() == [want[i].item()]
