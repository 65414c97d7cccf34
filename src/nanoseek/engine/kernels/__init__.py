"""Hand-written CPU kernels for what Inductor cannot generate well, built on first use.

`moe_experts` (moe_experts.cpp): a decode batch's routed experts in one call, each (token, expert)
pair computed once and each expert's weights read once; `linear`: a plain product of a few rows
through the same packed tiles. The batched decode graph calls them as the ops
`torch.ops.nanoseek_kernels.*`, which AOTInductor's packages call back by name.

The C++ source is compiled with torch's extension builder for the CPU it runs on (`-march=native`,
OpenMP) into a folder of torch's extension root (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions) named by this CPU's instruction sets, once per source version: 7-8 s on
a 2-core Zen 4 the first time, a load of the library afterwards. Without a C++ compiler, or when
the build fails, `load()` returns False after one warning, and callers keep the composed ops
(model/moe.py's dispatch functions), which compute the same sums.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from functools import cache
from pathlib import Path

import torch

from nanoseek.engine.quant import quantize_tensor

SOURCE = Path(__file__).with_name("moe_experts.cpp")
NAME = "nanoseek_kernels"


@cache
def load() -> bool:
    """Builds (or finds built) and loads the kernels' library; True once its ops are registered."""
    from nanoseek.engine.compiled import compiler_missing, cpu_signature

    if _registered():  # the library loaded by other means: its fake may be missing
        try:
            _register_fake()
        except RuntimeError:  # it was registered already
            pass
        return True
    missing = compiler_missing()
    if missing:
        warnings.warn(f"nanoseek kernels not built: {missing}", RuntimeWarning, stacklevel=2)
        return False
    from torch.utils import cpp_extension

    # one build folder per instruction set: -march=native code must not meet another CPU that
    # shares the home folder
    machine = hashlib.sha256(cpu_signature().encode()).hexdigest()[:12]
    folder = Path(cpp_extension.get_default_build_root()) / f"{NAME}-{machine}"
    t0 = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE)],
            build_directory=str(folder),
            # OpenMP: at::parallel_for's threads are inlined from ATen's headers
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure leaves the composed ops in place
        warnings.warn(
            f"nanoseek kernels not built ({type(exc).__name__}: {exc}); "
            "the decode step runs composed ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    seconds = time.perf_counter() - t0
    if seconds > 2:
        print(
            f"nanoseek engine: built the CPU kernels in {seconds:.1f} s (cached in {folder})",
            file=sys.stderr,
            flush=True,
        )
    _register_fake()
    return True


def _registered() -> bool:
    return hasattr(torch.ops.nanoseek_kernels, "linear")


def _register_fake() -> None:
    @torch.library.register_fake("nanoseek_kernels::moe_experts")
    def _(x, weights, ids, gate_up, down, gate_up_scale=None, down_scale=None):
        return x.new_empty(x.shape)

    @torch.library.register_fake("nanoseek_kernels::linear")
    def _(x, w, scale, out_features):
        return x.new_empty(x.shape[0], out_features)


@cache
def tile_width() -> int:
    """The columns of the kernel's register tile (64 with AVX-512). Requires `load()`."""
    return torch.ops.nanoseek_kernels.tile_width()


def _tiles(w: torch.Tensor) -> torch.Tensor:
    """[E, K, N] -> [E, ceil(N / T), K, T]: each tile of T columns contiguous, zero-padded."""
    T = tile_width()
    E, K, N = w.shape
    n_tiles = -(-N // T)
    padded = w.new_zeros(E, K, n_tiles * T)
    padded[..., :N] = w
    return padded.view(E, K, n_tiles, T).transpose(1, 2).contiguous()


def _gate_up_tiles(w: torch.Tensor, inner: int) -> torch.Tensor:
    """gate_up's gate half's tiles, then its up half's (a unit reads one of each)."""
    return torch.cat([_tiles(w[..., :inner]), _tiles(w[..., inner:])], dim=1)


def pack_experts(
    gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The routed experts' matrices as x @ W (gate_up [E, d, 2I], gate then up; down [E, I, d])
    laid out for `moe_experts`: in dtype (float32, bfloat16, or int8 with one scale per expert
    and output column, rounded to bf16 as engine.quant's other int8 matrices), in column tiles of
    the kernel's register width. -> (gate_up, down, gate_up_scale, down_scale), the scales None
    but for int8. Requires `load()`."""
    inner = down.shape[1]
    if dtype == torch.int8:
        q_gate_up, s_gate_up = quantize_tensor(gate_up.mT, torch.bfloat16)
        q_down, s_down = quantize_tensor(down.mT, torch.bfloat16)
        return (
            _gate_up_tiles(q_gate_up.mT, inner),
            _tiles(q_down.mT),
            _gate_up_tiles(s_gate_up.float().unsqueeze(1), inner),
            _tiles(s_down.float().unsqueeze(1)),
        )
    gate_up, down = gate_up.detach().to(dtype), down.detach().to(dtype)
    return _gate_up_tiles(gate_up, inner), _tiles(down), None, None


def pack_linear(
    w_t: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A matrix as x @ W (w_t [in, out]) laid out for `linear`: in dtype (float32, bfloat16, or
    int8 with one scale per output column, as engine.quant rounds them) in column tiles of the
    kernel's register width -> (tiles [ceil(out / T), in, T], int8 scales [tiles, 1, T] or None).
    Requires `load()`."""
    if dtype == torch.int8:
        q, scale = quantize_tensor(w_t.t(), torch.bfloat16)
        return _tiles(q.t()[None])[0], _tiles(scale.float()[None, None])[0]
    return _tiles(w_t.detach().to(dtype)[None])[0], None


def linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [N, in] @ a matrix packed by `pack_linear` -> [N, out_features] fp32 (fp32 accumulation
    whatever the matrix's dtype). Requires `load()`."""
    return torch.ops.nanoseek_kernels.linear(x.float().contiguous(), w, scale, out_features)


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k weights[:, k] · expert_{ids[:, k]}(x) for x [N, d], the experts' matrices (and int8
    scales) packed by `pack_experts`: `moe.dispatch`'s result in fp32, each (token, expert) pair
    computed once, with fp32 accumulation whatever the matrices' dtype. Requires `load()`."""
    return torch.ops.nanoseek_kernels.moe_experts(
        x.float().contiguous(),
        weights.float().contiguous(),
        ids.long().contiguous(),
        gate_up,
        down,
        gate_up_scale,
        down_scale,
    )
