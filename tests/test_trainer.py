"""The training loop: it learns, it resumes exactly after SIGKILL, and
torchrun with 2 ranks equals 1 rank."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.train.optim import lr_multiplier
from nanoseek.train.trainer import STATE_FILE, TrainConfig, Trainer

from helpers import tiny_config
from train_script import CountingLoader

SCRIPT = str(Path(__file__).parent / "train_script.py")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def run_script(out: Path, *extra: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_lowers_the_loss_and_writes_a_cost_report(tmp_path, optimizer):
    from nanoseek import Transformer

    model = Transformer(tiny_config(num_nextn_predict_layers=1))
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=30,
        batch_size=8,
        seq_len=16,
        log_every=5,
        eval_every=15,
        save_every=100,
        warmup_steps=3,
        optimizer=optimizer,
        progress=False,
        price_per_hour=2.0,
    )
    val = lambda: [CountingLoader(8, 16, 128, seed=99).__next__() for _ in range(2)]  # noqa: E731
    result = Trainer(
        model, cfg, CountingLoader(8, 16, 128), val_batches=val, val_bytes_per_token=1.5
    ).fit()
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # nats
    assert rows[-1]["val_loss"] < rows[0]["lm_loss"] and "val_bpb" in rows[-1]
    assert all(
        k in rows[0] for k in ("mtp_loss", "balance_loss", "load_imbalance", "tokens_per_s", "mfu")
    )
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["tokens"] == 30 * 8 * 16 and cost["flops"] > 0 and 0 < cost["mfu"] < 1
    assert cost["estimated_cost"] == pytest.approx(cost["device_hours"] * 2.0, rel=1e-3, abs=1e-4)
    assert (
        result["steps"] == 30 and (tmp_path / "checkpoints" / "step_000030" / STATE_FILE).is_file()
    )


def test_a_run_stopped_by_max_time_still_reports_its_final_loss_and_validation(tmp_path):
    from nanoseek import Transformer

    cfg = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=10_000,
        max_time=0.5,
        batch_size=2,
        seq_len=16,
        log_every=1000,
        eval_every=1000,
        save_every=1000,
        progress=False,
    )
    val = lambda: [CountingLoader(2, 16, 128, seed=99).__next__()]  # noqa: E731
    result = Trainer(
        Transformer(tiny_config()),
        cfg,
        CountingLoader(2, 16, 128),
        val_batches=val,
        val_bytes_per_token=1.5,
    ).fit()
    assert 0 < result["steps"] < 10_000 and result["wall_s"] >= 0.5
    assert all(k in result for k in ("lm_loss_avg", "val_loss", "val_bpb"))
    assert metrics(tmp_path)[-1]["step"] == result["steps"]


# what may differ between a resumed run and an uninterrupted one
TIMINGS = ("tokens_per_s", "elapsed_s", "mfu")


def test_sigkill_at_a_random_step_then_restart_matches_an_uninterrupted_run(tmp_path):
    """Weights bitwise, and every logged figure but the timings, although the checkpoints (every 3
    steps) fall inside the windows whose mean loss is logged (every 4)."""
    straight = tmp_path / "straight"
    assert run_script(straight, "--log-every", "4").wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = run_script(killed, "--log-every", "4", "--step-delay", "0.3")
    kill_after = random.Random(os.getpid()).randint(4, 10)  # past the first checkpoint (step 3)
    deadline = time.time() + 300
    checkpoints = killed / "checkpoints"
    while time.time() < deadline:
        done = max((int(p.name.split("_")[1]) for p in checkpoints.glob("step_*")), default=0)
        if done + 1 >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (checkpoints / "step_000012").exists()
    assert run_script(killed, "--log-every", "4").wait(timeout=300) == 0

    a, b = final_weights(straight, 12), final_weights(killed, 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    without_timings = lambda out: [
        {k: v for k, v in r.items() if k not in TIMINGS} for r in metrics(out)
    ]  # noqa: E731
    assert without_timings(straight) == without_timings(killed)
    assert [r["step"] for r in metrics(killed)] == [4, 8, 12]


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    from nanoseek import Transformer

    cfg = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=4,
        batch_size=2,
        seq_len=8,
        save_every=2,
        log_every=1,
        warmup_steps=1,
        progress=False,
    )
    Trainer(Transformer(tiny_config()), cfg, CountingLoader(2, 8, 128)).fit()
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000004" / STATE_FILE).unlink()  # as if the kill came mid-write of the state
    (ckpts / ".step_000006.x1y2.tmp").mkdir()  # what io.atomic_dir leaves when killed
    trainer = Trainer(
        Transformer(tiny_config()),
        cfg.__class__(**{**cfg.__dict__, "max_steps": 6}),
        CountingLoader(2, 8, 128),
    )
    (ckpts / ".step_000002.removing").mkdir()  # a rotation killed mid-delete
    assert trainer.latest_checkpoint().name == "step_000002"
    assert trainer.resume() and trainer.step == 2
    # the leftovers are cleaned at start
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002"]


def test_torchrun_two_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_script(one, "--steps", "6").wait(timeout=300) == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
    ]
    out = subprocess.run(
        [*torchrun, SCRIPT, str(two), "--steps", "6"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    l1, l2 = [r["loss"] for r in metrics(one)], [r["loss"] for r in metrics(two)]
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = final_weights(one, 6), final_weights(two, 6)
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tmp_path):
    """FSDP2 over 2 gloo ranks with gradient accumulation (set_requires_gradient_sync), uneven
    validation, router biases and MTP = one process with the same global batch; a run resumed from
    its step-3 checkpoint (gathered on save, re-sharded on load) = the uninterrupted one."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--steps", "6", "--val", "--eval-every", "3"]
    assert run_script(one, *common).wait(timeout=300) == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(28500 + os.getpid() % 1000),
    ]
    fsdp = [*common, "--parallel", "fsdp", "--grad-accum", "2"]
    out = subprocess.run(
        [*torchrun, SCRIPT, str(two), *fsdp], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    m1, m2 = metrics(one), metrics(two)
    for key in ("loss", "mtp_loss", "grad_norm", "val_loss"):
        assert [r.get(key, 0) for r in m1] == pytest.approx(
            [r.get(key, 0) for r in m2], rel=1e-4, abs=1e-5
        ), key
    a, b = final_weights(one, 6), final_weights(two, 6)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=5e-5) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith("e_score_correction_bias"))
    state = torch.load(two / "checkpoints" / "step_000006" / STATE_FILE, weights_only=False)
    assert (
        state["parallel"] == "fsdp"
        and "layers.0.self_attn.q_a_proj.weight" in state["optimizer"]["state"]
    )

    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    out = subprocess.run(
        [*torchrun, SCRIPT, str(resumed), *fsdp], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert [_untimed(r) for r in metrics(resumed)] == [_untimed(r) for r in m2]
    c = final_weights(resumed, 6)
    assert all(torch.equal(b[k], c[k]) for k in b)  # bitwise


def test_fsdp_mixed_precision_sharding_runs(tmp_path):
    """The CUDA policy (bf16 blocks, fp32 routers and reduction) on gloo with CPU
    autocast: NCCL is not tested here."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(27500 + os.getpid() % 1000),
    ]
    out = subprocess.run(
        [*torchrun, str(Path(__file__).parent / "fsdp_policy_script.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_a_failing_rank_ends_the_run_instead_of_hanging_it():
    """dist.shutdown waits for every rank only on the normal path: a rank that leaves with an
    exception must not wait at a barrier that its peers, blocked in a collective, never reach."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_port", str(26500 + os.getpid() % 1000)]
    script = str(Path(__file__).parent / "dist_fail_script.py")
    out = subprocess.run([*torchrun, script], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "rank 1 fails on purpose" in out.stderr, out.stderr


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s", "mfu")}


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    assert run_script(tmp_path / "full", "--steps", "4").wait(timeout=300) == 0
    assert (
        run_script(tmp_path / "accum", "--steps", "4", "--grad-accum", "2").wait(timeout=300) == 0
    )
    l1, l2 = (
        [r["loss"] for r in metrics(tmp_path / "full")],
        [r["loss"] for r in metrics(tmp_path / "accum")],
    )
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    a, b = final_weights(tmp_path / "full", 4), final_weights(tmp_path / "accum", 4)
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_bad_training_settings_fail_before_training(tmp_path):
    from nanoseek import Transformer

    with pytest.raises(ValueError, match="batch_size=0"):
        Trainer(
            Transformer(tiny_config()),
            TrainConfig(out_dir=str(tmp_path), batch_size=0),
            CountingLoader(2, 8, 128),
        )
    with pytest.raises(ValueError, match="global_batch_size=10 does not divide across 4 rank"):
        TrainConfig(global_batch_size=10, grad_accum=1).validate(world_size=4)
    cfg = TrainConfig(global_batch_size=32, grad_accum=2)
    cfg.validate(world_size=4)
    assert cfg.batch_size == 4
    with pytest.raises(ValueError, match="schedule='linear'"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(ValueError, match="parallel='tp': must be one of"):
        TrainConfig(parallel="tp").validate()
    with pytest.raises(ValueError, match="optimizer='muon' does not run with parallel='fsdp'"):
        TrainConfig(parallel="fsdp", optimizer="muon").validate()


def test_schedules():
    assert lr_multiplier(0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_multiplier(9, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_multiplier(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, warmup=10, total=100, schedule="wsd") == 1.0
    assert lr_multiplier(90, warmup=10, total=100, schedule="wsd", min_ratio=0.0) == pytest.approx(
        0.5
    )


# ---------------------------------------------------------------- precision and compile


@pytest.fixture(autouse=True)
def _precision_cache(tmp_path, monkeypatch):
    """auto's timings are cached per test (subprocesses inherit it), never in the user's home."""
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))


def _fit(out: Path, steps: int = 30, **overrides) -> dict:
    from nanoseek import Transformer

    torch.manual_seed(0)
    fields = dict(
        out_dir=str(out),
        max_steps=steps,
        batch_size=8,
        seq_len=16,
        log_every=5,
        eval_every=1000,
        save_every=1000,
        warmup_steps=3,
        progress=False,
    )
    cfg = TrainConfig(**{**fields, **overrides})
    return Trainer(
        Transformer(tiny_config(num_nextn_predict_layers=1)), cfg, CountingLoader(8, 16, 128)
    ).fit()


def test_bf16_trains_like_fp32_and_says_so(tmp_path):
    """bf16 autocast (on any CPU: without native support it is only slower) against
    fp32, same seed, 30 steps: the final window's mean loss within 2%. cost.json
    names the precision and the peak's dtype."""
    fp32 = _fit(tmp_path / "fp32", precision="fp32")
    bf16 = _fit(tmp_path / "bf16", precision="bf16")
    assert bf16["lm_loss_avg"] == pytest.approx(fp32["lm_loss_avg"], rel=0.02)
    assert fp32["lm_loss_avg"] < 4.0  # both learned (the first window is ~4.7 nats)
    cost = json.loads((tmp_path / "bf16" / "cost.json").read_text())
    assert (
        cost["precision"] == cost["matmul_peak_dtype"] == "bf16"
        and cost["precision_choice"]["reason"] == "forced"
    )
    assert json.loads((tmp_path / "fp32" / "cost.json").read_text())["precision"] == "fp32"


def test_auto_measures_only_where_bf16_is_native_and_remembers_its_choice(monkeypatch):
    from nanoseek import Transformer
    from nanoseek.train import precision

    model = Transformer(tiny_config())
    cpu = torch.device("cpu")
    timings = []
    measure = precision.measure

    def fake_measure(*args, compiled=False, **kwargs):
        timings.append(compiled)
        return {"fp32": 0.10, "bf16": 0.08}

    monkeypatch.setattr(precision, "measure", fake_measure)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    # AVX2-only: fp32, nothing timed
    assert precision.choose(model, cpu, 8, 16)[0] == "fp32" and not timings
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.choose(model, cpu, 8, 16) == (
        "bf16",
        {"fp32": 0.1, "bf16": 0.08, "reason": "timed"},
    )
    # cached: the same choice again
    assert precision.choose(model, cpu, 8, 16)[0] == "bf16" and len(timings) == 1
    # another batch shape: timed
    assert precision.choose(model, cpu, 4, 16)[0] == "bf16" and len(timings) == 2
    # a compiled step is timed compiled, and remembered apart from the eager one
    assert precision.choose(model, cpu, 4, 16, compiled=True)[0] == "bf16"
    assert timings == [False, False, True]
    assert precision.choose(model, cpu, 4, 16, compiled=True)[1]["reason"] == "cached timing"
    monkeypatch.setattr(precision, "measure", lambda *a, **k: {"fp32": 0.10, "bf16": 0.099})
    assert precision.choose(model, cpu, 2, 16)[0] == "fp32"  # 1% faster is within the noise: fp32
    real = measure(model, cpu, 2, 8, rounds=1)
    assert set(real) == {"fp32", "bf16"} and all(v > 0 for v in real.values())


def test_auto_precision_is_recorded_and_a_resumed_run_reuses_it_bitwise(tmp_path, monkeypatch):
    """Whatever auto picks is written into the checkpoint; a resumed run takes it
    from there (it does not time again: timing could pick otherwise) and ends
    bitwise equal to an uninterrupted run."""
    from nanoseek.train import precision

    monkeypatch.setattr(precision, "choose", lambda *a: ("bf16", {"reason": "timed"}))
    straight = _fit(tmp_path / "straight", steps=6)
    assert straight["precision"] == "bf16"
    _fit(tmp_path / "resumed", steps=3, save_every=3)
    state = torch.load(
        tmp_path / "resumed" / "checkpoints" / "step_000003" / STATE_FILE, weights_only=True
    )
    assert state["precision"] == "bf16"

    def no_timing(*args):
        raise AssertionError("a resumed run must not time again")

    monkeypatch.setattr(precision, "choose", no_timing)
    resumed = _fit(tmp_path / "resumed", steps=6, save_every=3)
    assert resumed["precision"] == "bf16" and resumed["precision_choice"] == {"reason": "resumed"}
    a, b = final_weights(tmp_path / "straight", 6), final_weights(tmp_path / "resumed", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_attention_kernel_is_timed_and_remembered(monkeypatch):
    """The kernel whose model forward + backward is fastest at the stage's batch shape, if it beats
    the fused bf16 kernel by the margin; timed eagerly or compiled as the stage runs; remembered per
    model, shape and mode."""
    from nanoseek import Transformer
    from nanoseek.train import precision

    model = Transformer(tiny_config())
    cpu = torch.device("cpu")
    calls = []
    measure = precision.measure_attention

    def fake(model, device, batch_size, seq_len, rounds=3, compiled=False):
        calls.append((batch_size, seq_len, compiled))
        return {"bf16": 0.04, "fp32": 0.02, "math": 0.03}

    monkeypatch.setattr(precision, "measure_attention", fake)
    assert precision.attention_kernel(model, cpu, 4, 16) == (
        "fp32",
        {"bf16": 0.04, "fp32": 0.02, "math": 0.03, "reason": "timed"},
    )
    assert calls == [(4, 16, False)]
    assert precision.attention_kernel(model, cpu, 4, 16)[1]["reason"] == "cached timing"
    monkeypatch.setattr(
        precision, "measure_attention", lambda *a, **k: {"bf16": 0.1, "fp32": 0.099, "math": 0.12}
    )
    assert precision.attention_kernel(model, cpu, 4, 32)[0] == "bf16"  # within the noise: bf16
    monkeypatch.setattr(
        precision, "measure_attention", lambda *a, **k: {"bf16": 0.1, "fp32": 0.08, "math": 0.05}
    )
    assert precision.attention_kernel(model, cpu, 4, 16, compiled=True)[0] == "math"
    real = measure(model, cpu, 2, 8, rounds=1)
    assert set(real) == set(precision.ATTENTION_KERNELS) and all(v > 0 for v in real.values())
    assert all(m.kernel is None for m in model.modules() if hasattr(m, "kernel"))  # copies timed
    precision.set_attention_kernel(model, "math")
    assert {m.kernel for m in model.modules() if hasattr(m, "kernel")} == {"math"}
    with pytest.raises(ValueError, match="attention kernel 'flash'"):
        precision.set_attention_kernel(model, "flash")


def test_the_attention_kernel_is_recorded_and_a_resumed_run_reuses_it_bitwise(
    tmp_path, monkeypatch
):
    """A bf16 run's attention kernel is chosen once, set on every layer, written into cost.json
    and the checkpoint; a resumed run takes it from there and ends bitwise equal to an
    uninterrupted run. An fp32 run chooses nothing."""
    from nanoseek.train import precision

    monkeypatch.setattr(
        precision, "attention_kernel", lambda *a, **k: ("math", {"reason": "timed"})
    )
    straight = _fit(tmp_path / "straight", steps=6, precision="bf16")
    assert straight["attention_kernel"] == "math"
    assert straight["attention_choice"] == {"reason": "timed"}
    assert _fit(tmp_path / "fp32", steps=2, precision="fp32")["attention_kernel"] is None
    _fit(tmp_path / "resumed", steps=3, save_every=3, precision="bf16")

    def no_timing(*args, **kwargs):
        raise AssertionError("a resumed run must not time again")

    monkeypatch.setattr(precision, "attention_kernel", no_timing)
    resumed = _fit(tmp_path / "resumed", steps=6, save_every=3, precision="bf16")
    assert resumed["attention_kernel"] == "math"
    assert resumed["attention_choice"] == {"reason": "resumed"}
    a, b = final_weights(tmp_path / "straight", 6), final_weights(tmp_path / "resumed", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint written before the unfused kernel existed named its choice "attention_dtype"
    monkeypatch.setattr(precision, "attention_kernel", lambda *a, **k: ("fp32", {}))
    _fit(tmp_path / "older", steps=3, save_every=3, precision="bf16")
    state_file = tmp_path / "older" / "checkpoints" / "step_000003" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["attention_dtype"] = state.pop("attention_kernel")
    torch.save(state, state_file)
    monkeypatch.setattr(precision, "attention_kernel", no_timing)
    assert _fit(tmp_path / "older", steps=4, precision="bf16")["attention_kernel"] == "fp32"


def test_an_fp32_stage_runs_the_fused_attention_kernel_again(tmp_path):
    """A model handed on from a bf16 stage that chose another kernel (the speedrun passes one model
    from stage to stage): an fp32 stage sets its layers back to the fused kernel."""
    from nanoseek import Transformer
    from nanoseek.train import precision

    model = Transformer(tiny_config())
    precision.set_attention_kernel(model, "math")
    cfg = TrainConfig(
        out_dir=str(tmp_path),
        max_steps=1,
        batch_size=2,
        seq_len=8,
        precision="fp32",
        eval_every=1000,
        save_every=1000,
        progress=False,
    )
    assert Trainer(model, cfg, CountingLoader(2, 8, 128)).fit()["attention_kernel"] is None
    assert all(m.kernel is None for m in model.modules() if hasattr(m, "kernel"))


def test_the_expert_grouped_matmul_op_equals_grouped_mm_in_both_precisions():
    """The custom op torch.compile calls for the experts on CPU: output and both gradients those of
    F.grouped_mm up to rounding (its backward multiplies in another order: bitwise equal with this
    machine's AVX-512 kernels, not with the default ones), an expert without tokens included."""
    from nanoseek.model.moe import cpu_grouped_mm

    offsets = torch.tensor([3, 0, 5, 2]).cumsum(0).to(torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(4, 24, 16, dtype=dtype, requires_grad=True)
        grads = []
        for op in (
            lambda a, b: torch.nn.functional.grouped_mm(a, b, offs=offsets),
            lambda a, b: cpu_grouped_mm(a, b, offsets),
        ):
            out = op(x, w.mT)
            out.backward(torch.ones_like(out).cumsum(0))
            grads.append((out.detach(), x.grad, w.grad))
            x.grad = w.grad = None
        for a, b in zip(*grads):
            # the dtype's default tolerance: rounding, not another formula
            torch.testing.assert_close(a, b)


def test_compile_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    """No C++ compiler: a warning and an eager run. A compiler that fails on the first
    step: a warning, and the step reruns eagerly from the same data and random state,
    so the run equals an eager one exactly."""
    eager = _fit(tmp_path / "eager", steps=4, precision="fp32")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        missing = _fit(tmp_path / "missing", steps=4, precision="fp32", compile=True)
    assert not missing["compiled"] and missing["lm_loss"] == eager["lm_loss"]
    monkeypatch.delenv("CXX")

    def broken_compile(module):
        def run(*args, **kwargs):
            # a compiler that fails late: the forward ran (expert loads counted)
            module(*args, **kwargs)
            raise RuntimeError("C++ compile error")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr("nanoseek.train.trainer._compiler_available", lambda device: True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*C\\+\\+ compile error"):
        failed = _fit(tmp_path / "failed", steps=4, precision="fp32", compile=True)
    assert not failed["compiled"] and failed["compile_s"] == 0.0
    a, b = final_weights(tmp_path / "eager", 4), final_weights(tmp_path / "failed", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("prec, rel", [("fp32", 1e-4), ("bf16", 1e-2)])
def test_a_compiled_run_matches_eager_and_resumes_bitwise(tmp_path, prec, rel):
    """Inductor's C++ backend, forward and backward: the loss after 6 steps within `rel` of eager
    in the same precision (bf16: the compiled step rounds at other places), finite; a compiled run
    resumed at step 3 ends bitwise equal to the uninterrupted compiled one. Slow: compiling the tiny
    model took 5 minutes on a busy 2-core CPU with a cold cache."""
    eager = _fit(tmp_path / "eager", steps=6, precision=prec)
    compiled = _fit(tmp_path / "compiled", steps=6, precision=prec, compile=True)
    assert compiled["compiled"] and compiled["compile_s"] > 0
    assert compiled["lm_loss"] == pytest.approx(eager["lm_loss"], rel=rel)  # (NaN fails too)
    _fit(tmp_path / "resumed", steps=3, save_every=3, precision=prec, compile=True)
    _fit(tmp_path / "resumed", steps=6, save_every=3, precision=prec, compile=True)
    a, b = final_weights(tmp_path / "compiled", 6), final_weights(tmp_path / "resumed", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
