"""The CPU kernels of engine/kernels: built here with the machine's C++ compiler, checked against
model/moe.py's dropless dispatch (the reference for every expert path)."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import kernels
from nanoseek.engine.compiled import compiler_missing
from nanoseek.engine.quant import quantize_tensor
from nanoseek.model import moe

pytestmark = pytest.mark.skipif(compiler_missing() is not None, reason="no C++ compiler")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load()


def experts(E: int, d: int, inner: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, d, 2 * inner, generator=g) / d**0.5
    down = torch.randn(E, inner, d, generator=g) / inner**0.5
    return gate_up, down


def reference(x, weights, ids, gate_up, down):
    def expert(e, rows):
        gate, up = (rows @ gate_up[e]).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ down[e]

    out, _ = moe.dispatch(
        x, weights, ids, gate_up.shape[0], lambda xs, c: moe.run_experts(xs, c, expert)
    )
    return out


def run(x, weights, ids, gate_up, down, dtype=torch.float32):
    return kernels.moe_experts(x, weights, ids, *kernels.pack_experts(gate_up, down, dtype))


def as_stored(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The matrices [E, K, N] as the kernel reads them, back in fp32: bf16-rounded, or int8 times
    its scale per expert and output column."""
    if dtype == torch.int8:
        q, scale = quantize_tensor(w.mT, torch.bfloat16)
        return (q.float() * scale.float().unsqueeze(-1)).mT
    return w.to(dtype).float()


# shapes: full register tiles (64 columns with AVX-512) and partial ones; experts with 0, 1 and
# more rows than the kernel's register tile holds (6)
SHAPES = [(1, 8, 2, 64, 32), (5, 8, 3, 16, 12), (16, 16, 4, 128, 64), (64, 4, 2, 80, 40)]


@pytest.mark.parametrize("n,E,K,d,inner", SHAPES + [(3, 6, 6, 40, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_moe_experts_equals_dropless_dispatch(n, E, K, d, inner, dtype):
    """fp32 accumulation over the stored matrices: within fp32 rounding of the dropless dispatch
    over the same (rounded or quantized) matrices, whatever their dtype."""
    torch.manual_seed(n * 31 + E)
    gate_up, down = experts(E, d, inner)
    x = torch.randn(n, d)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(n)])
    weights = torch.rand(n, K)
    got = run(x, weights, ids, gate_up, down, dtype)
    want = reference(x, weights, ids, as_stored(gate_up, dtype), as_stored(down, dtype))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_moe_experts_does_not_depend_on_the_thread_count():
    gate_up, down = experts(16, 128, 64)
    x = torch.randn(32, 128)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(32)])
    weights = torch.rand(32, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, weights, ids, gate_up, down)
        torch.set_num_threads(3)
        three = run(x, weights, ids, gate_up, down)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_moe_experts_rejects_bad_input_by_name():
    gate_up, down = experts(4, 16, 8)
    packed = kernels.pack_experts(gate_up, down)
    x, weights = torch.randn(2, 16), torch.rand(2, 2)
    ids = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        kernels.moe_experts(x, weights, torch.tensor([[0, 4], [1, 2]]), *packed)
    with pytest.raises(RuntimeError, match="packed in tiles"):
        kernels.moe_experts(x, weights, ids, gate_up, down)  # not packed
    with pytest.raises(RuntimeError, match="x and weights float32"):
        torch.ops.nanoseek_kernels.moe_experts(x.double(), weights, ids, *packed[:2])
    q = kernels.pack_experts(gate_up, down, torch.int8)
    with pytest.raises(RuntimeError, match="int8 gate_up needs its fp32 scales"):
        kernels.moe_experts(x, weights, ids, *q[:2])
    with pytest.raises(RuntimeError, match="for int8 matrices only"):
        kernels.moe_experts(x, weights, ids, *packed[:2], q[2], q[3])


def test_moe_experts_traces_as_one_op():
    """torch.export sees one call of the op (its fake gives the shape): a compiled graph calls
    it as an extern kernel."""
    packed = kernels.pack_experts(*experts(4, 16, 8))

    class Layer(torch.nn.Module):
        def forward(self, x, weights, ids):
            return kernels.moe_experts(x, weights, ids, *packed) * 2

    x, weights = torch.randn(3, 16), torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3]])
    program = torch.export.export(Layer(), (x, weights, ids))
    calls = [n for n in program.graph.nodes if "moe_experts" in str(n.target)]
    assert len(calls) == 1
    torch.testing.assert_close(program.module()(x, weights, ids), Layer()(x, weights, ids))


@pytest.mark.parametrize("n,k,out", [(1, 64, 64), (6, 40, 100), (16, 256, 520), (13, 24, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_linear_equals_the_product_over_the_stored_matrix(n, k, out, dtype):
    """Full and partial register tiles and row groups: x @ w over w as stored (bf16-rounded, or
    int8 times its scale per column), within fp32 rounding."""
    torch.manual_seed(n + k)
    w_t, x = torch.randn(k, out) / k**0.5, torch.randn(n, k)
    got = kernels.linear(x, *kernels.pack_linear(w_t, dtype), out)
    assert got.shape == (n, out) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ as_stored(w_t[None], dtype)[0], atol=1e-5, rtol=1e-5)


def test_linear_does_not_depend_on_the_thread_count_and_traces_as_one_op():
    w_t, x = torch.randn(128, 300), torch.randn(16, 128)
    packed = kernels.pack_linear(w_t)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, *packed, 300)
        torch.set_num_threads(3)
        three = kernels.linear(x, *packed, 300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return kernels.linear(x, *packed, 300) + 1

    program = torch.export.export(Layer(), (x,))
    assert len([n for n in program.graph.nodes if "linear" in str(n.target)]) == 1
    torch.testing.assert_close(program.module()(x), one + 1)


def test_linear_rejects_bad_input_by_name():
    w_t, x = torch.randn(16, 70), torch.randn(2, 16)
    packed, _ = kernels.pack_linear(w_t)
    q, scale = kernels.pack_linear(w_t, torch.int8)
    with pytest.raises(RuntimeError, match="packed in tiles"):
        kernels.linear(x, packed, None, 200)  # more columns than its tiles hold
    with pytest.raises(RuntimeError, match="packed in tiles"):
        kernels.linear(torch.randn(2, 8), packed, None, 70)
    with pytest.raises(RuntimeError, match="x \\[N, in\\] float32"):
        torch.ops.nanoseek_kernels.linear(x.double(), packed, None, 70)
    with pytest.raises(RuntimeError, match="int8 w needs its fp32 scales"):
        kernels.linear(x, q, None, 70)
    with pytest.raises(RuntimeError, match="for int8 matrices only"):
        kernels.linear(x, packed, scale, 70)


def test_a_failed_build_warns_and_reports_false(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'nanoseek_kernels'")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(kernels, "_registered", lambda: False)
    with pytest.warns(RuntimeWarning, match="decode step runs composed ops"):
        assert kernels.load.__wrapped__() is False
