"""The speedrun on the smoke preset, end to end, as a user runs it: one command; then
again (every stage skipped); then a run killed in the middle of pretraining and
restarted, which must end with the same figures."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serve_helpers import ServerProcess

STAGES = [
    "corpus",
    "tokenizer",
    "shards",
    "pretrain",
    "long_context",
    "sft",
    "grpo",
    "sft_control",
    "vision",
    "eval",
    "export",
]
SRC = Path(__file__).resolve().parents[1] / "src"


def speedrun_cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nanoseek.cli",
        "speedrun",
        "--preset",
        "smoke",
        "--out",
        str(out),
    ]


def nanoseek_speedrun(out: Path) -> str:
    proc = subprocess.run(
        speedrun_cmd(out), capture_output=True, text=True, timeout=1200, env=_env()
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("speedrun") / "smoke"
    return path, nanoseek_speedrun(path)


def test_every_stage_finishes_and_the_report_is_sane(run):
    path, stdout = run
    report = json.loads((path / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == STAGES
    pre = stages["pretrain"]
    assert all(math.isfinite(pre[k]) for k in ("final_loss", "val_loss", "val_bpb", "mfu", "flops"))
    assert 0 < pre["mfu"] < 1 and pre["tokens"] == 80 * 8 * 128
    for stage in ("pretrain", "sft"):  # the training losses fall
        rows = [
            json.loads(line) for line in (path / stage / "metrics.jsonl").read_text().splitlines()
        ]
        losses = [r["lm_loss_avg"] for r in rows if "lm_loss_avg" in r]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], stage
    assert stages["long_context"]["context"] == 256 and stages["long_context"]["yarn_factor"] == 2.0
    grpo = stages["grpo"]
    assert (
        grpo["steps"] == 4
        and 0 <= grpo["val_accuracy_before"] <= 1
        and 0 <= grpo["val_accuracy"] <= 1
    )
    control = stages["sft_control"]  # GRPO's control: the SFT continued (smoke: a fixed 4 steps)
    assert control["steps"] == 4 and control["budget"]["matched"] == "steps"
    assert control["base"] == str(path / "sft" / "final")
    assert (path / "sft_control" / "final" / "config.json").is_file()
    vision = stages["vision"]  # the tiny vision stage: alignment, joint SFT, before/after
    assert vision["align"]["steps"] == 8 and vision["sft"]["steps"] == 12
    for r in vision["tasks"].values():
        for when in ("before", "after"):
            lo, hi = r[when]["wilson95"]
            assert r[when]["problems"] == 8 and lo <= r[when]["accuracy"] <= hi
    assert (path / "vision" / "final" / "vision.safetensors").is_file()
    assert all((path / "vision" / s["image"]).is_file() for s in vision["samples"])
    assert report["eval"].keys() == {"sft", "sft_control", "grpo"}
    for result in report["eval"].values():
        assert set(result["bpb"]) == {"en", "zh", "code"} and all(
            0 < v < 10 for v in result["bpb"].values()
        )
        arithmetic = result["tasks"]["arithmetic"]
        lo, hi = arithmetic["greedy"]["wilson95"]
        assert lo <= arithmetic["greedy"]["pass@1"] <= hi
        assert arithmetic["distinct"] == 16 and len(set(arithmetic["outcomes"])) == 16
        assert {(row["length"], row["lang"], row["trials"]) for row in result["passkey"]} == {
            (n, lang, 3) for n in (128, 512) for lang in ("en", "zh")
        }
        assert all(0 <= row["accuracy"] <= 1 for row in result["passkey"])
    # the three stages were graded on the same 16 problems: every change pairs all of them
    assert {change: set(v) for change, v in report["paired"].items()} == {
        "sft -> grpo": {"arithmetic"},
        "sft -> sft_control": {"arithmetic"},
        "sft_control -> grpo": {"arithmetic"},
    }
    assert all(v["arithmetic"]["n"] == 16 for v in report["paired"].values())
    assert report["model"]["kv_cache_reduction_vs_mha"] > 1
    assert {s["lang"] for s in report["samples"]} == {"en", "zh"}
    assert all(
        isinstance(s["reasoning"], str) and isinstance(s["answer"], str) for s in report["samples"]
    )
    md = (path / "report.md").read_text()
    for part in (
        "| pretrain |",
        "| grpo |",
        "| sft_control |",
        "| arithmetic | sft → grpo | 16 |",
        "| arithmetic | sft_control → grpo | 16 |",
        "loss.png",
        "grpo/reward_curve.png",
        "Held-out task accuracy",
        "Passkey retrieval",
        "Sample answers",
        "## Vision",
        "你好，你是谁？",
        "estimated cost $",
    ):
        assert part in md, part
    for png in ("loss.png", "expert_load.png", "grpo/reward_curve.png"):
        assert (path / png).stat().st_size > 1000
    assert (
        f"nanoseek serve {path / 'final'}" in stdout and f"nanoseek chat {path / 'final'}" in stdout
    )


def test_the_final_checkpoint_has_a_model_card(run):
    card = (run[0] / "final" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert (
        "license: mit" in front
        and "- en\n- zh" in front
        and "pipeline_tag: text-generation" in front
    )
    index = json.loads(
        next(line for line in front.splitlines() if line.startswith("model-index:"))[12:]
    )
    metrics = [m for r in index[0]["results"] for m in r["metrics"]]
    assert {"pass@1", "bits_per_byte"} <= {m["type"] for m in metrics}
    assert (
        "CC BY-SA 4.0" in body
        and "World English Bible" in body
        and "Held-out task accuracy" in body
    )


def test_the_final_checkpoint_loads_in_transformers(run):
    transformers = pytest.importorskip("transformers")

    from nanoseek import load_model

    final = run[0] / "final"
    ours = load_model(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = torch.tensor(
        [tok("In the beginning God created the heavens and the earth.")["input_ids"]]
    )
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert hf.config.rope_parameters["rope_type"] == "yarn"


def test_the_final_checkpoint_serves(run):
    openai = pytest.importorskip("openai")
    with ServerProcess(run[0] / "final") as process:
        server = process.wait_ready()
        client = openai.OpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120
        )
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id,
            max_tokens=8,
            messages=[{"role": "user", "content": "你好"}],
        )
        assert (
            reply.choices[0].finish_reason in ("stop", "length")
            and reply.usage.completion_tokens >= 1
        )


def test_running_again_skips_finished_stages(run):
    path, _ = run
    before = {s: (path / s / "done.json").read_text() for s in STAGES if s != "eval"}
    again = nanoseek_speedrun(path)
    for stage in STAGES:
        if stage != "eval":
            assert f"[{stage}] already complete" in again, stage
            assert (path / stage / "done.json").read_text() == before[stage]
    assert "[eval] /" not in again  # unchanged checkpoints are not evaluated again


def test_killed_in_pretraining_then_run_again_ends_with_the_same_figures(run, tmp_path):
    path, killed = run[0], tmp_path / "killed"
    proc = subprocess.Popen(
        speedrun_cmd(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    checkpoint = killed / "pretrain" / "checkpoints" / "step_000040" / "trainer_state.pt"
    deadline = time.monotonic() + 900
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (killed / "pretrain" / "done.json").exists(), (
        "not killed in pretraining"
    )

    nanoseek_speedrun(killed)
    a, b = (json.loads((p / "report.json").read_text()) for p in (path, killed))
    for stage, keys in {
        "pretrain": ("steps", "tokens", "final_loss", "val_loss", "val_bpb"),
        "long_context": ("final_loss", "val_bpb"),
        "sft": ("final_loss", "val_loss"),
        "grpo": ("reward", "val_accuracy_before", "val_accuracy"),
        "sft_control": ("steps", "final_loss", "val_loss"),
    }.items():
        assert {k: a["stages"][stage][k] for k in keys} == {
            k: b["stages"][stage][k] for k in keys
        }, stage
    assert a["eval"] == b["eval"]
    assert [s["completion"] for s in a["samples"]] == [s["completion"] for s in b["samples"]]
    ours, theirs = (load_file(p / "final" / "model.safetensors") for p in (path, killed))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_control_matches_grpos_training_time(run, tmp_path):
    """The cpu and gpu presets' control (steps: null) trains for GRPO's recorded time: here a copy
    of the smoke run's SFT, with a GRPO record of 2 s."""
    from nanoseek.presets import load_preset
    from nanoseek.stages.sft_control import sft_control_stage
    from nanoseek.train.dist import DistInfo

    path, copy = run[0], tmp_path / "run"
    shutil.copytree(path / "sft" / "final", copy / "sft" / "final")
    shutil.copytree(path / "corpus", copy / "corpus")
    shutil.copy(path / "sft" / "cost.json", copy / "sft" / "cost.json")
    (copy / "grpo").mkdir()
    (copy / "grpo" / "cost.json").write_text(json.dumps({"wall_s": 2.0, "steps": 4}))
    preset = load_preset("smoke", ["sft_control.steps=null", "sft_control.progress=false"])
    summary = sft_control_stage(copy, preset, DistInfo())
    sft = json.loads((path / "sft" / "cost.json").read_text())
    planned = math.ceil(2.0 / (sft["wall_s"] / sft["steps"]))
    assert summary["budget"] == {
        "max_steps": planned,
        "max_time": 2.0,
        "matched": "grpo_time",
        "grpo_train_s": 2.0,
        "sft_s_per_step": round(sft["wall_s"] / sft["steps"], 4),
    }
    # it stops at GRPO's time or at the planned steps, whichever comes first
    assert 1 <= summary["steps"] <= planned
    assert summary["stopped_by"] == ("steps" if summary["steps"] == planned else "time")
    assert (copy / "sft_control" / "final" / "config.json").is_file()
    again = sft_control_stage(copy, preset, DistInfo())  # finished: skipped, same summary
    assert again == summary
