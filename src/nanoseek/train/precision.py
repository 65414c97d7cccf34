"""The precision a training step runs in, chosen by measuring this machine.

"fp32" runs everything in fp32; "bf16" runs forward and backward under bf16 autocast. Either way the
master weights, gradients and optimizer state stay fp32. "auto" (TrainConfig's default) takes bf16
on CUDA; on a CPU that runs bf16 natively (AVX512_BF16 or AMX) it times forward + backward of the
model in both precisions, interleaved, on a copy of the model and on random tokens (so the run's
weights, data position and random state are untouched), and takes bf16 only when it is at least
`MARGIN` faster; fp32 on every other CPU. A matmul's speed-up alone misleads: the step is mostly not
large matmuls. A run that compiles its step is timed compiled, since compiling changes the answer
(the cpu preset's model, compiled on a Zen 4 at two threads: fp32 603 ms, bf16 405 ms per forward +
backward, where on a Xeon the eager probe had chosen fp32). The compiled copy shares the run's code,
so Inductor's cache makes the run's own compile of the chosen precision cheap.

Under bf16, the attention kernel is a second choice (`attention_kernel`): on a CPU the fused SDPA
kernel's bf16 path is not always faster than its fp32 one, nor than attention's two products
unfused ("math", which Inductor fuses with what surrounds them when the step compiles), so the
model's forward + backward is timed with each of the three at the stage's batch shape, compiled
where the stage compiles.

The choices are cached per machine, model and batch shape (`cache_path`), so that the same seed on
the same machine trains the same way run after run; a resumed run reuses the choices its checkpoint
recorded and times nothing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nanoseek.io import atomic_write_text
from nanoseek.model.attention import MLA

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MARGIN = 0.05  # bf16 must be at least this much faster (a fraction of the fp32 step time)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them ("flags" on x86, "Features" on Arm; empty
    elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text("utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


# the instruction sets that decide which kernels are fast here, as benchmarks report them
SPEED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "avx512_vnni",
    "amx_bf16",
    "amx_tile",
)


def cpu_summary() -> dict:
    """The CPU a figure comes from: its name, thread count and SPEED_FLAGS present."""
    flags = cpu_flags()
    return {
        "name": cpu_name(),
        "threads": torch.get_num_threads(),
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "native_bf16": native_bf16(torch.device("cpu")),
    }


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text("utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware (not by converting to fp32 and back)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if cpu_flags() & set(NATIVE_BF16_FLAGS):
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPUID checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The context a forward (and its backward) runs under for `precision` ("fp32" or "bf16")."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_pass(
    model: torch.nn.Module,
    device: torch.device,
    precision: str,
    batch_size: int,
    seq_len: int,
    run: torch.nn.Module | None = None,
) -> float:
    """One forward + backward of `model` (a copy: its gradients go nowhere), through `run` (the
    model itself, or it compiled), on random tokens [batch_size, seq_len] in `precision` ->
    the loss."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen).to(device)
    run = model if run is None else run
    with autocast(device, precision):
        loss = run(ids[:, :-1], ids[:, 1:]).loss  # forward with targets: the loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item()


def measure(
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    rounds: int = 3,
    compiled: bool = False,
) -> dict[str, float]:
    """Best seconds per forward + backward in each precision, measured alternately (fp32, bf16,
    fp32, ...) after one warm-up each (which compiles, when `compiled`), so that a busy machine
    slows both alike."""
    twin = copy.deepcopy(model).train()
    run = torch.compile(twin) if compiled else twin
    passes = {
        name: functools.partial(train_pass, twin, device, name, batch_size, seq_len, run)
        for name in DTYPES
    }
    best = best_alternately(passes, rounds)
    if compiled:
        forget_timing_graphs()
    return best


def best_alternately(passes: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best seconds of each pass, run in turn `rounds` times after one warm-up round (which
    compiles, where a pass is compiled), so that a busy machine slows them alike."""
    best = {name: float("inf") for name in passes}
    for r in range(rounds + 1):  # round 0 warms up and is not counted
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            if r:
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(s, 5) for name, s in best.items()}


def forget_timing_graphs() -> None:
    """Drop what torch.compile holds for the copies just timed. Each is one more entry in Dynamo's
    cache for the model's forward, and past its recompile limit (8) the run's own model would
    silently run eagerly. Inductor's compiled code stays cached on disk, so the run's compile of
    the chosen variant is quick."""
    torch._dynamo.reset()


def cache_path() -> Path:
    root = os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek"
    return Path(root) / "precision.json"


def cache_key(
    model: torch.nn.Module, device: torch.device, batch_size: int, seq_len: int, compiled: bool
) -> str:
    """This machine, torch build, thread count, model, batch shape and whether the step compiles."""
    parts = [
        cpu_name(),
        torch.__version__,
        str(torch.get_num_threads()),
        str(device.type),
        json.dumps(model.config.to_dict(), sort_keys=True, default=str),
        f"{batch_size}x{seq_len}",
    ]
    if compiled:  # (eager keys stay those of earlier versions)
        parts.append("compiled")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _cached(key: str, decide) -> tuple[str, dict]:
    """The cache's entry for `key`, else decide() -> (choice, timing) stored under it ->
    (choice, its timing with the reason: "cached timing" or "timed")."""
    path = cache_path()
    try:
        cached = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]["precision"], {**cached[key]["timing"], "reason": "cached timing"}
    choice, timing = decide()
    cached[key] = {"precision": choice, "timing": timing}
    try:
        atomic_write_text(path, json.dumps(cached, indent=1) + "\n")
    except OSError:  # a read-only home: the choice is simply not remembered
        pass
    return choice, {**timing, "reason": "timed"}


def choose(
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    compiled: bool = False,
) -> tuple[str, dict]:
    """`auto`'s choice for this model and batch on this device, for a step run compiled or
    eagerly -> (precision, how it was decided)."""
    if device.type == "cuda":
        return "bf16", {"reason": "cuda"}
    if not native_bf16(device):
        return "fp32", {"reason": "no native bf16 on this CPU"}

    def decide():
        timing = measure(model, device, batch_size, seq_len, compiled=compiled)
        return ("bf16" if timing["bf16"] < (1 - MARGIN) * timing["fp32"] else "fp32"), timing

    return _cached(cache_key(model, device, batch_size, seq_len, compiled), decide)


# How a bf16 run's attention can run (MLA.kernel): the fused kernel in bf16 (the default) or in
# fp32, or attention's two products unfused
ATTENTION_KERNELS = ("bf16", "fp32", "math")


def measure_attention(
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    rounds: int = 3,
    compiled: bool = False,
) -> dict[str, float]:
    """Best seconds per bf16 forward + backward of the model (copies of it) with each of
    ATTENTION_KERNELS, measured alternately after one warm-up each (which compiles each its own
    graph, when `compiled`). The whole model rather than attention alone: what surrounds the kernel
    (values padded for the fused one, layouts, what Inductor fuses around the unfused one) is part
    of its cost (the cpu preset's model, compiled, [16, 256]: attention alone timed the fused fp32
    kernel fastest, the whole step ran 8% faster unfused)."""
    passes = {}
    for kernel in ATTENTION_KERNELS:
        twin = copy.deepcopy(model).train()
        set_attention_kernel(twin, kernel)
        run = torch.compile(twin) if compiled else twin
        passes[kernel] = functools.partial(
            train_pass, twin, device, "bf16", batch_size, seq_len, run
        )
    best = best_alternately(passes, rounds)
    if compiled:
        forget_timing_graphs()
    return best


def attention_kernel(
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int,
    seq_len: int,
    compiled: bool = False,
) -> tuple[str, dict]:
    """How a bf16 run's attention runs -> (one of ATTENTION_KERNELS, how it was decided): on a CPU
    the one whose forward + backward of the model at the stage's batch shape is fastest, if at
    least MARGIN faster than with the fused bf16 kernel. That kernel converts blocks back and forth
    on a CPU without AMX; which of the others wins depends on the shape and on compiling (a Zen 4 at
    two threads, attention alone, forward + backward, [B, H, T, D] = [32, 8, 93, 48], GRPO's update
    of the cpu preset: fused bf16 43 ms, fused fp32 23 ms, unfused 13 ms; [4, 8, 1024, 48], long
    context: 106, 138 and 286 ms compiled)."""
    if device.type != "cpu":
        return "bf16", {"reason": device.type}

    def decide():
        timing = measure_attention(model, device, batch_size, seq_len, compiled=compiled)
        fastest = min(timing, key=timing.get)
        if timing[fastest] >= (1 - MARGIN) * timing["bf16"]:
            fastest = "bf16"
        return fastest, timing

    key = cache_key(model, device, batch_size, seq_len, compiled)
    return _cached(key + ":attention:" + "+".join(ATTENTION_KERNELS), decide)


def set_attention_kernel(model: torch.nn.Module, kernel: str | None) -> None:
    """Every attention layer of `model` runs its training path by `kernel` (MLA.kernel); "bf16"
    and None leave the fused kernel in its inputs' dtype, which under bf16 autocast is bf16 and
    leaves an fp32 forward outside autocast (evaluation, rollouts) in fp32."""
    if kernel not in (None, *ATTENTION_KERNELS):
        raise ValueError(f"attention kernel {kernel!r}: expected one of {ATTENTION_KERNELS}")
    for module in model.modules():
        if isinstance(module, MLA):
            module.kernel = None if kernel == "bf16" else kernel
