"""The model's pieces against first-principles references: dropless MoE,
routing, MLA's two paths, MTP, balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer
from nanoseek.model.attention import (
    absorb_query,
    attend_latent,
    causal_attention_products,
    expand_output,
)
from nanoseek.model.moe import (
    ROW_BLOCK,
    MoE,
    _inverse,
    _rank,
    cpu_grouped_mm,
    dispatch,
    dispatch_one,
)
from nanoseek.model.rope import apply_rope, inverse_frequencies, rope_tables

from helpers import tiny_config


def test_moe_is_dropless_and_equals_a_per_token_reference():
    cfg = tiny_config()
    moe = MoE(cfg).eval()
    Transformer(cfg)  # the same init recipe as in a model
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    x = torch.randn(3, 7, cfg.hidden_size)
    out, _ = moe(x)
    weights, ids, _ = moe.gate(x.view(-1, cfg.hidden_size))
    ref = torch.zeros(21, cfg.hidden_size)
    # every token, every chosen expert: nothing dropped
    for t, token in enumerate(x.view(-1, cfg.hidden_size)):
        for w, e in zip(weights[t], ids[t]):
            gate, up = (moe.experts.gate_up_proj[e] @ token).chunk(2)
            ref[t] += w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
    ref += moe.shared_experts(x.view(-1, cfg.hidden_size))
    assert torch.allclose(out.view(-1, cfg.hidden_size), ref, atol=1e-5)


def test_moe_fallback_loop_equals_grouped_matmul(monkeypatch):
    cfg = tiny_config()
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 9, cfg.hidden_size)
    grouped, _ = moe(x)
    monkeypatch.setattr("nanoseek.model.moe.grouped_mm_ok", lambda *a: False)
    looped, _ = moe(x)
    assert torch.allclose(grouped, looped, atol=1e-6)


def _relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def test_bf16_expert_products_take_few_shapes_and_equal_grouped_mm():
    """The experts' grouped products in bf16 on CPU (`cpu_grouped_mm`, each expert's rows split
    into a multiple of ROW_BLOCK and the rest, so that oneDNN reuses the kernels it built): every
    matrix product run, forward and backward, has each dimension a multiple of ROW_BLOCK or below
    it, whatever the counts; the output and both gradients are F.grouped_mm's, in fp32 on the same
    bf16 values, within bf16's rounding (unit roundoff 2^-8: relative error below 2e-2)."""
    block = ROW_BLOCK
    counts = torch.tensor([0, 1, block - 1, block, block + 5, 3 * block, 2 * block + 17])
    offsets = counts.cumsum(0).to(torch.int32)
    m, k, n = int(offsets[-1]), 2 * block, 3 * block
    x = torch.randn(m, k).bfloat16().requires_grad_()
    w = torch.randn(len(counts), n, k).bfloat16().requires_grad_()  # used transposed, as Experts
    grad = torch.randn(m, n).bfloat16()
    with torch.profiler.profile(record_shapes=True) as prof:
        out = cpu_grouped_mm(x, w.mT, offsets)
        out.backward(grad)
    products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm_")]
    dims = {d for e in products for shape in e.input_shapes if len(shape) == 2 for d in shape}
    assert products and all(d % block == 0 or d < block for d in dims), sorted(dims)
    assert not any(e.name == "aten::_grouped_mm" for e in prof.events())

    xf = x.detach().float().requires_grad_()
    wf = w.detach().float().requires_grad_()
    ref = F.grouped_mm(xf, wf.mT, offs=offsets)
    ref.backward(grad.float())
    assert _relative_error(out, ref) < 2e-2
    assert _relative_error(x.grad, xf.grad) < 2e-2
    assert _relative_error(w.grad, wf.grad) < 2e-2
    assert not w.grad[0].any()  # the expert without rows: no gradient


def test_moe_under_bf16_autocast_equals_the_grouped_mm_path(monkeypatch):
    """A MoE layer's forward and expert gradients under bf16 autocast on CPU, through the
    few-shapes products, against the same layer through F.grouped_mm and its own backward (the
    path before them): equal within bf16's rounding (relative error below 2e-2), with experts
    given a multiple of ROW_BLOCK rows and a remainder."""
    cfg = tiny_config()
    moe = MoE(cfg).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(4, 64, cfg.hidden_size)
    probe = torch.randn(4, 64, cfg.hidden_size)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = moe(x)
        (out.float() * probe).sum().backward()
        grads = [p.grad.clone() for p in (moe.experts.gate_up_proj, moe.experts.down_proj)]
        moe.zero_grad()
        return out.detach(), grads

    out, grads = run()
    load = moe.expert_load.clone()
    assert ((load > ROW_BLOCK) & (load % ROW_BLOCK != 0)).any()  # both parts of a product ran
    monkeypatch.setattr("nanoseek.model.moe._onednn_dtype", lambda x: False)
    ref_out, ref_grads = run()
    assert _relative_error(out, ref_out) < 2e-2
    for g, ref in zip(grads, ref_grads):
        assert _relative_error(g, ref) < 2e-2


def test_router_selects_with_bias_but_weights_without_it():
    cfg = tiny_config(
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_()
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 always selected ...
    x = torch.randn(16, cfg.hidden_size)
    weights, ids, scores = moe.gate(x)
    assert (ids == 5).any(-1).all()
    picked = scores.gather(1, ids)  # ... but weighted by its plain sigmoid affinity
    assert torch.allclose(weights, picked)


def test_group_limited_routing_uses_only_topk_groups():
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_()
    _, ids, scores = moe.gate(torch.randn(64, cfg.hidden_size))
    groups = ids // 4
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    # the kept groups are those with the largest sum of their top-2 affinities
    group_score = scores.view(64, 4, 4).topk(2, -1).values.sum(-1)
    best = group_score.topk(2, -1).indices.sort(-1).values
    assert all(set(g.tolist()) <= set(b.tolist()) for g, b in zip(groups, best))


def test_softmax_routing_for_v2_checkpoints():
    cfg = tiny_config(
        scoring_func="softmax",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    moe = MoE(cfg)
    assert not hasattr(moe.gate, "e_score_correction_bias")
    with torch.no_grad():
        moe.gate.weight.normal_()
    x = torch.randn(8, cfg.hidden_size)
    weights, ids, scores = moe.gate(x)
    probs = (x @ moe.gate.weight.T).softmax(-1)
    assert torch.allclose(scores, probs, atol=1e-6)
    assert torch.allclose(weights, probs.topk(cfg.num_experts_per_tok).values, atol=1e-6)


def test_aux_free_bias_updates_balance_a_skewed_router():
    cfg = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=2, aux_loss_alpha=0.0)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.weight[:2] += 0.3  # inputs share a direction that experts 0 and 1 love
    direction = torch.ones(cfg.hidden_size) / math.sqrt(cfg.hidden_size)

    def imbalance() -> float:
        load = moe.expert_load
        return (load.max() / load.mean()).item()

    def batch():
        return torch.randn(4, 64, cfg.hidden_size) * 0.5 + 1.0 * direction

    with torch.no_grad():
        moe(batch())
        before = imbalance()
        moe.update_bias(0.0)  # γ = 0: counts reset, nothing changes
        for _ in range(300):
            moe(batch())
            moe.update_bias(0.01)
        for _ in range(20):  # measure the learned biases on fresh data, frozen
            moe(batch())
    after = imbalance()
    assert before > 3.0, before  # experts 0 and 1 take nearly every token
    assert after < 1.5, after
    assert moe.gate.e_score_correction_bias[:2].max() < moe.gate.e_score_correction_bias[2:].min()


NO_GROUPS = dict(n_group=1, topk_group=1)


@pytest.mark.parametrize(
    "routing",
    [
        dict(),  # V3: sigmoid, 2 of 4 groups, bias, renormalised
        dict(NO_GROUPS, norm_topk_prob=False),
        dict(scoring_func="softmax"),
        dict(NO_GROUPS, scoring_func="softmax", norm_topk_prob=False),
    ],
)
def test_route_one_makes_the_tensor_routers_choices(routing):
    """The one-token Python fast path (Router.route_one) against Router.route, V3 bias included."""
    router = MoE(tiny_config(num_experts_per_tok=3, **routing)).gate
    bias = torch.randn(8) * 0.1 if router.sigmoid else None
    logits = torch.randn(200, 8) * 2
    weights, ids, _ = router.route(logits, bias)
    for i in range(200):
        bias_list = None if bias is None else bias.tolist()
        one_ids, one_weights = router.route_one(logits[i : i + 1], bias_list)
        assert one_ids == ids[i].tolist()
        assert torch.allclose(torch.tensor(one_weights), weights[i], atol=1e-6)


@pytest.mark.parametrize(
    "routing",
    [
        dict(),  # V3: sigmoid, 2 of 4 groups of 4, bias
        dict(n_group=8, topk_group=3),  # groups of 2
        dict(scoring_func="softmax"),  # V2: a group scores its best
    ],
)
def test_compiled_route_equals_eager_route_bitwise(routing):
    """Compiled, `Router.route` limits the groups with `dropped_groups_fused` instead of the eager
    path's topk calls: the same groups, experts and weights, bit for bit."""
    router = MoE(tiny_config(n_routed_experts=16, num_experts_per_tok=4, **routing)).gate
    bias = torch.randn(16) * 0.1 if router.sigmoid else None
    logits = torch.randn(500, 16) * 2
    weights, ids, _ = router.route(logits, bias)
    torch._dynamo.reset()
    compiled = torch.compile(router.route, backend="eager", fullgraph=True)
    fused_weights, fused_ids, _ = compiled(logits, bias)
    assert torch.equal(fused_ids, ids)
    assert torch.equal(fused_weights, weights)
    # and the group masks themselves, over scores of every kind
    choice = logits.sigmoid() if router.sigmoid else logits.softmax(-1)
    grouped = choice.unflatten(-1, (router.n_group, -1))
    assert torch.equal(router.dropped_groups_fused(grouped), router.dropped_groups(grouped))


def test_rank_orders_best_first_with_ties_to_the_lower_index():
    scores = torch.tensor([[0.5, 0.25, 0.5, 0.75], [1.0, 1.0, 1.0, 1.0], [0.1, 0.4, 0.3, 0.2]])
    assert _rank(scores).tolist() == [[1, 3, 2, 0], [0, 1, 2, 3], [3, 0, 1, 2]]
    random = torch.randint(0, 4, (300, 6)).float()  # many ties
    stable = (-random).argsort(dim=-1, stable=True).argsort(dim=-1)
    assert torch.equal(_rank(random), stable)


def test_inverse_inverts_a_permutation():
    perm = torch.randperm(1000)
    inverse = _inverse(perm)
    assert torch.equal(perm[inverse], torch.arange(1000))
    assert torch.equal(inverse, perm.argsort())


def test_attention_gradients_equal_unpadded_attention():
    """MLA's training path (values padded to the query width for the CPU's fused kernel, the
    padding cut off after a transpose) against plain SDPA on the unpadded values: outputs and
    every gradient."""
    cfg = tiny_config()
    model = Transformer(cfg)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 12, cfg.hidden_size, requires_grad=True)
    cos, sin = model.rope(torch.arange(12))

    def plain(x):
        q_nope, q_rope = attn.query(x, cos, sin)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k, v = attn.expand(*attn.latent(x, cos, sin))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
        return attn.o_proj(o.transpose(1, 2).flatten(2))

    grad_out = torch.randn(2, 12, cfg.hidden_size)
    grads = []
    outs = []
    for fn in (attn, plain):
        out = fn(x, cos, sin) if fn is attn else fn(x)
        params = [x, *attn.parameters()]
        grads.append(torch.autograd.grad(out, params, grad_out))
        outs.append(out.detach())
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("kernel", ["fp32", "math"])
def test_each_attention_kernel_under_bf16_autocast_matches_bf16_attention(kernel):
    """MLA.kernel "fp32" (the fused kernel's inputs cast up, its output cast back) and "math" (the
    two products unfused, softmax in fp32), what a bf16 run takes where the CPU runs them faster:
    the layer still hands bf16 on; output and gradients as the fused bf16 kernel gives them, to
    bf16's precision. Without autocast both compute fp32 attention as the fused kernel does."""
    cfg = tiny_config()
    torch.manual_seed(0)
    attn = Transformer(cfg).layers[0].self_attn
    x = torch.randn(2, 12, cfg.hidden_size, requires_grad=True)
    cos, sin = Transformer(cfg).rope(torch.arange(12))
    grad_out = torch.randn(2, 12, cfg.hidden_size)
    outs, grads = [], []
    for choice in (None, kernel):
        attn.kernel = choice
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, cos, sin)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float(), [x, *attn.parameters()], grad_out))
        outs.append(out.detach().float())
    scale = outs[0].abs().max().item()
    assert (outs[0] - outs[1]).abs().max().item() < 0.05 * scale
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item() + 1e-6
    attn.kernel = kernel
    chosen = attn(x, cos, sin)
    attn.kernel = None
    assert (chosen - attn(x, cos, sin)).abs().max().item() < 1e-5


def test_causal_attention_products_equal_causal_sdpa():
    """The unfused kernel is causal SDPA: the same outputs and gradients in fp32, values narrower
    than queries as MLA's are."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8, requires_grad=True), torch.randn(2, 3, 9, 8, requires_grad=True)
    v = torch.randn(2, 3, 9, 5, requires_grad=True)
    g = torch.randn(2, 3, 9, 5)
    ours = causal_attention_products(q, k, v, 0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (ours - theirs).abs().max().item() < 1e-5
    for a, b in zip(
        torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(theirs, (q, k, v), g)
    ):
        assert (a - b).abs().max().item() < 1e-5


def test_logits_at_gives_the_chosen_positions_logits():
    """forward(logits_at=mask) -> the full logits' rows at the mask, in row-major order."""
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 10))
    mask = torch.rand(3, 10) < 0.4
    with torch.no_grad():
        full, chosen = model(ids), model(ids, logits_at=mask)
    assert chosen.shape == (int(mask.sum()), model.config.vocab_size)
    torch.testing.assert_close(chosen, full[mask])


def test_dispatch_one_equals_dispatch():
    moe = MoE(tiny_config()).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(5, moe.gate.weight.shape[1])
        weights, ids, _ = moe.gate(x)
        sorted_path, _ = dispatch(x, weights, ids, moe.n_experts, moe.experts)
        for i in range(5):
            one = dispatch_one(
                x[i : i + 1],
                ids[i].tolist(),
                weights[i].tolist(),
                moe.experts.expert,
                torch.zeros(1, x.shape[1]),
            )
            assert torch.allclose(one, sorted_path[i : i + 1], atol=1e-5)


def test_sequence_balance_loss_is_minimal_for_even_routing():
    cfg = tiny_config(aux_loss_alpha=1.0, num_experts_per_tok=2)
    moe = MoE(cfg)
    E, T = cfg.n_routed_experts, 8
    uniform = torch.full((1, T, E), 0.5)
    even = torch.arange(T * 2).view(1, T, 2) % E
    skewed = torch.tensor([[0, 1]]).expand(1, T, 2)
    assert moe.sequence_balance_loss(uniform, even).item() == pytest.approx(1.0)
    # uniform scores: no gradient
    assert moe.sequence_balance_loss(uniform, skewed).item() == pytest.approx(1.0)
    peaked = torch.full((1, T, E), 0.01)
    peaked[..., :2] = 0.99
    assert moe.sequence_balance_loss(peaked, skewed).item() > 3.0


def absorbed_attention(attn, q_nope, q_rope, c_kv, k_rope, mask):
    """MLA over a dense latent cache with the absorbed math the engine runs (the functions of
    model/attention.py): queries [B, T, H, *], latents [B, S, *], mask bool [B, T, S] (True = may
    attend) -> o_proj output [B, T, d]."""
    B, T, H = q_nope.shape[:3]
    w_uk, w_uv = attn.absorbed_weights()
    q = absorb_query(q_nope.flatten(0, 1), q_rope.flatten(0, 1), w_uk).view(B, T * H, -1)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).repeat_interleave(H, dim=1)
    o_latent = attend_latent(q, torch.cat((c_kv, k_rope), dim=-1), bias, attn.scale, attn.kv_rank)
    o = expand_output(o_latent.view(B * T, H, -1), w_uv.transpose(1, 2))
    return attn.o_proj(o.view(B, T, -1))


def test_absorbed_attention_equals_expanded_attention():
    cfg = tiny_config(
        rope_scaling={
            "type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 16,
            "mscale": 0.7,
            "mscale_all_dim": 0.7,
        }
    )
    model = Transformer(cfg).eval()
    attn = model.layers[0].self_attn
    x = torch.randn(2, 20, cfg.hidden_size)
    cos, sin = model.rope(torch.arange(20))
    with torch.no_grad():
        expanded = attn(x, cos, sin)
        q_nope, q_rope = attn.query(x, cos, sin)
        c_kv, k_rope = attn.latent(x, cos, sin)
        causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 20, 20)
        absorbed = absorbed_attention(attn, q_nope, q_rope, c_kv, k_rope, causal)
    assert (expanded - absorbed).abs().max().item() < 1e-5


def test_rope_rotates_adjacent_pairs_and_preserves_relative_positions():
    cfg = tiny_config()
    cos, sin = rope_tables(cfg)
    q, k = torch.randn(cfg.qk_rope_head_dim), torch.randn(cfg.qk_rope_head_dim)
    rot = lambda v, p: apply_rope(v, cos[p], sin[p])  # noqa: E731
    assert torch.allclose(rot(q, 3) @ rot(k, 1), rot(q, 12) @ rot(k, 10), atol=1e-5)
    # pair (0, 1) turns at the fastest frequency ω_0 = 1
    v = torch.zeros(cfg.qk_rope_head_dim)
    v[0] = 1.0
    assert torch.allclose(rot(v, 1)[:2], torch.tensor([math.cos(1.0), math.sin(1.0)]), atol=1e-6)


def test_yarn_keeps_fast_dims_and_interpolates_slow_ones():
    base = tiny_config(qk_rope_head_dim=64, max_position_embeddings=4096)
    yarn = base.replace(
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    plain, _ = inverse_frequencies(base)
    scaled, magnitude = inverse_frequencies(yarn)
    assert magnitude == 1.0  # mscale == mscale_all_dim: the correction lives in the softmax scale
    assert torch.allclose(scaled[:10], plain[:10])  # V3's correction range is [10, 23]
    assert torch.allclose(scaled[23:], plain[23:] / 40)
    assert yarn.softmax_scale / base.softmax_scale == pytest.approx((0.1 * math.log(40) + 1) ** 2)
    v3 = yarn.replace(qk_nope_head_dim=128)
    # the spec's figure for DeepSeek-V3
    assert v3.softmax_scale == pytest.approx(0.135234, abs=1e-6)


def test_mtp_loss_trains_the_mtp_module():
    cfg = tiny_config(num_nextn_predict_layers=1)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 16))
    # every odd token repeats the one before it: learnable two steps ahead
    ids[:, 1::2] = ids[:, ::2]
    targets = ids.roll(-1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.compute_loss(ids, targets)
    assert first.mtp_loss is not None and first.balance_loss is not None
    first.loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.mtp.named_parameters()
        if "experts" not in n and "gate" not in n
    )
    opt.step()
    for _ in range(60):
        opt.zero_grad()
        out = model.compute_loss(ids, targets)
        out.loss.backward()
        opt.step()
    assert out.mtp_loss.item() < 0.5 * first.mtp_loss.item()
    # no MTP weight, no MTP loss term
    assert model.compute_loss(ids, targets, mtp_weight=0.0).mtp_loss is None


def test_ignore_index_targets_carry_no_loss():
    model = Transformer(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 10))
    targets = ids.roll(-1, 1)
    masked = targets.clone()
    masked[:, :5] = -100
    logits = model(ids)
    expected = F.cross_entropy(logits[:, 5:].flatten(0, 1), targets[:, 5:].flatten())
    assert torch.allclose(model.compute_loss(ids, masked).lm_loss, expected, atol=1e-6)


def test_expert_load_is_counted_in_training_and_reset_by_bias_update():
    cfg = tiny_config()
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model.compute_loss(ids, ids.roll(-1, 1))
    load = model.expert_load()
    assert load.shape == (cfg.n_moe_layers, cfg.n_routed_experts)
    assert torch.all(load.sum(1) == 2 * 12 * cfg.num_experts_per_tok)
    model.update_router_biases(1e-3)
    assert model.expert_load().sum() == 0


def test_parameter_counts():
    cfg = tiny_config()
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == total - inactive
    tied = Transformer(cfg.replace(tie_word_embeddings=True))
    assert tied.num_parameters() == total - cfg.vocab_size * cfg.hidden_size


def test_positions_beyond_the_context_are_refused():
    model = Transformer(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
