"""(2026-11-30-vision-glyph: screen.py of 2026-11-30-vision-read with two more switches, see below.)

Screening run for the reading tasks: the vision stage on ONE task at difficulty 1 (no GRPO, no
text share, no text figures), then a reading diagnosis of the final model on the stage's held-out
problems and pictures (does the first line of the reasoning vary with the picture, is it right).

    PYTHONPATH=src python docs/results/2026-11-30-vision-read/screen.py CKPT OUT TASK [key=json ...]

key: a dotted path into the section below (vision.patch_size=4, sft.max_steps=400, sft.lr=0.003,
align.max_steps=40); prints and writes OUT/screen.json. FREEZE_LM=1 in the environment: the
language model stays frozen in joint SFT too (only the tower and the adaptor train there: every
gradient must go through the picture), by wrapping VisionLanguageModel.freeze.

TRANSCRIBE=all in the environment: every training conversation's answer is the transcription alone
(the reasoning is `8 + 3` or `r i n g`, the content `<answer>` + the same + `</answer>`), so every
target token but the template's is reading; TRANSCRIBE=align: only the alignment phase's
conversations are (joint SFT gets the worked solutions), by patching train.vision's
problem_messages and ImageConversationLoader. TOWER=PATH: the tower starts from PATH
(a vision.safetensors of the glyph pretraining, the head left out) instead of random weights."""

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from nanoseek.checkpoint import load_vision_language_model
from nanoseek.data.chat_tokens import completion_text
from nanoseek.data.images import image_prompt_ids
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.accuracy import token_budget
from nanoseek.eval.stats import wilson_interval
from nanoseek.model.vision import VisionLanguageModel
from nanoseek.stages.vision import train_vision
from nanoseek.tasks.visual import SYMBOL, get_visual_task
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.vision import visual_problems

ckpt, out, task_name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
N_EVAL = 150
section = {
    "vision": {  # the vision preset's tower
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
        "max_tiles": 4,
    },
    "tasks": {task_name: [1]},
    "eval_tasks": {task_name: 1},
    "problems_per_task": 600,
    "renders": 2,
    "eval_problems": N_EVAL,
    "max_new_tokens": 48,
    "samples": 0,
    "train_encoder": True,
    "align": {"max_steps": 40, "batch_size": 16, "seq_len": 320, "lr": 0.002, "warmup_steps": 5},
    "sft": {
        "max_steps": 200,
        "batch_size": 16,
        "seq_len": 320,
        "lr": 0.001,
        "warmup_steps": 20,
        "save_every": 10**9,
    },
    "text_share": 0.0,
    "text_eval": {"bpb_bytes": 0, "tasks": {}},
}
for arg in sys.argv[4:]:
    key, value = arg.split("=", 1)
    *parents, last = key.split(".")
    d = section
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = json.loads(value)

if os.environ.get("FREEZE_LM") == "1":
    _freeze = VisionLanguageModel.freeze

    def _frozen_lm(self, *, encoder=False, projector=False, language=False):
        return _freeze(self, encoder=encoder, projector=projector, language=True)

    VisionLanguageModel.freeze = _frozen_lm

import nanoseek.stages.vision as stage_mod  # noqa: E402
import nanoseek.train.vision as train_mod  # noqa: E402
from nanoseek.stages.glyph import transcription  # noqa: E402

TRANSCRIBE = os.environ.get("TRANSCRIBE", "")
if TRANSCRIBE:
    _messages = train_mod.problem_messages

    def _transcription_messages(p):
        t = transcription(p)
        return [
            {"role": "user", "content": p.prompt},
            {"role": "assistant", "reasoning_content": t, "content": f"<answer>{t}</answer>"},
        ]

    train_mod.problem_messages = _transcription_messages
    if TRANSCRIBE == "align":  # joint SFT (the second loader) gets the worked solutions again
        _Loader = stage_mod.ImageConversationLoader
        _made = []

        def _loader(examples, *args, **kwargs):
            _made.append(1)
            if len(_made) == 2:
                train_mod.problem_messages = _messages
                examples = train_mod.visual_examples(tok_, vcfg_, probs_, renders=2)
            return _Loader(examples, *args, **kwargs)

        stage_mod.ImageConversationLoader = _loader
        from nanoseek.config import VisionConfig  # noqa: E402
        from nanoseek.tokenizer import load_tokenizer as _lt  # noqa: E402

        tok_ = _lt(ckpt)
        vcfg_ = VisionConfig(**section["vision"])
        probs_ = visual_problems(section["tasks"], section["problems_per_task"], split="train")
if os.environ.get("TOWER"):
    from safetensors.torch import load_file  # noqa: E402

    _build = stage_mod.build_vlm

    def _build_pretrained(source, vcfg, seed=0):
        vlm, tok = _build(source, vcfg, seed)
        vlm.vision.load_state_dict(load_file(os.environ["TOWER"]))
        return vlm, tok

    stage_mod.build_vlm = _build_pretrained

start = time.perf_counter()
if os.environ.get("DIAGNOSE_ONLY") == "1":  # the diagnosis of an earlier run's OUT again
    summary = None
    wall = None
else:
    summary = train_vision(Path(ckpt), out / "vision", section)
    wall = time.perf_counter() - start

# reading diagnosis on the stage's held-out problems and pictures (eval/visual.py: seed 100 000 + i)
torch.set_grad_enabled(False)
vlm = load_vision_language_model(out / "vision" / "final", dtype=torch.float32)
vlm.eval()
tok = load_tokenizer(out / "vision" / "final")
engine = Engine(vlm, tok, max_batch_size=64, max_num_batched_tokens=2048, decode="eager")
task = get_visual_task(task_name)
probs = visual_problems({task_name: [1]}, N_EVAL, split="test", seed=1)
prompts, images, params = [], [], []
for i, p in enumerate(probs):
    ids, inputs = image_prompt_ids(
        tok, p.prompt, [task.render(p, seed=100_000 + i)], vlm.vision.config
    )
    prompts.append(ids)
    images.append(inputs)
    params.append(
        SamplingParams(
            max_tokens=token_budget(tok, p, 48), temperature=0.0, stop_token_ids=[tok.eos_id]
        )
    )
texts = [completion_text(tok, o.token_ids) for o in engine.generate(prompts, params, images=images)]
rewards = task.grade_many(probs, texts, think_prefilled=True)
firsts, read_ok, truths = [], [], []
for p, t in zip(probs, texts):
    first = t.strip().split("\n")[0].strip()
    if task_name == "visual_equation":
        m = p.metadata
        truth = f"{m['a']} {SYMBOL[m['op']]} {m['b']}"
    else:
        truth = " ".join(p.answer)
    firsts.append(first)
    truths.append(truth)
    read_ok.append(first == truth)
correct = sum(bool(r.correct) for r in rewards)
lo, hi = wilson_interval(correct, len(probs))
rlo, rhi = wilson_interval(sum(read_ok), len(probs))
common = Counter(firsts).most_common(3)
# partial reading: the transcription's first glyph, and each of its three glyphs, right
glyph_right = [
    sum(
        len(f.split()) > k and len(t.split()) > k and f.split()[k] == t.split()[k]
        for f, t in zip(firsts, truths)
    )
    for k in range(3)
]
result = {
    "task": task_name,
    "overrides": sys.argv[4:]
    + [f"{k}={os.environ[k]}" for k in ("FREEZE_LM", "TRANSCRIBE", "TOWER") if os.environ.get(k)],
    "n": len(probs),
    "distinct_truths": len(set(truths)),
    "correct": correct,
    "accuracy": round(correct / len(probs), 4),
    "wilson95": [round(lo, 4), round(hi, 4)],
    "read_ok": sum(read_ok),
    "read_wilson95": [round(rlo, 4), round(rhi, 4)],
    "distinct_first_lines": len(set(firsts)),
    "most_common_first_lines": common,
    "glyph_right_by_position": glyph_right,
    **(
        {
            "stage_accuracy": summary["tasks"][task_name]["after"]["accuracy"],
            "align_loss": summary["align"].get("loss"),
            "sft_loss": summary["sft"].get("loss"),
            "sft_wall_s": summary["sft"].get("wall_s"),
            "align_wall_s": summary["align"].get("wall_s"),
            "stage_wall_s": round(wall, 1),
        }
        if summary is not None
        else {}
    ),
    "examples": [{"truth": t, "first": f} for t, f in list(zip(truths, firsts))[:8]],
    "first_lines": firsts,
}
(out / ("diagnosis.json" if summary is None else "screen.json")).write_text(
    json.dumps(result, ensure_ascii=False, indent=1) + "\n"
)
print(json.dumps(result, ensure_ascii=False), flush=True)
