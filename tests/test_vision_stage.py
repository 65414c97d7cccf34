"""The vision stage on a tiny language checkpoint: adaptor alignment (encoder and language model
frozen), joint SFT through the project's Trainer, then GRPO on the visual tasks; held-out accuracy
before, after SFT and after GRPO on the same problems through the engine, with Wilson intervals and
the paired interval of GRPO's change; what vision costs the language model on text (bits per byte,
text-task accuracy); done.json and resume; the report card's section. Plus the image-conversation
loader, and GRPO on a visual task in isolation: the rollouts carry each prompt's picture into the
update, and the grader's reward reaches the loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import Transformer
from nanoseek.checkpoint import load_model, load_vision_language_model
from nanoseek.config import VisionConfig
from nanoseek.data.chat_tokens import tokenize_conversation
from nanoseek.data.conversations import task_conversations
from nanoseek.data.images import image_id_of, image_prompt_ids
from nanoseek.eval.bpb import bits_per_byte, heldout_texts
from nanoseek.eval.stats import paired_difference
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.model.vision import VisionLanguageModel, VisionTower, image_token_count
from nanoseek.stages.common import DONE
from nanoseek.stages.vision import MANIFEST, OUTCOMES, data_manifest, vision_stage
from nanoseek.tasks.visual import COLOURS, get_visual_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.dist import DistInfo
from nanoseek.train.grpo_loss import token_logprobs
from nanoseek.train.grpo_trainer import GRPOConfig
from nanoseek.train.rollout import Sample, collate
from nanoseek.train.vision import (
    ImageConversationLoader,
    VisualGRPOTrainer,
    text_examples,
    visual_examples,
    visual_problems,
)

from helpers import TINY_VISION, save_tiny, small_tokenizer, tiny_config

TOWER = {**TINY_VISION, "max_tiles": 1}
SECTION = {
    "vision": TOWER,
    "tasks": {"visual_colour": [1]},
    "problems_per_task": 40,
    "renders": 2,
    "size": [32, 32],
    "eval_problems": 6,
    "max_new_tokens": 16,
    "samples": 2,
    "align": {"max_steps": 6, "batch_size": 8, "lr": 0.003, "save_every": 3, "progress": False},
    "sft": {
        "max_steps": 10,
        "batch_size": 8,
        "lr": 0.003,
        "save_every": 5,
        "log_every": 1,
        "progress": False,
    },
    "grpo": {
        "max_steps": 3,
        "prompts_per_step": 3,
        "group_size": 4,
        "batch_size": 12,
        "lr": 0.003,
        "save_every": 2,
        "progress": False,
    },
    # joint SFT's text-only conversations: a quarter of each epoch, from the text SFT's own mix
    "text_share": 0.25,
    "text_mix": {
        "tasks": {"arithmetic": [1]},
        "problems_per_task": 12,
        "identity": 4,
        "corpus_qa": 0,
        "tool_use": 0.0,
    },
    "text_eval": {
        "bpb_bytes": 2000,
        "tasks": {"arithmetic": [1]},
        "n_problems": 6,
        "max_new_tokens": 16,
    },
}
# a run's held-out text (runs/NAME/corpus/val.jsonl), one short document per language
HELD_OUT_TEXT = [
    {"lang": "en", "text": "A small boat crossed the river at dawn, and the birds woke up. " * 4},
    {"lang": "zh", "text": "清晨的小船慢慢划过河面，岸边的鸟儿都醒了。" * 4},
    {"lang": "code", "text": "def area(w, h):\n    return w * h\n\nprint(area(3, 4))\n" * 4},
]


def test_loader_targets_only_answers_and_resumes():
    tok = small_tokenizer()
    vcfg = VisionConfig(**TOWER)
    image_id = tok.special_ids["image"]
    examples = visual_examples(tok, vcfg, visual_problems({"visual_colour": [1]}, 6), renders=1)
    loader = ImageConversationLoader(examples, 4, 512, tok.pad_id, seed=3)
    x, y, images = next(loader)
    assert x.shape == y.shape and x.shape[0] == 4 and len(images.grids) == 4
    assert int((x == image_id).sum()) == 4 * image_token_count(vcfg, (1, 1))
    assert not ((y == image_id) & (y != IGNORE_INDEX)).any()
    assert "</answer>" in tok.decode([t for t in y[0].tolist() if t != IGNORE_INDEX])
    state = loader.state_dict()
    a = next(loader)
    loader.load_state_dict(state)
    b = next(loader)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2].pixel_values, b[2].pixel_values)


def _mixed_loader(tok, share: float, batch_size: int = 4, seed: int = 3, n_images: int = 12):
    vcfg = VisionConfig(**TOWER)
    images = visual_examples(
        tok, vcfg, visual_problems({"visual_colour": [1]}, n_images), renders=1
    )
    convs = task_conversations({"arithmetic": [1]}, 10, seed=0)
    text = text_examples(tok, convs)
    loader = ImageConversationLoader(
        images,
        batch_size,
        512,
        tok.pad_id,
        seed=seed,
        text_examples=text,
        text_share=share,
    )
    return loader, images, text, convs


def test_a_text_row_carries_no_image_and_targets_the_assistant_tokens():
    """Joint SFT's text-only conversations: a text row in a mixed batch has no <image> position
    and no image in the batch's ImageInput; its targets are exactly the assistant's tokens of the
    conversation; the vision model's logits on it are the language model's alone. A batch of text
    rows only has no images at all."""
    tok = small_tokenizer()
    image_id = tok.special_ids["image"]
    loader, images, text, convs = _mixed_loader(tok, 0.5)
    by_ids = {tuple(ids): c for (ids, _, _), c in zip(text, convs)}
    seen_text = 0
    vlm = tiny_vlm(tok)
    vlm.eval()
    for _ in range(loader.epoch_size // loader.batch_size):
        x, y, batch_images = next(loader)
        is_image = (x == image_id).any(1)
        n_image = int(is_image.sum())
        assert len(batch_images.grids if batch_images else []) == n_image
        for r in range(x.shape[0]):
            if is_image[r]:
                continue
            seen_text += 1
            ids = [t for t in x[r].tolist()]
            key = next(k for k in by_ids if list(k[:-1]) == ids[: len(k) - 1])
            want_ids, want_mask = tokenize_conversation(tok, by_ids[key])
            assert list(key) == want_ids
            want = [t if m else IGNORE_INDEX for t, m in zip(want_ids[1:], want_mask[1:])]
            got = y[r, : len(want)].tolist()
            assert got == want and (y[r, len(want) :] == IGNORE_INDEX).all()
            answer = tok.decode([t for t in got if t != IGNORE_INDEX])
            assert by_ids[key][-1]["content"] in answer and "<image>" not in answer
        with torch.no_grad():
            logits = vlm(x, images=batch_images)
            lm_logits = vlm.language_model(x[~is_image])
        torch.testing.assert_close(logits[~is_image], lm_logits, atol=1e-5, rtol=1e-5)
    assert seen_text == loader.text_per_epoch == len(images)
    only_text = ImageConversationLoader(
        images[:1], 2, 512, tok.pad_id, text_examples=text, text_share=0.9
    )
    batches = [next(only_text) for _ in range(only_text.epoch_size // 2)]
    assert any(b[2] is None for b in batches)
    x, y, none = next(b for b in batches if b[2] is None)
    assert not (x == image_id).any()
    loss = vlm.compute_loss(x, y, 0.0, images=none).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5])
def test_the_text_share_is_honoured_over_each_epoch(share):
    """Every epoch holds every image conversation once and round(share / (1 - share) * images)
    text ones; the next epoch takes the text pool's next conversations (wrapping round)."""
    tok = small_tokenizer()
    image_id = tok.special_ids["image"]
    loader, images, text, _ = _mixed_loader(tok, share, batch_size=5, n_images=12)
    want_text = round(share / (1 - share) * 12)
    assert loader.text_per_epoch == want_text and loader.epoch_size == 12 + want_text
    pool_seen = []
    for epoch in range(3):
        rows = []
        while len(rows) < loader.epoch_size:
            x, _, batch_images = next(loader)
            assert loader.epoch == epoch
            rows += [tuple(r.tolist()) for r in x]
            assert len(batch_images.grids if batch_images else []) == int(
                (x == image_id).any(1).sum()
            )
        n_image = sum(image_id in r for r in rows)
        assert n_image == 12 and len(rows) - n_image == want_text
        image_targets, text_targets = loader.target_tokens(epoch)
        assert image_targets == sum(sum(m[1:]) for _, m, _ in images)
        assert (text_targets > 0) == (want_text > 0)
        assert abs((len(rows) - n_image) / len(rows) - share) <= 0.5 / len(rows)
        epoch_rows = loader.epoch_examples(epoch)
        assert sorted(id(e) for e in epoch_rows if e[2] is not None) == sorted(
            id(e) for e in images
        )
        pool_seen += [e for e in epoch_rows if e[2] is None]
    if want_text:  # three epochs walk through the pool in turn: no repeat before it is used up
        distinct = len({id(e) for e in pool_seen})
        assert distinct == min(len(text), len(pool_seen))
    with pytest.raises(ValueError, match="text_share"):
        ImageConversationLoader(images, 4, 512, tok.pad_id, text_examples=text, text_share=1.0)
    with pytest.raises(ValueError, match="no text conversation fits"):
        ImageConversationLoader(images, 4, 512, tok.pad_id, text_share=0.3)


def test_the_mixed_loader_resumes_exactly():
    """Stopped mid-epoch (and across an epoch boundary, where the text window moves on), a fresh
    loader given the state yields exactly the batches the uninterrupted one does."""
    tok = small_tokenizer()
    loader, images, text, _ = _mixed_loader(tok, 0.3, batch_size=4)
    reference = [next(loader) for _ in range(12)]
    for stop in (3, 5, 9):
        first, _, _, _ = _mixed_loader(tok, 0.3, batch_size=4)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))
        resumed, _, _, _ = _mixed_loader(tok, 0.3, batch_size=4)
        resumed.load_state_dict(state)
        for want in reference[stop:]:
            got = next(resumed)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert (got[2] is None) == (want[2] is None)
            if want[2] is not None:
                assert torch.equal(got[2].pixel_values, want[2].pixel_values)
                assert got[2].grids == want[2].grids


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    base = save_tiny(root / "lm")
    run = root / "run"
    (run / "corpus").mkdir(parents=True)
    (run / "corpus" / "val.jsonl").write_text(
        "".join(
            json.dumps({**r, "source": "test"}, ensure_ascii=False) + "\n" for r in HELD_OUT_TEXT
        )
    )
    summary = vision_stage(run, {"vision": SECTION}, DistInfo(), init=base)
    return run, base, summary


def test_vision_stage_aligns_then_fine_tunes_and_evaluates(stage):
    run, base, summary = stage
    out = run / "vision"
    assert json.loads((out / DONE).read_text())["checkpoint"] == str(out / "final")
    assert summary["align"]["steps"] == 6 and summary["sft"]["steps"] == 10
    assert summary["grpo"]["steps"] == 3
    # 80 image conversations (40 problems x 2 renders) and 80 / 3 text ones per epoch, from a
    # pool of the 12 arithmetic problems and 4 identity conversations that text_mix asks for (those
    # longer than the phase's seq_len are left out)
    mix = dict(summary["text_mix"])
    assert 0.25 < mix.pop("text_target_share") < 1  # a text answer is longer than a colour's
    assert mix.pop("text_pool") + mix.pop("text_dropped_too_long") == 16
    assert summary["text_mix"]["text_pool"] > 0
    assert mix == {"share": 0.25, "image_per_epoch": 80, "text_per_epoch": 27}
    # (a) alignment left the language model and the encoder as they were
    lm0 = load_file(str(base / "model.safetensors"))
    align = out / "align" / "checkpoints" / "step_000006"
    lm1 = load_file(str(align / "model.safetensors"))
    assert all(torch.equal(lm0[k], lm1[k]) for k in lm0)
    tower = load_file(str(align / "vision.safetensors"))
    final_tower = load_file(str(out / "final" / "vision.safetensors"))
    enc = [k for k in tower if k.startswith("vision_model.")]
    assert enc and all(torch.equal(tower[k], final_tower[k]) for k in enc)  # encoder frozen
    assert not torch.equal(
        tower["projector.layers.0.weight"], final_tower["projector.layers.0.weight"]
    )
    # (b) joint SFT moved the language model and its loss fell
    lm2 = load_file(str(out / "sft" / "checkpoints" / "step_000010" / "model.safetensors"))
    assert any(not torch.equal(lm0[k], lm2[k]) for k in lm0)
    rows = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10 and sum(losses[-3:]) < 0.9 * sum(losses[:3])
    # before, after SFT, after GRPO: held-out accuracy with a Wilson interval, chance stated
    for r in summary["tasks"].values():
        assert r.keys() == {"before", "sft", "after", "grpo_change"}
        for when in ("before", "sft", "after"):
            e = r[when]
            lo, hi = e["wilson95"]
            assert (
                e["problems"] == 6
                and lo <= e["accuracy"] <= hi
                and e["chance"] == pytest.approx(1 / 6, abs=1e-4)
            )
    assert len(summary["samples"]) == 2
    assert all((out / s["image"]).is_file() for s in summary["samples"])
    vlm = load_vision_language_model(out / "final")
    assert vlm.vision.config.image_size == 32
    # the data manifest: the tasks' photo shares (difficulty 1: none), so no photo source
    manifest = json.loads((out / MANIFEST).read_text("utf-8"))
    assert summary["manifest"] == str(out / MANIFEST) and summary["photos"] == []
    assert manifest == json.loads(json.dumps(data_manifest({"visual_colour": [1]})))
    assert manifest["tasks"] == {"visual_colour": {"difficulties": [1], "photo_share": {"1": 0.0}}}


def test_the_grpo_phase_follows_sft_and_is_scored_on_the_same_problems(stage):
    run, _, summary = stage
    out = run / "vision"
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert summary["grpo"]["reward"] == rows[-1]["reward"]
    # the final model is GRPO's last checkpoint, language model and tower
    last = out / "grpo" / "checkpoints" / "step_000003"
    for name in ("model.safetensors", "vision.safetensors"):
        a = load_file(str(last / name))
        b = load_file(str(out / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one row per held-out problem, the same problems (keys, order) at every point
    outcomes = [json.loads(x) for x in (out / OUTCOMES).read_text("utf-8").splitlines()]
    visual = [r for r in outcomes if r["kind"] == "visual"]
    held_out = visual_problems({"visual_colour": [1]}, 6, split="test", seed=1)
    assert [(r["key"], r["lang"]) for r in visual] == [(p.key, p.lang) for p in held_out]
    r = summary["tasks"]["visual_colour"]
    for when, point in (("before", "before"), ("sft", "sft"), ("grpo", "after")):
        assert sum(row[when] for row in visual) == r[point]["correct"]
    # GRPO's change: the paired interval of exactly these outcomes
    d = paired_difference([row["sft"] for row in visual], [row["grpo"] for row in visual])
    change = r["grpo_change"]
    assert change["gain"] == pytest.approx(d["gain"], abs=1e-4)
    assert change["interval95"] == pytest.approx(list(d["interval95"]), abs=1e-4)
    lo, hi = change["interval95"]
    assert lo <= change["gain"] <= hi and (change["gained"], change["lost"]) == (
        d["gained"],
        d["lost"],
    )
    assert (out / "grpo" / "reward_curve.png").stat().st_size > 1000


def test_what_vision_costs_text_is_measured_on_both_language_models(stage):
    """Bits per byte of the starting checkpoint and of the final model's language part, exactly as
    eval/bpb.py measures each on the run's held-out text; text-task outcomes before and after."""
    run, base, summary = stage
    t = summary["text"]
    texts = heldout_texts(run / "corpus", 2000)
    assert set(texts) == {"en", "zh", "code"} and t["bpb_source"] == str(run / "corpus")
    tok = load_tokenizer(base)
    sft_end = run / "vision" / "sft" / "checkpoints" / "step_000010"
    checkpoints = (
        ("bpb_before", base),
        ("bpb_sft", sft_end),
        ("bpb_after", run / "vision" / "final"),
    )
    for key, ckpt in checkpoints:
        lm = load_model(ckpt, dtype=torch.float32)
        want = {lang: bits_per_byte(lm, tok, x)["bpb"] for lang, x in texts.items()}
        assert t[key] == pytest.approx(want, abs=2e-4)
    assert t["bpb_before"] != t["bpb_after"]  # joint SFT trained the language model
    assert t["bpb_sft"] != t["bpb_after"]  # and GRPO after it
    a = t["tasks"]["arithmetic"]
    outcomes = [json.loads(x) for x in (run / "vision" / OUTCOMES).read_text().splitlines()]
    text = [r for r in outcomes if r["kind"] == "text"]
    assert a["before"]["problems"] == a["after"]["problems"] == len(text) == 6
    assert {r["lang"] for r in text} == {"en", "zh"}
    assert sum(r["before"] for r in text) == a["before"]["correct"]
    assert sum(r["after"] for r in text) == a["after"]["correct"]
    lo, hi = a["change"]["interval95"]
    assert lo <= a["change"]["gain"] <= hi


def test_vision_stage_runs_once(stage):
    run, base, summary = stage
    again = vision_stage(run, {"vision": SECTION}, DistInfo(), init=base)
    assert again == json.loads((run / "vision" / DONE).read_text())


def test_the_report_card_shows_the_visual_tasks_and_samples(stage):
    from nanoseek.reporting.report_card import write_report

    run, _, summary = stage
    text = write_report(run).read_text("utf-8")
    assert "## Vision" in text and "| visual_colour | 6 (" in text
    assert "| after SFT | after GRPO | GRPO − SFT [95% paired] |" in text
    r = summary["tasks"]["visual_colour"]
    row = next(x for x in text.splitlines() if x.startswith("| visual_colour |"))
    for when in ("before", "sft", "after"):
        lo, hi = r[when]["wilson95"]
        assert f"{100 * r[when]['accuracy']:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%]" in row
    lo, hi = r["grpo_change"]["interval95"]
    assert f"{100 * r['grpo_change']['gain']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]" in row
    assert "](vision/grpo/reward_curve.png)" in text
    # what vision costs text
    assert "### What vision costs text" in text
    t = summary["text"]
    for when, label in (("bpb_before", "before vision"), ("bpb_after", "after vision")):
        cells = " | ".join(f"{t[when][x]:.3f}" for x in ("en", "zh", "code"))
        assert f"| {label} | {cells} |" in text
    cells = " | ".join(f"{t['bpb_sft'][x]:.3f}" for x in ("en", "zh", "code"))
    assert f"| after joint SFT | {cells} |" in text
    assert "Joint SFT trained with a text share of 25.0%" in text
    assert "| arithmetic | 6 |" in text
    for s in summary["samples"]:
        assert f"](vision/{s['image']})" in text and (run / "vision" / s["image"]).is_file()


def _vision_summary(grpo: bool, share: float) -> dict:
    """A vision stage summary as stages/vision.py writes it (the fields the report card reads)."""
    figures = {"problems": 200, "distinct_keys": 200, "chance": 1 / 6}
    text_mix = {
        "share": share,
        "text_target_share": 0.4123 if share else 0.0,
        "image_per_epoch": 600,
        "text_per_epoch": round(share / (1 - share) * 600),
        "text_pool": 450 if share else 0,
        "text_dropped_too_long": 3 if share else 0,
    }
    text = {
        "bpb_before": {"en": 1.5, "zh": 2.25, "code": 1.125},
        "bpb_after": {"en": 1.625, "zh": 2.5, "code": 1.25},
        "bpb_source": "runs/x/corpus",
        "bpb_bytes": 20000,
        "tasks": {},
    }
    if grpo:
        text["bpb_sft"] = {"en": 1.5625, "zh": 2.375, "code": 1.1875}
    task = {
        "before": {**figures, "accuracy": 0.1, "wilson95": [0.07, 0.15]},
        "after": {**figures, "accuracy": 0.6, "wilson95": [0.53, 0.67]},
    }
    return {
        "init": "runs/x/grpo/final",
        "checkpoint": "runs/x/vision/final",
        "train_encoder": True,
        "text_mix": text_mix,
        "tasks": {"visual_count": task},
        "text": text,
        "samples": [],
        **({"grpo": {"steps": 4, "reward_first": 0.2, "reward": 0.5}} if grpo else {}),
    }


@pytest.mark.parametrize("grpo", [True, False])
def test_the_report_cards_text_cost_rows_from_a_summary(grpo):
    """The report card's "What vision costs text": bits per byte before vision, after joint SFT
    (only where a GRPO phase followed it, so that the after-SFT point differs from the final
    one), after vision, in that order; and a sentence naming joint SFT's text share."""
    from nanoseek.reporting.report_card import vision_section

    lines = vision_section(_vision_summary(grpo, share=0.3))
    start = lines.index("| bits per byte (lower is better) | en | zh | code |")
    rows = [x for x in lines[start + 2 :] if x.startswith("| ")][: 4 if grpo else 3]
    want = ["| before vision | 1.500 | 2.250 | 1.125 |"]
    if grpo:
        want.append("| after joint SFT | 1.562 | 2.375 | 1.188 |")
    want += [
        "| after vision | 1.625 | 2.500 | 1.250 |",
        "| change | +0.125 | +0.250 | +0.125 |",
    ]
    assert rows == want
    share = next(x for x in lines if x.startswith("Joint SFT trained"))
    assert share == (
        "Joint SFT trained with a text share of 30.0%: 257 text-only conversations (from the "
        "text SFT's own mix, a pool of 450) beside 600 image conversations per epoch, 41.2% of "
        "the trained answer tokens."
    )
    assert lines.index(share) < start  # the share comes before the table it explains
    images_only = vision_section(_vision_summary(grpo, share=0.0))
    assert "Joint SFT trained on image conversations only (text share 0%)." in images_only
    # a summary without the text mix (a run from before it was recorded): no sentence, no error
    older = _vision_summary(grpo, share=0.0)
    del older["text_mix"]
    assert not any(x.startswith("Joint SFT trained") for x in vision_section(older))


def test_held_out_problems_have_distinct_keys_in_both_languages():
    probs = visual_problems({"visual_count": [2]}, 200, split="test", seed=1)
    assert len({p.key for p in probs}) == 200
    assert {p.lang for p in probs} == {"en", "zh"}


def test_an_unfinished_stage_resumes_from_its_checkpoints(stage, tmp_path):
    """Without done.json (a kill after training) the stage runs again: both phases resume at their
    last checkpoint (no step is trained twice) and the final weights are the same."""
    import shutil

    run, base, summary = stage
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "vision" / DONE).unlink()
    shutil.rmtree(copy / "vision" / "final")
    again = vision_stage(copy, {"vision": SECTION}, DistInfo(), init=base)
    assert again["align"]["steps"] == 6 and again["sft"]["steps"] == 10
    assert again["grpo"]["steps"] == 3
    a = load_file(str(run / "vision" / "final" / "model.safetensors"))
    b = load_file(str(copy / "vision" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["tasks"] == summary["tasks"]
    assert {**again["text"], "bpb_source": None} == {**summary["text"], "bpb_source": None}
    assert again["text"]["bpb_source"] == str(copy / "corpus")


def test_nanoseek_vision_command(stage, tmp_path, capsys):
    from nanoseek.cli import main

    _, base, _ = stage
    preset = tmp_path / "tiny-vision.json"
    preset.write_text(json.dumps({"description": "test", "price_per_hour": 0.1, "vision": SECTION}))
    run = tmp_path / "run"
    assert main(["vision", str(run), "--preset", str(preset), "--init", str(base)]) == 0
    out = capsys.readouterr().out
    assert "[vision] done in" in out
    assert json.loads(out[out.index("\n{") + 1 :])["sft"]["steps"] == 10
    assert (run / "vision" / DONE).is_file()
    assert main(["vision", str(tmp_path / "nothing"), "--preset", str(preset)]) == 2  # no sft/final


# ----------------------------------------------------------------------- GRPO on a visual task
def tiny_vlm(tok, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    lm = Transformer(
        tiny_config(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            max_position_embeddings=256,
        )
    )
    tower = VisionTower(VisionConfig(**TOWER), lm.config.hidden_size)
    return VisionLanguageModel(lm, tower, image_id_of(tok))


def visual_cfg(tmp_path, **overrides) -> GRPOConfig:
    fields = dict(
        out_dir=str(tmp_path),
        tasks=["visual_colour:1"],
        max_steps=2,
        prompts_per_step=3,
        group_size=4,
        max_new_tokens=8,
        seq_len=256,
        batch_size=5,
        eval_problems=0,
        save_every=100,
        progress=False,
        lr=1e-3,
        weight_decay=0.0,
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


def test_visual_rollouts_carry_each_prompts_picture_into_the_update(tmp_path):
    tok = small_tokenizer()
    vlm = tiny_vlm(tok)
    trainer = VisualGRPOTrainer(vlm, visual_cfg(tmp_path), tok, size=(32, 32))
    samples, stats = trainer.rollout()
    assert len(samples) == 12 and stats["rollout_tokens"] > 0
    image_id = image_id_of(tok)
    n_image = image_token_count(vlm.vision.config, (1, 1))
    for g in range(3):
        group = samples[4 * g : 4 * g + 4]
        assert all(s.images is group[0].images for s in group)  # one picture per prompt
        assert group[0].prompt_ids.count(image_id) == n_image
    # each draw is rendered afresh (another scene, or the same scene drawn differently)
    assert not torch.equal(samples[0].images.pixel_values, samples[4].images.pixel_values)
    # a second trainer (a resumed run) renders and samples exactly the same
    again, _ = VisualGRPOTrainer(
        tiny_vlm(tok), visual_cfg(tmp_path / "again"), tok, size=(32, 32)
    ).rollout()
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    assert all(
        torch.equal(a.images.pixel_values, b.images.pixel_values) for a, b in zip(again, samples)
    )

    # the update's forward, in micro-batches of 5 that mix prompts of different lengths, gives each
    # row the log-probs of the model on its own prompt and picture
    inputs, targets = collate(samples, tok.pad_id)
    micro = [slice(i, i + 5) for i in range(0, len(samples), 5)]
    batched = trainer._frozen_logprobs(vlm, inputs, targets, micro, samples)
    vlm.eval()
    for i, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        y = torch.full_like(ids, IGNORE_INDEX)[:, :-1]
        p = len(s.prompt_ids)
        y[0, p - 1 :] = torch.tensor(s.completion_ids)
        with torch.no_grad():
            alone, _ = token_logprobs(vlm(ids[:, :-1], images=s.images), y)
        row = batched[i // 5][i % 5]
        got = row[p - 1 : p - 1 + len(s.completion_ids)]
        assert torch.allclose(got, alone[0, p - 1 :], atol=1e-5), i
    # and the picture is what it reads: another prompt's picture changes the log-probs
    swapped = [Sample(**{**s.__dict__, "images": samples[4].images}) for s in samples[:4]]
    inputs, targets = collate(swapped, tok.pad_id)
    other = trainer._frozen_logprobs(vlm, inputs, targets, [slice(0, 4)], swapped)
    inputs, targets = collate(samples[:4], tok.pad_id)
    own = trainer._frozen_logprobs(vlm, inputs, targets, [slice(0, 4)], samples[:4])
    assert (other[0] - own[0]).abs().max() > 1e-4


def test_visual_grpo_rollouts_never_sample_the_image_token(tmp_path):
    """A sampled `<image>` has no picture behind it, and the update's forward (image features over
    every `<image>` position) would find one position too many: the rollouts' sampling forbids it.
    A model that wants `<image>` (its logit raised by 50) draws it under plain sampling and never
    under the trainer's."""
    import dataclasses

    from nanoseek.engine import Engine

    tok = small_tokenizer()
    vlm = tiny_vlm(tok)
    image_id = image_id_of(tok)
    trainer = VisualGRPOTrainer(vlm, visual_cfg(tmp_path), tok, size=(32, 32))
    prompts = trainer.encode_prompts(visual_problems({"visual_colour": [1]}, 2), 0)
    engine = Engine(vlm, tok, max_model_len=256)
    params = trainer._sampling(engine, prompts, seed=0)

    def wants_image(output_ids, logits):
        logits[image_id] += 50.0
        return logits

    def sampled(processors) -> list[int]:
        p = dataclasses.replace(params, logits_processors=processors)
        outs = engine.generate(
            [ids for ids, _ in prompts], [p] * len(prompts), images=[im for _, im in prompts]
        )
        return [t for o in outs for c in o.outputs for t in c.token_ids]

    assert image_id in sampled((wants_image,))
    tokens = sampled((wants_image, *params.logits_processors))
    assert tokens and image_id not in tokens


def _sequence_logprobs(vlm, samples) -> list[float]:
    vlm.eval()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            y = torch.full_like(ids, IGNORE_INDEX)[:, :-1]
            y[0, len(s.prompt_ids) - 1 :] = torch.tensor(s.completion_ids)
            out.append(token_logprobs(vlm(ids[:, :-1], images=s.images), y)[0].sum().item())
    return out


@pytest.mark.parametrize("rewarded", [0, 1])
def test_the_graders_reward_reaches_the_loss_through_the_picture(tmp_path, rewarded):
    """A group of two completions of one pictured colour question, the right answer and a wrong
    one, rewarded by the task's grader (rewarded=0) or the other way round (rewarded=1): one GRPO
    update raises the log-probability of the rewarded completion and lowers the other's, and it
    moves the adaptor and the language model but not the frozen encoder. Deterministic: no
    sampling, one step."""
    tok = small_tokenizer()
    vlm = tiny_vlm(tok)
    vlm.freeze(encoder=True)
    trainer = VisualGRPOTrainer(vlm, visual_cfg(tmp_path, group_size=2), tok, size=(32, 32))
    task = get_visual_task("visual_colour")
    problem = task.generate(1, seed=0, difficulty=1, split="train", lang="en")[0]
    right = problem.solution.completion(think_prefilled=True)
    wrong = right.replace(problem.answer, next(c for c in COLOURS if c != problem.answer))
    ids, images = image_prompt_ids(
        tok, problem.prompt, [task.render(problem, seed=3, size=(32, 32))], vlm.vision.config
    )
    rewards = trainer.grader([problem, problem], [right, wrong])
    assert rewards[0].correct and not rewards[1].correct and rewards[0].total > rewards[1].total
    if rewarded == 1:
        rewards = rewards[::-1]
    samples = [
        Sample(problem, ids, tok.encode(t, allow_special=True) + [tok.eos_id], t, "stop", r, images)
        for t, r in zip((right, wrong), rewards)
    ]
    before = _sequence_logprobs(vlm, samples)
    weights = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    metrics = trainer.train_step(samples)
    after = _sequence_logprobs(vlm, samples)
    assert metrics["adv_abs"] > 0 and metrics["grad_norm"] > 0
    assert after[rewarded] > before[rewarded] + 0.05, (before, after)
    assert after[1 - rewarded] < before[1 - rewarded] - 0.05, (before, after)
    moved = {n for n, p in vlm.named_parameters() if not torch.equal(p, weights[n])}
    assert any(n.startswith("vision.projector.") for n in moved)
    assert any(n.startswith("language_model.") for n in moved)
    assert not any(n.startswith("vision.vision_model.") for n in moved)


def test_a_stopped_visual_grpo_run_resumes_bit_for_bit(tmp_path):
    """Stopped after its first step and resumed on a differently initialised model, a visual GRPO
    run ends with the weights (tower included) and the log of the uninterrupted one: the pictures
    are rendered from the prompt stream's position, which the checkpoint keeps. The in-run held-out
    evaluation (step 0 and each step) is logged too."""
    tok = small_tokenizer()
    cfg = dict(max_steps=2, eval_problems=2, eval_every=1, eval_max_new_tokens=4)
    straight = VisualGRPOTrainer(
        tiny_vlm(tok), visual_cfg(tmp_path / "a", **cfg), tok, size=(32, 32)
    )
    straight.fit()
    stopped = VisualGRPOTrainer(
        tiny_vlm(tok), visual_cfg(tmp_path / "b", **cfg), tok, size=(32, 32)
    )
    step = stopped.train_step

    def stop_after_one(samples):
        out = step(samples)
        stopped._stop_requested = True
        return out

    stopped.train_step = stop_after_one
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    resumed = VisualGRPOTrainer(
        tiny_vlm(tok, seed=1), visual_cfg(tmp_path / "b", **cfg), tok, size=(32, 32)
    )
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("step_s", "elapsed_s", "rollout_tok_s")
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in ("a", "b")
    ]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [0, 1, 2]
    assert all(r["val_problems"] == 4 and 0 <= r["val_accuracy"] <= 1 for r in rows[0])
    assert (tmp_path / "b" / "checkpoints" / "step_000002" / "vision.safetensors").is_file()


def test_the_presets_grpo_phase_and_text_measurements_are_valid(tmp_path):
    from nanoseek.presets import load_preset
    from nanoseek.stages.vision import grpo_phase_config, text_eval_settings, text_mix_settings
    from nanoseek.train.rollout import TaskSpec
    from nanoseek.train.sft import DATA_DEFAULTS

    for name in ("vision", "smoke"):
        preset = load_preset(name)
        section = preset["vision"]
        cfg = grpo_phase_config(section, section["tasks"], tmp_path, preset["price_per_hour"])
        cfg.validate()
        specs = [TaskSpec.parse(t) for t in cfg.tasks]
        assert [s.name for s in specs] == list(section["tasks"])
        assert cfg.out_dir == str(tmp_path / "grpo") and cfg.eval_problems == 0
        assert text_eval_settings(section)["tasks"]
        share, data = text_mix_settings(section, preset)
        assert 0 < share < 1 and set(data) == set(DATA_DEFAULTS)
    # the text SFT's settings: the preset's, else the run's own preset.json, else the defaults
    assert text_mix_settings({}, None) == (0.0, DATA_DEFAULTS)
    smoke = load_preset("smoke")
    (tmp_path / "preset.json").write_text(json.dumps(smoke))
    _, data = text_mix_settings({"text_share": 0.3, "text_mix": {"identity": 5}}, {}, tmp_path)
    assert data["tasks"] == smoke["sft"]["tasks"] and data["identity"] == 5
    assert data["problems_per_task"] == smoke["sft"]["problems_per_task"]
    with pytest.raises(ValueError, match=r"vision.text_share"):
        text_mix_settings({"text_share": 1.0}, None)
    with pytest.raises(ValueError, match=r"vision.text_mix: unknown key\(s\) \['share'\]"):
        text_mix_settings({"text_mix": {"share": 0.3}}, None)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bpb'\]"):
        text_eval_settings({"text_eval": {"bpb": 1000}})
    with pytest.raises(ValueError, match=r"unknown text task\(s\) \['visual_colour'\]"):
        text_eval_settings({"text_eval": {"tasks": {"visual_colour": [1]}}})
