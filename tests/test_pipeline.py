"""The speedrun, end to end on a shrunken smoke preset, as a user runs it: one command, then again."""

import json
import math
import subprocess
import sys

import pytest

SMALL = ["--set", "data.max_bytes=400000", "--set", "data.vocab_size=1024", "--set", "pretrain.max_steps=24",
         "--set", "pretrain.eval_every=12", "--set", "pretrain.save_every=12", "--set", "pretrain.log_every=4",
         "--set", "pretrain.batch_size=4", "--set", "long_context.max_steps=4", "--set", "long_context.log_every=2",
         "--set", "long_context.eval_every=4", "--set", "long_context.save_every=4"]


def nanoseek(*args):
    out = subprocess.run([sys.executable, "-m", "nanoseek.cli", *args], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("speedrun") / "smoke"
    first = nanoseek("speedrun", "--preset", "smoke", "--out", str(path), *SMALL)
    return path, first


def test_every_stage_finishes_and_the_report_is_sane(run):
    path, stdout = run
    report = json.loads((path / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["corpus", "tokenizer", "shards", "pretrain", "long_context"]
    pre = stages["pretrain"]
    assert all(math.isfinite(pre[k]) for k in ("final_loss", "val_loss", "val_bpb", "mfu", "flops"))
    assert 0 < pre["mfu"] < 1 and pre["tokens"] == 24 * 4 * 128
    rows = [json.loads(line) for line in (path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lm_loss_avg"] < rows[0]["lm_loss_avg"]  # the loss falls
    assert stages["long_context"]["context"] == 256 and stages["long_context"]["yarn_factor"] == 2.0
    assert report["model"]["kv_cache_reduction_vs_mha"] > 1
    md = (path / "report.md").read_text()
    assert "| pretrain |" in md and "loss.png" in md and (path / "loss.png").stat().st_size > 1000
    assert (path / "expert_load.png").is_file()
    assert "report card:" in stdout


def test_the_final_checkpoint_loads_in_transformers(run):
    transformers = pytest.importorskip("transformers")
    import torch

    from nanoseek import load_model

    final = run[0] / "long_context" / "final"
    ours = load_model(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("In the beginning God created the heavens and the earth.")["input_ids"]])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert hf.config.rope_parameters["rope_type"] == "yarn"


def test_running_again_skips_finished_stages(run):
    path, _ = run
    before = (path / "pretrain" / "done.json").read_text()
    again = nanoseek("speedrun", "--preset", "smoke", "--out", str(path), *SMALL)
    for stage in ("corpus", "tokenizer", "shards", "pretrain", "long_context"):
        assert f"[{stage}] already complete" in again
    assert (path / "pretrain" / "done.json").read_text() == before
