"""One training loop for every stage.

    for step in steps:               gradient accumulation over micro-batches (DDP/FSDP sync on
                                     the last)
        loss = lm + λ·MTP + balance  fp32, or bf16 autocast where measured faster (precision.py)
        clip, optimizer step at the scheduled rate, then the routers' bias update (γ, all-reduced
            loads)
        every log_every: JSONL metrics + progress bar (loss, tokens/s, MFU)
        every eval_every: validation loss and bits per byte
        every save_every, at the end, on Ctrl-C: an atomic checkpoint that a restarted run resumes
            exactly

A checkpoint is `out_dir/checkpoints/step_NNNNNN/`: an HF model directory plus `trainer_state.pt`
(optimizer, loader position of every rank, RNG states, counters). It is written under a temporary
name and renamed when complete, so a run killed while saving resumes from the previous one. It
records the precision the run chose, which a resumed run reuses.

With `compile` the model's forward and backward are compiled by torch.compile (Inductor: its C++
backend on CPU); without a C++ compiler, or when the first step fails to compile, the run goes on
eagerly after one warning. cost.json reports the precision, the matmul peak's dtype and the compile
time.

Under torchrun the model is replicated (parallel="ddp") or sharded (parallel="fsdp": FSDP2, see
dist.py). With FSDP the trainer trains a sharded twin of the model it is given; checkpoints gather
the full weights and optimizer state to rank 0, which writes the same files as DDP, and the given
model receives the full weights there, so after `fit` rank 0 holds the trained model in it for
whoever saves it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed
from tqdm import tqdm

from nanoseek.checkpoint import load_weights_into, save_model
from nanoseek.io import atomic_dir, atomic_write_text
from nanoseek.model import IGNORE_INDEX, Transformer
from nanoseek.train import dist, precision
from nanoseek.train.flops import measure_matmul_peak, train_flops_per_token
from nanoseek.train.optim import build_optimizer, lr_multiplier
from nanoseek.train.precision import PRECISIONS

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    max_steps: int = 1000
    # seconds of training (across restarts); stops early with a checkpoint
    max_time: float | None = None
    batch_size: int = 8  # sequences per rank per micro-step
    # if set: sequences per optimizer step over all ranks (sets batch_size)
    global_batch_size: int | None = None
    grad_accum: int = 1
    seq_len: int = 256
    optimizer: str = "adamw"  # or "muon" (hidden matrices) + AdamW (the rest)
    lr: float = 3e-3
    muon_lr: float = 0.02
    router_lr_scale: float = 1.0  # the routers' rate relative to lr
    weight_decay: float = 0.1
    schedule: str = "cosine"  # or "wsd"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # λ
    bias_update_speed: float = 1e-3  # γ of the aux-loss-free balancing
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # "cuda" when available, else "cpu"
    compile: bool = False  # torch.compile forward + backward (Inductor; on CPU its C++ backend)
    precision: str = "auto"  # "fp32", "bf16" (autocast; fp32 master weights) or "auto" (measured)
    # under torchrun: "ddp" (a whole model per rank) or "fsdp" (FSDP2: sharded across ranks)
    parallel: str = "ddp"
    price_per_hour: float = 0.0  # $ per device-hour, for the cost report
    progress: bool = True

    def validate(self, world_size: int = 1) -> None:
        if self.global_batch_size is not None:
            per_step = world_size * self.grad_accum
            if self.global_batch_size % per_step:
                raise ValueError(
                    f"global_batch_size={self.global_batch_size} does not divide "
                    f"across {world_size} rank(s) x grad_accum={self.grad_accum}"
                )
            self.batch_size = self.global_batch_size // per_step
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "seq_len",
            "log_every",
            "eval_every",
            "save_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be positive")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"max_time={self.max_time}: must be positive seconds")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule={self.schedule!r}: must be 'cosine' or 'wsd'")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}: must be 'adamw' or 'muon'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {PRECISIONS}")
        if self.parallel not in dist.PARALLEL:
            raise ValueError(f"parallel={self.parallel!r}: must be one of {dist.PARALLEL}")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise ValueError(
                "optimizer='muon' does not run with parallel='fsdp': its Newton-Schulz "
                "step needs each whole matrix, and FSDP gives every rank a slice of "
                "it; use optimizer='adamw' with FSDP, or Muon with parallel='ddp'"
            )

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


class Trainer:
    """The training loop. `fit` is the one loop every trainer runs; a subclass changes what happens
    in it through the hooks below `fit`: `run_step` (one optimizer step -> its metrics), `record`
    (what is logged and evaluated after a step), `on_save` (files written beside each checkpoint),
    `before_loop` and `after_loop`."""

    progress_name = "train"  # the progress bar's label
    peak_seconds = 1.0  # how long the matmul peak (MFU's denominator) is measured
    supports_fsdp = True  # False: the subclass uses the whole model outside forward/backward
    # True: rows are as long as each batch makes them, so the attention dtype is chosen at the first
    # batch's shape (the subclass calls choose_attention) rather than at batch_size x seq_len
    rows_vary = False

    def __init__(
        self,
        model: Transformer,
        cfg: TrainConfig,
        train_loader: Iterator,
        val_batches: Callable[[], Iterable] | None = None,
        val_bytes_per_token: float | None = None,
        tokenizer=None,
        dist_info: dist.DistInfo | None = None,
    ):
        """train_loader yields (inputs [B, T], targets [B, T]) and has
        state_dict()/load_state_dict() so a restarted run continues from the same position.
        val_batches() returns a fresh pass over validation."""
        self.cfg = cfg
        self.info = dist_info or dist.DistInfo()
        cfg.validate(self.info.world_size)
        self.device = torch.device(
            cfg.resolved_device
            if self.info.world_size == 1 or cfg.resolved_device == "cpu"
            else f"cuda:{self.info.local_rank}"
        )
        # FSDP only means something across ranks; one process trains the plain model either way
        self.fsdp = cfg.parallel == "fsdp" and self.info.enabled
        if self.fsdp and not self.supports_fsdp:
            raise ValueError(
                f"{type(self).__name__} does not support parallel='fsdp' (its loop "
                "uses the whole model outside forward/backward); use parallel='ddp'"
            )
        # self.host: the model as given, plain (under FSDP it gets the full weights at each
        # checkpoint, on rank 0); self.model: what trains (the same module, or its FSDP-sharded
        # twin); self.wrapped: what runs forward
        self.host = model
        if self.fsdp:
            self.model = dist.shard_model(
                model, self.info, self.device, mixed_precision=self.device.type == "cuda"
            )
        else:
            self.model = model.to(self.device)
        self.loader = train_loader
        self.val_batches = val_batches
        self.val_bytes_per_token = val_bytes_per_token
        self.tokenizer = tokenizer
        self.out = Path(cfg.out_dir)
        self.optimizer = build_optimizer(
            self.model,
            name=cfg.optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            muon_lr=cfg.muon_lr,
            router_lr_scale=cfg.router_lr_scale,
        )
        self.eager = self.model if self.fsdp else dist.wrap_model(self.model, self.info)
        self.wrapped = self.eager
        self.compiled = cfg.compile and _compiler_available(self.device)
        if self.compiled:
            self.wrapped = torch.compile(self.eager)
        self.compile_s: float | None = None
        # the precision until `fit` decides (auto: measured there, or the resumed checkpoint's)
        self.precision = "bf16" if self.device.type == "cuda" else "fp32"
        if cfg.precision != "auto":
            self.precision = cfg.precision
        self.precision_how: dict = {"reason": "forced"} if cfg.precision != "auto" else {}
        self._resumed_precision: str | None = None
        self.autocast = precision.autocast(self.device, self.precision)
        # under bf16, how attention runs (precision.attention_kernel); None until chosen, and
        # always None in fp32
        self.attention_kernel: str | None = None
        self.attention_how: dict = {}
        self._resumed_attention: str | None = None
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.info.world_size
        self.flops_per_token = train_flops_per_token(model.config, cfg.seq_len)
        # the losses of the steps since the last log row (their mean is logged): saved with each
        # checkpoint, so a run resumed between two rows logs the figures of an uninterrupted one
        self._window_losses: list[float] = []
        self._stop_requested = False

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.info.rank)
        resumed = self.resume()
        self.choose_precision()
        peak = measure_matmul_peak(
            self.device, precision.DTYPES[self.precision], seconds=self.peak_seconds
        )
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                self.out / "train_config.json", json.dumps(asdict(cfg), indent=2) + "\n"
            )
        previous = signal.signal(signal.SIGINT, self._request_stop) if _main_thread() else None
        self.bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            unit="step",
            desc=f"{self.progress_name} {self.out.name}",
            dynamic_ncols=True,
            disable=not (cfg.progress and self.info.is_main),
        )
        metrics: dict = {}
        try:
            self.before_loop(resumed, peak)
            while (
                self.step < cfg.max_steps and not self._out_of_time() and not self._stop_requested
            ):
                started = time.perf_counter()
                metrics = self.first_step() if self.compile_s is None else self.run_step()
                self.elapsed += time.perf_counter() - started
                self.step += 1
                self.bar.update(1)
                self.record(metrics, started)
                if self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                    self.on_save()
            metrics = self.after_loop(metrics)
            self.save_checkpoint()
            self.on_save()
        finally:
            self.bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        report = self.cost_report(peak)
        if self.info.is_main:
            atomic_write_text(self.out / "cost.json", json.dumps(report, indent=2) + "\n")
        if self._stop_requested:
            raise KeyboardInterrupt(
                f"stopped at step {self.step}; run again to resume from {self.out}"
            )
        return {**metrics, **report}

    def choose_precision(self) -> None:
        """fp32 or bf16 for this run: forced by the config, recorded in the checkpoint resumed from,
        or measured (precision.choose); said once."""
        cfg = self.cfg
        if cfg.precision == "auto" and self._resumed_precision is not None:
            self.precision = self._resumed_precision
            self.precision_how = {"reason": "resumed"}
        elif cfg.precision == "auto":  # rank 0 measures; every rank trains in its choice
            self.precision, self.precision_how = dist.main_decides(
                lambda: precision.choose(
                    self.host, self.device, cfg.batch_size, cfg.seq_len, self.compiled
                ),
                self.info,
            )
        self.autocast = precision.autocast(self.device, self.precision)
        if self.info.is_main and cfg.progress:
            tqdm.write(
                f"precision: {self.precision} ({_said(self.precision_how, 'forward+backward')})"
                f"{'; compiled' if self.compiled else ''}"
            )
        if not self.rows_vary:
            self.choose_attention(cfg.batch_size, cfg.seq_len)

    def choose_attention(self, batch_size: int, seq_len: int) -> None:
        """Under bf16, how attention runs, once per run: the resumed checkpoint's choice, or
        measured at [batch_size, seq_len] as the step runs (precision.attention_kernel); said
        once."""
        if self.attention_kernel is not None:
            return
        if self.precision != "bf16":  # (a model handed on from a bf16 stage: the fused kernel)
            precision.set_attention_kernel(self.model, None)
            return
        if self._resumed_attention is not None:
            chosen = (self._resumed_attention, {"reason": "resumed"})
        else:
            chosen = dist.main_decides(
                lambda: precision.attention_kernel(
                    self.host, self.device, batch_size, seq_len, compiled=self.compiled
                ),
                self.info,
            )
        self.attention_kernel, self.attention_how = chosen
        precision.set_attention_kernel(self.model, self.attention_kernel)
        if self.info.is_main and self.cfg.progress:
            tqdm.write(
                f"attention: {self.attention_kernel} ({_said(self.attention_how, 'attention')}, "
                f"{batch_size}x{seq_len})"
            )

    def first_step(self) -> dict:
        """This process's first step. Compiled, it compiles; should that fail, the data position,
        random state, gradients and expert loads are restored and the step runs eagerly."""
        if not self.compiled:
            self.compile_s = 0.0
            return self.run_step()
        loader_state = self.loader.state_dict()
        rng = torch.get_rng_state()
        started = time.perf_counter()
        try:
            metrics = self.run_step()
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, say why once
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {str(exc)[:300]}); training eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self.loader.load_state_dict(loader_state)
            torch.set_rng_state(rng)
            self.optimizer.zero_grad(set_to_none=True)
            for moe in self.host.moe_layers():
                moe.expert_load.zero_()
            self.compiled = False
            self.wrapped = self.eager
            self.compile_s = 0.0
            return self.run_step()
        self.compile_s = round(time.perf_counter() - started, 2)  # mostly compiling
        return metrics

    # ------------------------------------------------------------------ the hooks
    def before_loop(self, resumed: bool, peak: float) -> None:
        """After the resume, before the first step: open the logging
        window (tokens/s, MFU, mean loss)."""
        self._peak = peak
        self._window_start = time.perf_counter()
        # this process's: tokens/s measures what it did since the window opened
        self._window_tokens = 0

    def run_step(self) -> dict:
        """One optimizer step -> its metrics."""
        metrics = self.train_step()
        self.tokens += self.tokens_per_step
        return metrics

    def record(self, metrics: dict, started: float) -> None:
        """After step `self.step` (begun at `started`): every log_every the
        window's figures, validation at eval_every, a metrics.jsonl row and the
        progress bar; always at the last step."""
        cfg = self.cfg
        self._window_losses.append(metrics["lm_loss"])
        self._window_tokens += self.tokens_per_step
        # a final figure, whatever stops the run
        last = self.step == cfg.max_steps or self._out_of_time()
        if self.step % cfg.log_every == 0 or last:
            dt = time.perf_counter() - self._window_start
            tps = self._window_tokens / dt
            # the step's own losses are noisy across documents: also log the window's mean
            mean_loss = sum(self._window_losses) / len(self._window_losses)
            mfu = tps * self.flops_per_token / (self._peak * self.info.world_size)
            metrics.update(
                lm_loss_avg=round(mean_loss, 5),
                tokens=self.tokens,
                tokens_per_s=round(tps, 1),
                elapsed_s=round(self.elapsed, 2),
                mfu=round(mfu, 4),
            )
            self._window_start = time.perf_counter()
            self._window_tokens = 0
            self._window_losses = []
            if self.val_batches is not None and (self.step % cfg.eval_every == 0 or last):
                metrics.update(self.evaluate())
            self.log(metrics)
            self.bar.set_postfix(
                loss=f"{metrics['lm_loss_avg']:.3f}",
                tok_s=f"{tps:.0f}",
                mfu=f"{metrics['mfu']:.2f}",
                prec=self.precision,
            )

    def on_save(self) -> None:
        """After each checkpoint: files a subclass writes beside it (none here)."""

    def after_loop(self, metrics: dict) -> dict:
        """After the last step, before the final checkpoint -> the metrics `fit` returns."""
        return metrics

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        lr_scale = self.schedule_lr()
        model.train()
        sums = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
        for micro in range(cfg.grad_accum):
            inputs, targets, extra = self.unpack(next(self.loader))
            sync = micro == cfg.grad_accum - 1 or not self.info.enabled
            if self.fsdp:  # FSDP2's no_sync: keep unsharded gradients until the last micro-batch
                self.model.set_requires_gradient_sync(sync)
            with nullcontext() if sync or self.fsdp else self.wrapped.no_sync(), self.autocast:
                out = self.wrapped(inputs, targets, cfg.mtp_weight, **extra)
                (out.loss / cfg.grad_accum).backward()
            for key in sums:
                value = getattr(out, key)
                if value is not None:
                    sums[key] += value.item() / cfg.grad_accum
        grad_norm = dist.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = model.expert_load()
        metrics = {
            "step": self.step + 1,
            "lr_scale": round(lr_scale, 5),
            "grad_norm": round(grad_norm.item(), 4),
        }
        if loads.numel():
            loads = dist.all_reduce_sum(loads, self.info)
            model.update_router_biases(cfg.bias_update_speed, loads)
            share = loads / loads.sum(1, keepdim=True).clamp_min(1)
            metrics["load_imbalance"] = round(
                (share.max(1).values * share.shape[1]).max().item(), 3
            )
            # [moe layer][expert]: fraction of tokens
            metrics["expert_load"] = share.round(decimals=4).tolist()
        if self.info.enabled:  # the logged losses are global means
            t = dist.all_reduce_sum(
                torch.tensor(list(sums.values()), dtype=torch.float64), self.info
            )
            sums = dict(zip(sums, (t / self.info.world_size).tolist()))
        metrics.update({k: round(v, 5) for k, v in sums.items()})
        return metrics

    def unpack(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """A loader's batch -> (inputs, targets, keyword arguments of the model's forward) on the
        device. (inputs, targets) here; a vision loader adds the images (train/vision.py)."""
        inputs, targets = (t.to(self.device, non_blocking=True) for t in batch)
        return inputs, targets, {}

    def schedule_lr(self) -> float:
        """Set this step's learning rate from the schedule. -> its multiplier of the base rate."""
        cfg = self.cfg
        lr_scale = lr_multiplier(
            self.step,
            warmup=cfg.warmup_steps,
            total=cfg.max_steps,
            schedule=cfg.schedule,
            min_ratio=cfg.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
        return lr_scale

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss in nats per token and, given the bytes per token of
        the validation text, bits per byte."""
        self.model.eval()
        nats, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        batches = iter(self.val_batches())
        for _ in range(self.cfg.eval_batches):
            batch = next(batches, None)
            # every forward all-gathers weights: the ranks run as many as the one with the most data
            if self.fsdp:
                if (
                    dist.all_reduce_sum(
                        torch.tensor(float(batch is not None), device=self.device), self.info
                    )
                    == 0
                ):
                    break
                if batch is None:
                    with self.autocast:
                        self.model(torch.zeros(1, 1, dtype=torch.long, device=self.device))
                    continue
            elif batch is None:
                break
            inputs, targets, extra = self.unpack(batch)
            with self.autocast:
                logits = self.model(inputs, **extra)
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1),
                targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            nats += loss.double().cpu()
            count += (targets != IGNORE_INDEX).sum().cpu()
        nats, count = dist.all_reduce_sum(nats, self.info), dist.all_reduce_sum(count, self.info)
        out = {"val_loss": round((nats / count.clamp_min(1)).item(), 5)}
        if self.val_bytes_per_token:
            out["val_bpb"] = round(out["val_loss"] / (math.log(2) * self.val_bytes_per_token), 5)
        self.model.train()
        return out

    # ------------------------------------------------------------------ bookkeeping
    def log(self, metrics: dict) -> None:
        if self.info.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    def cost_report(self, peak: float) -> dict:
        flops = self.tokens * self.flops_per_token
        device_hours = self.elapsed * self.info.world_size / 3600
        return {
            "steps": self.step,
            "tokens": self.tokens,
            "flops": flops,
            "wall_s": round(self.elapsed, 2),
            "mfu": round(flops / max(self.elapsed, 1e-9) / (peak * self.info.world_size), 4),
            "matmul_peak_flops": peak,
            "matmul_peak_dtype": self.precision,
            "precision": self.precision,
            "precision_choice": self.precision_how,
            "attention_kernel": self.attention_kernel,
            "attention_choice": self.attention_how,
            "compiled": self.compiled,
            "compile_s": self.compile_s,
            "devices": self.info.world_size,
            "device": str(self.device.type),
            "device_hours": round(device_hours, 5),
            "price_per_device_hour": self.cfg.price_per_hour,
            "estimated_cost": round(device_hours * self.cfg.price_per_hour, 4),
            "active_params": self.host.num_parameters(active=True),
            "params": self.host.num_parameters(),
        }

    def _out_of_time(self) -> bool:
        return self.cfg.max_time is not None and self.elapsed >= self.cfg.max_time

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True
        tqdm.write("stopping after this step and saving a checkpoint (Ctrl-C again to abort now)")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        """Everything a restart needs, written under a temporary name and renamed once complete."""
        loader_states = [self.loader.state_dict()]
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        # every rank's data position and RNG go into the one file rank 0 writes
        if self.info.enabled:
            gathered: list = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, (loader_states[0], rng))
            loader_states, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
        else:
            rngs = [rng]
        # gathered to rank 0; the given model receives the weights there and is saved as usual
        if self.fsdp:
            weights, optimizer_state = dist.full_state_dicts(self.model, self.optimizer)
            if self.info.is_main:
                self.host.load_state_dict(weights)
        final = self.checkpoint_dir / f"step_{self.step:06d}"
        if self.info.is_main:
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "elapsed": self.elapsed,
                "optimizer": optimizer_state if self.fsdp else self.optimizer.state_dict(),
                "loaders": loader_states,
                "rng": rngs,
                "world_size": self.info.world_size,
                "parallel": "fsdp" if self.fsdp else "ddp",
                "config": asdict(self.cfg),
                "window_losses": list(self._window_losses),
                "precision": self.precision,
                "attention_kernel": self.attention_kernel,
            }
            with atomic_dir(final) as tmp:
                self.save_weights(tmp)
                torch.save(state, tmp / STATE_FILE)
            for old in sorted(self.checkpoint_dir.glob("step_*"))[: -self.cfg.keep_checkpoints]:
                _remove_dir(old)
        dist.barrier(self.info)
        return final

    def save_weights(self, path: Path) -> None:
        """The model's files in a checkpoint directory (a vision trainer adds the tower's)."""
        save_model(self.host, path, tokenizer=self.tokenizer)

    def load_weights(self, path: Path) -> None:
        load_weights_into(self.host, path)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoint_dir.glob("step_*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in out_dir, if any, after removing what
        killed saves left behind."""
        if self.info.is_main and self.checkpoint_dir.is_dir():
            for leftover in self.checkpoint_dir.glob(".*"):  # temporaries of a save or a rotation
                _remove_dir(leftover)
            for incomplete in self.checkpoint_dir.glob("step_*"):
                if not (incomplete / STATE_FILE).is_file():
                    _remove_dir(incomplete)
        path = self.latest_checkpoint()
        if path is None:
            return False
        # weights_only: tensors and plain containers only, so a run directory
        # from elsewhere cannot run code here
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        if state["world_size"] != self.info.world_size:
            raise RuntimeError(
                f"{path} was written by {state['world_size']} ranks; resume it "
                f"with the same number (this run has {self.info.world_size})"
            )
        parallel = "fsdp" if self.fsdp else "ddp"
        if state.get("parallel", "ddp") != parallel:
            raise RuntimeError(
                f"{path} was written with parallel={state.get('parallel', 'ddp')!r}; its optimizer "
                f"state does not load into a {parallel!r} run: resume it with the same setting"
            )
        self.load_weights(path)
        if self.fsdp:  # every rank read the whole checkpoint: each keeps its shard
            dist.load_full_state_dicts(
                self.model, self.optimizer, self.host.state_dict(), state["optimizer"]
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loaders"][self.info.rank])
        rng = state["rng"][self.info.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.elapsed = state["elapsed"]
        self._window_losses = list(state.get("window_losses", []))
        self._resumed_precision = state.get("precision")
        # (its earlier name, for the two fused kernels; before any choice existed a bf16 run ran
        # the fused kernel in bf16)
        self._resumed_attention = state.get(
            "attention_kernel",
            state.get("attention_dtype", "bf16" if self._resumed_precision == "bf16" else None),
        )
        if self.info.is_main:
            _truncate_metrics(self.out / "metrics.jsonl", self.step)
            tqdm.write(f"resumed from {path} (step {self.step})")
        return True


def _remove_dir(path: Path) -> None:
    """Renamed out of sight first, then deleted: a kill during the delete leaves a hidden leftover
    that the next start removes, never a half-deleted checkpoint under its own name."""
    hidden = path.with_name(f".{path.name}.removing")
    if not path.name.startswith("."):
        os.replace(path, hidden)
        path = hidden
    shutil.rmtree(path, ignore_errors=True)


def export_checkpoint(model: Transformer, path: Path, tokenizer) -> None:
    """A trained model as an HF directory (with the tokenizer's files),
    swapped into place once complete."""
    with atomic_dir(path) as tmp:
        save_model(model, tmp, tokenizer=tokenizer)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from: they will be written again."""
    if path.is_file():
        rows = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        atomic_write_text(path, "".join(r + "\n" for r in kept))


def _said(how: dict, what: str) -> str:
    """A choice's reason and timing as the progress bar says it: "timed: forward+backward fp32 603
    ms, bf16 405 ms"."""
    timing = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in how.items() if isinstance(v, float))
    return how.get("reason", "") + (f": {what} {timing}" if timing else "")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels here: on CPU, Inductor needs a C++ compiler (CXX or
    c++/g++/clang++ on PATH). Without one: a warning, and the run stays eager."""
    if device.type != "cpu":
        return True
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    if any(shutil.which(name) for name in names):
        return True
    warnings.warn(
        "compile=True but no C++ compiler was found for torch.compile on CPU (set CXX or install "
        "g++); training eagerly",
        RuntimeWarning,
        stacklevel=3,
    )
    return False
