"""GRPO: the advantage and loss math against hand-computed values, and the loop on tiny random
models (TRL style: mechanics, not learning): a step moves exactly the parameters that must move,
dynamic sampling drops groups without signal, a stopped run resumes bit for bit, the stage and the
command write what the pipeline expects."""

import argparse
import json
import math

import pytest
import torch

from nanoseek import Transformer
from nanoseek.cli.posttrain import add_commands
from nanoseek.data.chat_tokens import prompt_ids
from nanoseek.model import IGNORE_INDEX
from nanoseek.stages.grpo import grpo_stage
from nanoseek.tasks import Reward, get_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo_loss import (
    group_advantages,
    k3_kl,
    policy_loss,
    scored_logprobs,
    token_logprobs,
    zero_variance_groups,
)
from nanoseek.train.grpo_trainer import REWARD_PLOT, GRPOConfig, GRPOTrainer
from nanoseek.train.rollout import PromptStream, TaskSpec, collate, generate_groups, task_grader
from nanoseek.train.trainer import STATE_FILE

from helpers import tiny_config


# ---------------------------------------------------------------------- the math, by hand
def test_group_advantages_match_hand_computed_values():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert group_advantages(r, 4, "group").tolist() == pytest.approx(
        [a, -a, -a, a, 0, 0, 0, 0], abs=1e-6
    )
    assert group_advantages(r, 4, "none").tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    )  # Dr. GRPO
    batch_std = math.sqrt(4 * 0.25 / 7)  # the whole batch's unbiased std
    b = 0.5 / (batch_std + 1e-4)
    assert group_advantages(r, 4, "batch").tolist() == pytest.approx(
        [b, -b, -b, b, 0, 0, 0, 0], abs=1e-6
    )
    assert zero_variance_groups(r, 4).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="scale='std'"):
        group_advantages(r, 4, "std")


def _two_sequences():
    """Sequence 0 (A = +1): ratios 1.5, 1.0, 1.1. Sequence 1 (A = -1):
    ratios 0.5, 1.25, then a masked slot."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    ratios = torch.tensor([[1.5, 1.0, 1.1], [0.5, 1.25, 7.0]])
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, torch.tensor([1.0, -1.0]), mask


def test_clipped_loss_matches_hand_computed_values_for_each_aggregation():
    logp, old, adv, mask = _two_sequences()
    # ε = 0.2: token losses -min(ρA, clip(ρ)A):
    # seq 0: -1.2 (clipped), -1.0, -1.1; seq 1: 0.8 (clipped), 1.25
    token = policy_loss(logp, old, adv, mask, aggregation="token")
    # DAPO: over all 5 tokens
    assert token.loss.item() == pytest.approx((-1.2 - 1.0 - 1.1 + 0.8 + 1.25) / 5)
    seq = policy_loss(logp, old, adv, mask, aggregation="sequence")
    assert seq.loss.item() == pytest.approx(((-1.2 - 1.0 - 1.1) / 3 + (0.8 + 1.25) / 2) / 2)  # GRPO
    const = policy_loss(logp, old, adv, mask, aggregation="constant", max_completion_tokens=4)
    assert const.loss.item() == pytest.approx((-1.2 - 1.0 - 1.1 + 0.8 + 1.25) / (2 * 4))  # Dr. GRPO
    assert token.clipped_high.tolist() == [[True, False, False], [False, False, False]]
    # 1.25 with A<0: not clipped
    assert token.clipped_low.tolist() == [[False, False, False], [True, False, False]]
    # totals of the whole batch turn a micro-batch's loss into its share of the batch loss
    part = policy_loss(logp[:1], old[:1], adv[:1], mask[:1], aggregation="token", num_tokens=5)
    assert part.loss.item() == pytest.approx((-1.2 - 1.0 - 1.1) / 5)


def test_clip_higher_lets_a_positive_advantage_grow_further():
    logp, old, adv, mask = _two_sequences()
    out = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, aggregation="token")
    # ρ=1.5 clipped at 1.28, not 1.2
    assert out.loss.item() == pytest.approx((-1.28 - 1.0 - 1.1 + 0.8 + 1.25) / 5)
    assert out.clipped_low.tolist()[1][0]  # the low side still clips at 0.8


def test_on_policy_gradient_is_minus_the_advantage_per_token():
    """μ = 1: π_old is π_θ detached, so ρ = 1, nothing clips, and
    ∂loss/∂logp = -A / tokens (REINFORCE)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = policy_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), mask, aggregation="token")
    out.loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 5] * 3 + [1 / 5, 1 / 5, 0.0])
    assert out.loss.item() == pytest.approx((-2 * 3 + 1 * 2) / 5)


def test_k3_kl_by_hand_and_in_the_loss():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])  # ref/θ = 0.5 and 2
    expected = [0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1]
    assert k3_kl(logp, ref).tolist()[0] == pytest.approx(expected)
    assert k3_kl(ref, ref).abs().max().item() == 0.0
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = policy_loss(
        logp, logp, torch.tensor([0.0]), mask, beta=0.1, ref_logp=ref, aggregation="token"
    )
    assert out.loss.item() == pytest.approx(0.1 * sum(expected) / 2)  # A = 0: only β·KL is left
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, torch.tensor([0.0]), mask, beta=0.1)


def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    logp, ent = token_logprobs(logits, torch.tensor([[1, IGNORE_INDEX]]))
    assert logp[0].tolist() == pytest.approx([math.log(0.5), 0.0])
    assert ent[0].tolist() == pytest.approx([math.log(2), 0.0])
    # at temperature 2 the policy is softmax(logits / 2): log 3 / 2 vs 0
    # gives p = √3 / (√3 + 1) to token 0
    logp, _ = token_logprobs(logits, torch.tensor([[IGNORE_INDEX, 1]]), temperature=2.0)
    assert logp[0, 1].item() == pytest.approx(math.log(1 / (math.sqrt(3) + 1)))


def test_scored_logprobs_equal_token_logprobs_of_the_full_logits():
    """The head and softmax at the scored positions only: the same log-probs, entropies and
    gradients as token_logprobs over every position's logits, at temperature 1 and 0.7."""
    model = Transformer(tiny_config())
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    targets = torch.randint(0, model.config.vocab_size, (3, 9))
    targets[:, :4] = IGNORE_INDEX  # the prompt
    targets[1, 7:] = IGNORE_INDEX  # padding
    for temperature in (1.0, 0.7):
        results = []
        for scored in (True, False):
            model.zero_grad()
            if scored:
                logp, ent = scored_logprobs(model, ids, targets, temperature)
            else:
                logp, ent = token_logprobs(model(ids), targets, temperature)
            logp.sum().backward()
            results.append((logp.detach(), ent, [p.grad.clone() for p in model.parameters()]))
        (a, ea, ga), (b, eb, gb) = results
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ea, eb)
        assert (a[targets == IGNORE_INDEX] == 0).all()
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    task = get_task("arithmetic")
    texts = [
        p.prompt + "\n" + p.solution.completion() for p in task.generate(300, seed=1, difficulty=2)
    ]
    return Tokenizer.train(texts, vocab_size=400)


def tiny_policy(tok, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        tiny_config(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            max_position_embeddings=192,
            **overrides,
        )
    )


def length_grader(problems, texts):
    """A reward that every random model earns unevenly: the completion's length in characters."""
    return [Reward(accuracy=0.0, format=0.0, total=len(t) / 40) for t in texts]


def digit_grader(problems, texts):
    """A reward a random model rarely earns and can learn: the share of digits in the completion."""
    return [
        Reward(accuracy=0.0, format=0.0, total=sum(c.isdigit() for c in t) / max(1, len(t)))
        for t in texts
    ]


def tiny_cfg(tmp_path, **overrides) -> GRPOConfig:
    fields = dict(
        out_dir=str(tmp_path),
        max_steps=2,
        prompts_per_step=3,
        group_size=4,
        max_new_tokens=6,
        seq_len=160,
        batch_size=5,
        langs=["en"],
        eval_problems=0,
        save_every=100,
        progress=False,
        lr=1e-2,
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


def test_prompts_end_in_the_think_generation_prompt_and_worked_solutions_grade_as_correct(tok):
    task = get_task("arithmetic")
    problems = task.generate(4, seed=3, difficulty=2)
    ids = prompt_ids(tok, problems[0].prompt)
    assert tok.decode(ids[-2:]) == "<think>\n"  # completions start inside the reasoning
    grade = task_grader({"arithmetic": task})
    rewards = grade(problems, [p.solution.completion(think_prefilled=True) for p in problems])
    assert all(r.correct and r.format == 1.0 for r in rewards)


def test_rollout_groups_come_from_one_request_per_prompt_and_keep_the_tags(tok):
    model = tiny_policy(tok)
    from nanoseek.engine import Engine, SamplingParams

    stream = PromptStream([TaskSpec("arithmetic")], seed=0)
    problems = stream.next(3)
    engine = Engine(model, None, max_batch_size=12, max_model_len=160)
    ro = generate_groups(
        engine,
        tok,
        problems,
        length_grader,
        SamplingParams(n=4, max_tokens=6, seed=5, stop_token_ids=[tok.eos_id]),
    )
    assert len(ro.samples) == 12 and [s.problem for s in ro.samples[:4]] == [problems[0]] * 4
    # one prefill each
    assert engine.stats()["prompt_tokens"] == sum(len(prompt_ids(tok, p.prompt)) for p in problems)
    for s in ro.samples:
        body = s.completion_ids[:-1] if s.completion_ids[-1] == tok.eos_id else s.completion_ids
        assert s.text == tok.decode(body)  # special tokens (tags) kept
    inputs, targets = collate(ro.samples, tok.pad_id)
    s = ro.samples[1]
    p = len(s.prompt_ids)
    assert inputs[1, :p].tolist() == s.prompt_ids
    assert targets[1, p - 1 : p - 1 + len(s.completion_ids)].tolist() == s.completion_ids
    assert (targets[1, : p - 1] == IGNORE_INDEX).all()
    # a fixed seed gives the same completions again
    again = generate_groups(
        Engine(model, None, max_batch_size=12, max_model_len=160),
        tok,
        problems,
        length_grader,
        SamplingParams(n=4, max_tokens=6, seed=5, stop_token_ids=[tok.eos_id]),
    )
    assert [s.completion_ids for s in again.samples] == [s.completion_ids for s in ro.samples]


def test_a_grpo_step_moves_every_parameter_that_gets_a_gradient(tok, tmp_path):
    """Every parameter changes, except the routed experts that no token was sent to: their slice of
    the stacked expert tensors gets exactly zero gradient, so (without weight decay) Adam leaves it
    bit for bit unchanged. To make both halves of that claim testable, expert 0 of every MoE layer
    is barred from selection with its balancing bias (which acts on selection only)."""
    model = tiny_policy(tok)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias[0] = -100.0
    trainer = GRPOTrainer(model, tiny_cfg(tmp_path, weight_decay=0.0), tok, grader=length_grader)
    samples, stats = trainer.rollout()
    assert stats["zero_var_frac"] < 1.0
    loads = []
    update = model.update_router_biases
    model.update_router_biases = lambda gamma, l: (loads.append(l.clone()), update(gamma, l))  # noqa: E741
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = trainer.train_step(samples)
    assert metrics["grad_norm"] > 0 and len(loads) == 1
    experts = {
        id(p): i for i, moe in enumerate(model.moe_layers()) for p in moe.experts.parameters()
    }
    for name, p in model.named_parameters():
        if id(p) not in experts:
            assert not torch.equal(p, before[name]), f"{name} did not change"
            continue
        routed = loads[0][experts[id(p)]] > 0
        assert not routed[0] and routed[1:].any()
        for e in range(p.shape[0]):
            changed = not torch.equal(p[e], before[name][e])
            assert changed == bool(routed[e]), (
                f"{name}[{e}]: routed={bool(routed[e])} but changed={changed}"
            )


def test_kl_reference_and_several_updates_per_batch(tok, tmp_path):
    model = tiny_policy(tok)
    trainer = GRPOTrainer(
        model,
        tiny_cfg(tmp_path, beta=0.05, num_iterations=2, epsilon_high=0.28),
        tok,
        grader=length_grader,
    )
    start = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    samples, _ = trainer.rollout()
    m1 = trainer.train_step(samples)
    samples, _ = trainer.rollout()
    m2 = trainer.train_step(samples)
    assert m1["kl"] >= 0 and m2["kl"] > 0  # the policy has moved away from the reference
    assert all(torch.equal(p, start[n]) for n, p in trainer.reference.named_parameters())  # frozen
    assert m2["clip_frac"] >= 0 and "entropy" in m2


def test_dynamic_sampling_drops_zero_variance_groups_and_refills(tok, tmp_path):
    # odd draws: every completion scores 0, so their groups carry no signal
    def half_constant(problems, texts):
        out = length_grader(problems, texts)
        return [
            r
            if int(p.key.split("+")[0].split("-")[0].split("*")[0]) % 2 == 0
            else Reward(0.0, 0.0, 0.0)
            for p, r in zip(problems, out)
        ]

    plain = GRPOTrainer(
        tiny_policy(tok),
        tiny_cfg(tmp_path / "plain", prompts_per_step=6),
        tok,
        grader=half_constant,
    )
    samples, stats = plain.rollout()
    # without dynamic sampling they are trained on
    assert stats["zero_var_frac"] > 0 and len(samples) == 6 * 4

    dyn = GRPOTrainer(
        tiny_policy(tok),
        tiny_cfg(
            tmp_path / "dyn", prompts_per_step=6, dynamic_sampling=True, max_sampling_rounds=6
        ),
        tok,
        grader=half_constant,
    )
    samples, stats = dyn.rollout()
    rewards = torch.tensor([s.reward.total for s in samples])
    assert not zero_variance_groups(rewards, 4).any()
    # more prompts were drawn to refill
    assert stats["sampling_rounds"] > 1 and dyn.loader.draws > 6
    assert stats["groups_trained"] == len(samples) // 4 <= 6


def _strip_times(rows):
    return [
        {k: v for k, v in r.items() if k not in ("step_s", "elapsed_s", "rollout_tok_s")}
        for r in rows
    ]


def test_a_stopped_run_resumes_bit_for_bit(tok, tmp_path):
    cfg = dict(max_steps=4, save_every=100, eval_problems=4, eval_every=2, eval_max_new_tokens=4)
    straight = GRPOTrainer(
        tiny_policy(tok), tiny_cfg(tmp_path / "a", **cfg), tok, grader=length_grader
    )
    straight.fit()

    stopped = GRPOTrainer(
        tiny_policy(tok), tiny_cfg(tmp_path / "b", **cfg), tok, grader=length_grader
    )
    step = stopped.train_step

    def stop_after_two(samples):  # as a Ctrl-C during step 2 would
        out = step(samples)
        if stopped.step == 1:
            stopped._stop_requested = True
        return out

    stopped.train_step = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    assert (tmp_path / "b" / "checkpoints" / "step_000002" / STATE_FILE).is_file()
    resumed = GRPOTrainer(
        tiny_policy(tok, seed=1), tiny_cfg(tmp_path / "b", **cfg), tok, grader=length_grader
    )
    resumed.fit()  # a differently initialised model: everything must come from the checkpoint

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        _strip_times(
            json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        )
        for d in ("a", "b")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [0, 1, 2, 3, 4]
    assert "val_accuracy" in rows[0][0] and "val_accuracy" in rows[0][-1]
    assert (tmp_path / "a" / REWARD_PLOT).stat().st_size > 1000


def test_grpo_raises_a_simple_reward(tok, tmp_path):
    """The sign and scale of the update are right: the share of digits in a random model's
    completions goes up. 20 steps: the gain is then ~0.98 whatever the seed or the CPU's kernels
    (after 12 it was 0.25-0.91)."""
    cfg = tiny_cfg(
        tmp_path,
        max_steps=20,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=8,
        lr=2e-2,
        batch_size=32,
    )
    trainer = GRPOTrainer(tiny_policy(tok), cfg, tok, grader=digit_grader)
    trainer.fit()
    rewards = [
        json.loads(line)["reward"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards


def test_bad_settings_fail_with_clear_errors(tok, tmp_path):
    for field, value, message in [
        ("group_size", 1, "at least 2"),
        ("aggregation", "mean", "aggregation='mean'"),
        ("scale_rewards", "std", "scale_rewards"),
        ("tasks", ["nope"], "unknown task"),
        ("tasks", ["arithmetic:x"], "NAME"),
        ("epsilon", 1.5, "epsilon"),
    ]:
        with pytest.raises(ValueError, match=message):
            tiny_cfg(tmp_path, **{field: value}).validate()
    trainer = GRPOTrainer(
        tiny_policy(tok), tiny_cfg(tmp_path, seq_len=20), tok, grader=length_grader
    )
    with pytest.raises(ValueError, match="no room to generate"):
        trainer.rollout()


def test_stage_and_command_write_the_final_checkpoint_and_the_reward_plot(tok, tmp_path):
    from nanoseek import load_model, save_model

    run = tmp_path / "run"
    save_model(tiny_policy(tok), run / "sft" / "final", tokenizer=tok)
    preset = tmp_path / "preset.json"
    grpo = dict(
        max_steps=2,
        prompts_per_step=2,
        group_size=3,
        max_new_tokens=4,
        seq_len=160,
        langs=["en"],
        eval_problems=2,
        progress=False,
        tasks=["arithmetic:1"],
    )
    preset.write_text(json.dumps({"model": {}, "grpo": grpo}))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["grpo", "--preset", str(preset), "--out", str(run), "--set", "grpo.max_steps=3"]
    )
    assert args.func(args) == 0
    done = json.loads((run / "grpo" / "done.json").read_text())
    assert done["steps"] == 3 and done["val_accuracy_before"] is not None and "val_accuracy" in done
    assert (run / "grpo" / REWARD_PLOT).is_file()
    load_model(run / "grpo" / "final")
    assert (
        grpo_stage(
            run, {"grpo": grpo}, __import__("nanoseek.train.dist", fromlist=["DistInfo"]).DistInfo()
        )
        == done
    )

    with pytest.raises(FileNotFoundError, match="run the SFT stage first"):
        args = parser.parse_args(
            ["grpo", "--preset", str(preset), "--out", str(tmp_path / "empty")]
        )
        args.func(args)


def test_task_specs_parse_and_ramp():
    s = TaskSpec.parse("countdown:1-3@2")
    assert (s.name, s.difficulty, s.max_difficulty, s.weight) == ("countdown", 1, 3, 2.0)
    assert [s.difficulty_at(p) for p in (0.0, 0.34, 0.67, 1.0)] == [1, 2, 3, 3]
    stream = PromptStream(
        [TaskSpec("arithmetic"), TaskSpec("countdown")], langs=["en", "zh"], seed=4
    )
    first = stream.next(6)
    stream.load_state_dict({"draws": 0})
    assert [p.id for p in stream.next(6)] == [p.id for p in first]
    assert {p.task for p in first} == {"arithmetic", "countdown"}


def test_visual_tasks_are_known_to_the_mix_but_a_text_trainer_refuses_them(tok, tmp_path):
    """The task mix names visual tasks too (their problems are the tasks/visual.py ones, graded by
    their own grader); a text policy cannot see their pictures, so GRPOTrainer says where to go
    (train.vision.VisualGRPOTrainer) instead of training on prompts without an image."""
    from nanoseek.tasks.visual import VisualTask

    spec = TaskSpec.parse("visual_count:1-2")
    assert (spec.name, spec.difficulty, spec.max_difficulty) == ("visual_count", 1, 2)
    stream = PromptStream([spec], langs=["en", "zh"], seed=0)
    assert isinstance(stream.tasks["visual_count"], VisualTask)
    problems = stream.next(4)
    assert all(p.task == "visual_count" and p.prompt.startswith("<image>\n") for p in problems)
    with pytest.raises(ValueError, match="unknown task 'visual_nope'.*visual_colour"):
        TaskSpec.parse("visual_nope")
    with pytest.raises(ValueError, match=r"\['visual_count'\] are visual.*VisualGRPOTrainer"):
        GRPOTrainer(
            tiny_policy(tok),
            tiny_cfg(tmp_path, tasks=["arithmetic:1", "visual_count:1"]),
            tok,
            grader=length_grader,
        )


def test_text_rollouts_with_prompts_given_equal_the_default_encoding(tok):
    """generate_groups(prompts=...) is how the trainer passes its encoded prompts; for text they are
    the chat template's ids without images, and the samples are the ones it always made."""
    from nanoseek.engine import Engine, SamplingParams

    model = tiny_policy(tok)
    problems = PromptStream([TaskSpec("arithmetic")], seed=2).next(2)
    params = SamplingParams(n=3, max_tokens=5, seed=9, stop_token_ids=[tok.eos_id])
    runs = [
        generate_groups(
            Engine(model, None, max_batch_size=6, max_model_len=160),
            tok,
            problems,
            length_grader,
            params,
            prompts=prompts,
        )
        for prompts in (None, [(prompt_ids(tok, p.prompt), None) for p in problems])
    ]
    a, b = (r.samples for r in runs)
    assert [s.completion_ids for s in a] == [s.completion_ids for s in b]
    assert all(s.images is None for s in a + b)
    with pytest.raises(ValueError, match="1 prompts for 2 problems"):
        generate_groups(
            Engine(model, None, max_batch_size=6, max_model_len=160),
            tok,
            problems,
            length_grader,
            params,
            prompts=[(prompt_ids(tok, problems[0].prompt), None)],
        )
