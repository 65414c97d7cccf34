"""R1-style reinforcement learning with verifiable rewards: the GRPO loop and its command.

    for step in steps:
        problems from the tasks' train split (a mix of tasks and languages, optionally a
            difficulty ramp)
        the Engine samples G completions per prompt (one n=G request: the prompt is prefilled
            once, shared)
        the task graders give each completion a reward; advantages are normalised within each
            group (dynamic sampling: groups whose rewards are all equal are dropped and more
            prompts are drawn)
        π_old (and π_ref when β > 0) log-probs from the training model, then μ optimizer steps on
            the clipped loss
        JSONL metrics + progress bar; held-out greedy accuracy every eval_every; reward curve PNG;
            checkpoints

GRPOTrainer is a Trainer: the loop (Trainer.fit), optimizer, learning-rate schedule, router-bias
updates, DDP wrapping, metric log and the atomic checkpoints with exact resume are the Trainer's
own; it supplies the hooks (the step, what is logged, the reward plot beside each checkpoint, a
last evaluation after the loop). What a checkpoint adds here is the prompt stream's position;
rollouts are seeded from it, so a resumed run samples exactly what the uninterrupted one did. The
objective's math is in grpo_loss.py, rollouts in rollout.py, held-out accuracy in eval/.

The same loop trains a vision-language model on the visual tasks (train/vision.py
VisualGRPOTrainer): it overrides three hooks, `encode_prompts` (render each problem's picture and
expand its `<image>`), `micro_batch` (the forward's images) and `evaluate`; the text path is the
one below, unchanged.
"""

from __future__ import annotations

import copy
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.data.chat_tokens import prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.quality import task_accuracy
from nanoseek.io import atomic_file
from nanoseek.model import IGNORE_INDEX
from nanoseek.tasks.visual import VISUAL_TASKS
from nanoseek.train import dist
from nanoseek.train.grpo_loss import (
    AGGREGATIONS,
    SCALES,
    group_advantages,
    policy_loss,
    scored_logprobs,
    zero_variance_groups,
)
from nanoseek.train.rollout import (
    Grader,
    PromptStream,
    Sample,
    TaskSpec,
    collate,
    generate_groups,
    summarize,
    task_grader,
)
from nanoseek.train.trainer import TrainConfig, Trainer

REWARD_PLOT = "reward_curve.png"


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO settings. From TrainConfig: out_dir, max_steps, max_time, optimizer, lr, schedule,
    warmup_steps, min_lr_ratio, weight_decay, grad_clip, bias_update_speed, save_every,
    keep_checkpoints, log_every, seed, device, price_per_hour, progress; batch_size is the
    micro-batch (sequences per forward/backward), seq_len the longest prompt + completion,
    eval_every the held-out evaluation interval. grad_accum and mtp_weight are not used.

    Recipes: GRPO as published: scale_rewards="group", aggregation="sequence". Dr. GRPO:
    scale_rewards="none", aggregation="constant". DAPO: aggregation="token", epsilon_high=0.28,
    dynamic_sampling=True, beta=0.
    """

    out_dir: str = "runs/grpo"
    max_steps: int = 100
    batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # a constant rate after warm-up
    weight_decay: float = 0.0  # no pull toward zero: the policy should stay near the SFT model
    log_every: int = 1
    eval_every: int = 25
    save_every: int = 25
    # what the policy practises
    tasks: list = field(default_factory=lambda: ["arithmetic:1"])  # TaskSpec strings or dicts
    langs: list = field(default_factory=lambda: ["en", "zh"])
    prompts_per_step: int = 8
    group_size: int = 8  # G
    max_new_tokens: int = 96
    temperature: float = 1.0  # rollouts sample at it, and the policy is scored at it (on-policy)
    top_k: int | None = None
    top_p: float = 1.0
    # the objective (see grpo_loss.py)
    scale_rewards: str = "group"  # "group" | "batch" | "none" (Dr. GRPO)
    aggregation: str = "token"  # "token" (DAPO) | "sequence" (GRPO) | "constant" (Dr. GRPO)
    epsilon: float = 0.2  # ε_low
    epsilon_high: float | None = None  # ε_high; DAPO's clip-higher uses 0.28
    beta: float = 0.0  # k3 KL to the frozen starting model; 0 loads no reference
    num_iterations: int = 1  # μ: optimizer steps per batch of rollouts
    # drop zero-variance groups and draw more prompts to refill the batch
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # completions cut at max_new_tokens carry no loss (DAPO's overlong filtering)
    mask_truncated: bool = False
    # held-out evaluation: greedy accuracy on the test split, per task and language
    eval_problems: int = 64
    eval_max_new_tokens: int | None = None  # default: max_new_tokens

    def validate(self, world_size: int = 1) -> None:
        super().validate(world_size)
        for name in ("prompts_per_step", "max_new_tokens", "num_iterations", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.group_size < 2:
            raise ValueError(
                f"group_size={self.group_size}: GRPO compares completions, it needs at least 2"
            )
        if self.scale_rewards not in SCALES:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}: must be one of {SCALES}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}: must be one of {AGGREGATIONS}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError(
                f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high}: "
                "need 0 < ε_low < 1, ε_high > 0"
            )
        if self.beta < 0 or self.temperature <= 0:
            raise ValueError(
                f"beta={self.beta}, temperature={self.temperature}: "
                "need beta >= 0 and temperature > 0"
            )
        if self.eval_problems < 0:
            raise ValueError(f"eval_problems={self.eval_problems}: must be >= 0")
        [TaskSpec.parse(t) for t in self.tasks]


class GRPOTrainer(Trainer):
    progress_name = "grpo"
    peak_seconds = 0.25  # rollouts dominate a GRPO step, so its MFU is a rough figure anyway
    # rollouts and frozen log-probs use the whole model outside forward/backward
    supports_fsdp = False
    rows_vary = True  # a batch's rows are as long as its longest prompt + completion
    takes_images = False  # a subclass that renders the visual tasks' pictures sets it

    def __init__(
        self,
        model,
        cfg: GRPOConfig,
        tokenizer,
        grader: Grader | None = None,
        dist_info: dist.DistInfo | None = None,
    ):
        """model: the policy, trained in place (its starting weights are also the KL
        reference when beta > 0). grader(problems, completion texts) -> Rewards;
        default: each problem's task grader."""
        info = dist_info or dist.DistInfo()
        self.specs = [TaskSpec.parse(t) for t in cfg.tasks]
        visual = [s.name for s in self.specs if s.name in VISUAL_TASKS]
        if visual and not self.takes_images:
            raise ValueError(
                f"tasks {visual} are visual: they need a vision-language model and its pictures "
                "(train.vision.VisualGRPOTrainer, or the vision stage's GRPO phase)"
            )
        stream = PromptStream(self.specs, cfg.langs, seed=cfg.seed + 7919 * info.rank)
        super().__init__(model, cfg, stream, tokenizer=tokenizer, dist_info=info)
        self.grader = grader or task_grader(stream.tasks)
        self.reference = None
        if cfg.beta > 0:  # copied before any resume: the reference is the starting policy
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.last_eval: dict = {}

    # ------------------------------------------------------------------ the Trainer's hooks
    def before_loop(self, resumed: bool, peak: float) -> None:
        """A fresh run logs the held-out accuracy of the starting policy as step 0."""
        if not resumed and self.cfg.eval_problems and self.step == 0:
            self.log({"step": 0, **self.evaluate()})

    def run_step(self) -> dict:
        """Rollouts, then μ optimizer steps on them."""
        samples, rollout_stats = self.rollout()
        return {**self.train_step(samples), **rollout_stats}

    def record(self, metrics: dict, started: float) -> None:
        """Held-out accuracy every eval_every and at the last step; a metrics.jsonl row every
        log_every and with each evaluation; the progress bar."""
        cfg = self.cfg
        metrics.update(
            step=self.step,
            step_s=round(time.perf_counter() - started, 2),
            elapsed_s=round(self.elapsed, 2),
        )
        if cfg.eval_problems and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
            metrics.update(self.evaluate())
        if self.step % cfg.log_every == 0 or "val_accuracy" in metrics:
            self.log(metrics)
        self.bar.set_postfix(
            reward=f"{metrics['reward']:.3f}",
            acc=f"{metrics['accuracy']:.2f}",
            len=f"{metrics['completion_len']:.0f}",
        )

    def on_save(self) -> None:
        self.plot()

    def after_loop(self, metrics: dict) -> dict:
        """Out of time before max_steps: a final held-out figure.
        -> the metrics with the last evaluation's."""
        if (
            self.cfg.eval_problems
            and metrics
            and not self._stop_requested
            and self.last_eval.get("step") != self.step
        ):
            self.log({"step": self.step, **self.evaluate()})
        return {**metrics, **{k: v for k, v in self.last_eval.items() if k != "step"}}

    # ------------------------------------------------------------------ rollouts
    def rollout(self) -> tuple[list[Sample], dict]:
        """A batch of prompts_per_step groups of G graded samples (fewer if
        dynamic sampling ran out of rounds)."""
        cfg, G = self.cfg, self.cfg.group_size
        engine = Engine(
            self.model,
            None,
            max_batch_size=max(G, min(256, cfg.prompts_per_step * G)),
            # fresh each step: cached prefixes hold the old weights' latents
            max_model_len=cfg.seq_len,
            decode="eager",  # the policy changes every step: no compilation
        )
        kept: list[Sample] = []
        generated: list[Sample] = []
        gen_tokens = 0
        gen_seconds = 0.0
        rounds = 0
        zero_groups = 0
        groups = 0
        while len(kept) < cfg.prompts_per_step * G and rounds < cfg.max_sampling_rounds:
            missing = cfg.prompts_per_step - len(kept) // G
            if rounds:  # oversample by the keep rate seen so far
                missing = min(
                    4 * cfg.prompts_per_step, -(-missing * groups // max(1, groups - zero_groups))
                )
            first_draw = self.loader.draws
            seed = random.Random(f"{cfg.seed}|{self.info.rank}|{first_draw}").randrange(2**62)
            problems = self.loader.next(missing, progress=self.step / cfg.max_steps)
            prompts = self.encode_prompts(problems, first_draw)
            ro = generate_groups(
                engine,
                self.tokenizer,
                problems,
                self.grader,
                self._sampling(engine, prompts, seed),
                prompts=prompts,
            )
            gen_tokens += ro.generated_tokens
            gen_seconds += ro.seconds
            rounds += 1
            generated += ro.samples
            zero = zero_variance_groups(
                torch.tensor([s.reward.total for s in ro.samples]), G
            ).tolist()
            zero_groups, groups = zero_groups + sum(zero), groups + len(zero)
            for g, is_zero in enumerate(zero):
                if not (cfg.dynamic_sampling and is_zero):
                    kept += ro.samples[g * G : (g + 1) * G]
            if not cfg.dynamic_sampling:
                break
        kept = kept[: cfg.prompts_per_step * G]
        stats = summarize(generated)
        rewards = torch.tensor([s.reward.total for s in generated]).view(-1, G)
        return kept, {
            "reward": round(rewards.mean().item(), 4),
            "reward_std": round(rewards.std(1).mean().item(), 4),
            "accuracy": round(stats["accuracy"], 4),
            "partial_accuracy": round(stats["partial_accuracy"], 4),
            "format": round(stats["format"], 4),
            "completion_len": round(stats["length"], 2),
            "truncated": round(
                sum(s.finish_reason == "length" for s in generated) / len(generated), 4
            ),
            "zero_var_frac": round(zero_groups / groups, 4),
            "groups_trained": len(kept) // G,
            "sampling_rounds": rounds,
            "rollout_tokens": gen_tokens,
            "rollout_tok_s": round(gen_tokens / max(gen_seconds, 1e-9), 1),
        }

    def encode_prompts(self, problems, first_draw: int) -> list[tuple[list[int], None]]:
        """Each problem's prompt as (token ids, images): the chat template's, no images.
        first_draw: the prompt stream's position of problems[0] (a subclass seeds renders by it)."""
        return [(prompt_ids(self.tokenizer, p.prompt), None) for p in problems]

    def micro_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor, samples: list[Sample]
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One micro-batch's rows -> (inputs, targets, keyword arguments of the model's forward),
        trimmed after the last scored column; text needs no keyword arguments."""
        x, y = trim_columns(inputs, targets)
        return x, y, {}

    def _sampling(self, engine: Engine, prompts, seed: int) -> SamplingParams:
        cfg = self.cfg
        longest = max(len(ids) for ids, _ in prompts)
        room = engine.max_model_len - longest
        if room < 1:
            raise ValueError(
                f"a prompt has {longest} tokens but the context ({engine.max_model_len} tokens: "
                "seq_len and the model's max_position_embeddings) leaves no room to generate"
            )
        return SamplingParams(
            n=cfg.group_size,
            max_tokens=min(cfg.max_new_tokens, room),
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            stop_token_ids=[self.tokenizer.eos_id],
            seed=seed,
        )

    # ------------------------------------------------------------------ the update
    def train_step(self, samples: list[Sample]) -> dict:
        """μ optimizer steps on one batch of graded groups -> metrics."""
        cfg, model = self.cfg, self.model
        lr_scale = self.schedule_lr()
        if not samples:  # every group had equal rewards: nothing to learn from this batch
            return {"lr_scale": round(lr_scale, 5), "loss": 0.0, "grad_norm": 0.0}
        rewards = torch.tensor([s.reward.total for s in samples])
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        inputs, targets = collate(samples, self.tokenizer.pad_id, cfg.mask_truncated)
        self.choose_attention(min(cfg.batch_size, len(samples)), inputs.shape[1])
        micro = [slice(i, i + cfg.batch_size) for i in range(0, len(samples), cfg.batch_size)]
        num_tokens = int((targets != IGNORE_INDEX).sum())
        old = (
            self._frozen_logprobs(model, inputs, targets, micro, samples)
            if cfg.num_iterations > 1
            else None
        )
        ref = (
            self._frozen_logprobs(self.reference, inputs, targets, micro, samples)
            if self.reference is not None
            else None
        )

        sums = dict(loss=0.0, entropy=0.0, kl=0.0, clip_low=0.0, clip_high=0.0, tokens=0)
        grad_norms = []
        model.train()
        for _ in range(cfg.num_iterations):
            for k, mb in enumerate(micro):
                x, y, extra = self.micro_batch(inputs[mb], targets[mb], samples[mb])
                x, y = x.to(self.device), y.to(self.device)
                sync = k == len(micro) - 1 or not self.info.enabled
                with nullcontext() if sync else self.wrapped.no_sync(), self.autocast:
                    logp, entropy = scored_logprobs(self.wrapped, x, y, cfg.temperature, **extra)
                    mask = y != IGNORE_INDEX
                    out = policy_loss(
                        logp,
                        old[k].to(self.device) if old is not None else logp.detach(),
                        advantages[mb].to(self.device),
                        mask,
                        eps_low=cfg.epsilon,
                        eps_high=cfg.epsilon_high,
                        beta=cfg.beta,
                        ref_logp=ref[k].to(self.device) if ref is not None else None,
                        aggregation=cfg.aggregation,
                        num_sequences=len(samples),
                        num_tokens=num_tokens,
                        max_completion_tokens=cfg.max_new_tokens,
                    )
                    out.loss.backward()
                sums["loss"] += out.loss.item() / cfg.num_iterations
                sums["entropy"] += entropy.sum().item()
                sums["clip_low"] += out.clipped_low.sum().item()
                sums["clip_high"] += out.clipped_high.sum().item()
                sums["kl"] += 0.0 if out.kl is None else out.kl.sum().item()
                sums["tokens"] += int(mask.sum())
                self.tokens += int((x != self.tokenizer.pad_id).sum())
            grad_norms.append(
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loads = model.expert_load()
            if loads.numel():
                model.update_router_biases(
                    cfg.bias_update_speed, dist.all_reduce_sum(loads, self.info)
                )
        n = max(1, sums["tokens"])
        metrics = {
            "lr_scale": round(lr_scale, 5),
            "loss": round(sums["loss"], 6),
            "grad_norm": round(sum(grad_norms) / len(grad_norms), 4),
            "entropy": round(sums["entropy"] / n, 4),
            "clip_frac": round((sums["clip_low"] + sums["clip_high"]) / n, 5),
            "clip_low": round(sums["clip_low"] / n, 5),
            "clip_high": round(sums["clip_high"] / n, 5),
            "adv_abs": round(advantages.abs().mean().item(), 4),
        }
        if ref is not None:
            metrics["kl"] = round(sums["kl"] / n, 6)
        return metrics

    @torch.no_grad()
    def _frozen_logprobs(self, model, inputs, targets, micro, samples) -> list[torch.Tensor]:
        """Per-micro-batch log-probs of the sampled tokens under a fixed model (π_old
        before the first update, or π_ref). Eval mode: the forward is the same, but it
        does not count toward the routers' load."""
        was_training = model.training
        model.eval()
        out = []
        for mb in micro:
            x, y, extra = self.micro_batch(inputs[mb], targets[mb], samples[mb])
            with self.autocast:
                out.append(
                    scored_logprobs(
                        model, x.to(self.device), y.to(self.device), self.cfg.temperature, **extra
                    )[0].cpu()
                )
        model.train(was_training)
        return out

    # ------------------------------------------------------------------ evaluation and plots
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out greedy accuracy on the test split, measured as `nanoseek eval` measures it
        (eval.quality.task_accuracy): eval_problems per task and language, at each task's highest
        difficulty. Rank 0 computes it; it is only logged. -> val_accuracy (pass@1),
        val_partial_accuracy, val_format, val_problems (those that fit the context),
        val_<task>/accuracy."""
        if not self.info.is_main:
            return {}
        cfg = self.cfg
        tasks = {s.name: [s.max_difficulty or s.difficulty] for s in self.specs}
        engine = Engine(
            self.model, None, max_batch_size=64, max_model_len=cfg.seq_len, decode="eager"
        )
        was_training = self.model.training
        self.model.eval()
        n_problems = cfg.eval_problems * len(cfg.langs)
        budget = cfg.eval_max_new_tokens or cfg.max_new_tokens
        results = task_accuracy(
            engine,
            self.tokenizer,
            tasks,
            n_problems,
            cfg.langs,
            max_new_tokens=budget,
            seed=cfg.seed,
        )
        self.model.train(was_training)
        graded = {name: r for name, r in results.items() if "greedy" in r}
        problems = sum(r["problems"] for r in graded.values())

        def overall(key: str) -> float:
            total = sum(r["greedy"][key] * r["problems"] for r in graded.values())
            return round(total / max(1, problems), 4)

        figures = {
            "val_accuracy": overall("pass@1"),
            "val_partial_accuracy": overall("accuracy"),
            "val_format": overall("format"),
            "val_problems": problems,
            **{f"val_{name}/accuracy": r["greedy"]["pass@1"] for name, r in graded.items()},
        }
        self.last_eval = {"step": self.step, **figures}
        tqdm.write(
            f"[grpo] step {self.step}: held-out accuracy {figures['val_accuracy']:.3f}, "
            f"format {figures['val_format']:.3f}"
        )
        return figures

    def plot(self) -> Path | None:
        if self.info.is_main:
            return plot_rewards(self.out / "metrics.jsonl", self.out / REWARD_PLOT)
        return None


def trim_columns(
    x: torch.Tensor, y: torch.Tensor, min_end: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns after the micro-batch's last scored token (but keep at least min_end):
    padding costs compute for nothing."""
    cols = (y != IGNORE_INDEX).any(0).nonzero()
    end = max(int(cols.max()) + 1 if len(cols) else 1, min_end)
    return x[:, :end], y[:, :end]


def plot_rewards(metrics_path: Path, png_path: Path) -> Path | None:
    """Reward, training accuracy and held-out accuracy against the
    step, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        tqdm.write("[grpo] matplotlib is not installed: no reward plot (pip install matplotlib)")
        return None
    rows = [
        json.loads(line)
        for line in Path(metrics_path).read_text("utf-8").splitlines()
        if line.strip()
    ]
    train = [r for r in rows if "reward" in r]
    val = [r for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps = [r["step"] for r in train]
        ax.plot(
            steps,
            _smooth([r["reward"] for r in train]),
            label="reward (mean of the batch, smoothed)",
        )
        ax.plot(
            steps,
            _smooth([r["accuracy"] for r in train]),
            label="train accuracy (sampled, smoothed)",
        )
        ax.plot(steps, [r["reward"] for r in train], color="C0", alpha=0.25, linewidth=0.8)
    if val:
        ax.plot(
            [r["step"] for r in val],
            [r["val_accuracy"] for r in val],
            "o-",
            color="C3",
            label="held-out accuracy (greedy)",
        )
    ax.set_xlabel("GRPO step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(Path(metrics_path).parent.name)
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out
