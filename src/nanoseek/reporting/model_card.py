"""The model card of a run's final checkpoint: README.md with the YAML front matter that model hubs
read (licence, languages, tags, data sources, metrics as a model-index), then what the model is, how
it was made and what it scores, from the run's own files. Values in the front matter are written as
JSON, which is valid YAML.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek.io import atomic_write_text
from nanoseek.reporting.report_card import collect, eval_results

LICENSE = "mit"
TAGS = [
    "nanoseek",
    "deepseek_v3",
    "mixture-of-experts",
    "multi-head-latent-attention",
    "multi-token-prediction",
    "grpo",
    "reasoning",
]


def write_model_card(run: Path, ckpt: Path, preset: dict, samples: list[dict]) -> Path:
    data = collect(run)
    sources = _sources(run)
    evals = eval_results(run)
    name = f"nanoseek-{run.name}"
    text = (
        front_matter(name, sources, evals)
        + "\n"
        + body(name, data, preset, sources, evals, samples)
    )
    atomic_write_text(ckpt / "README.md", text)
    return ckpt / "README.md"


def _sources(run: Path) -> list[dict]:
    manifest = run / "corpus" / "manifest.json"
    return json.loads(manifest.read_text("utf-8"))["sources"] if manifest.is_file() else []


def front_matter(name: str, sources: list[dict], evals: dict[str, dict]) -> str:
    langs = sorted({s["lang"] for s in sources if s["lang"] in ("en", "zh")}) or ["en", "zh"]
    lines = [
        "---",
        f"license: {LICENSE}",
        "language:",
        *[f"- {lang}" for lang in langs],
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {t}" for t in TAGS],
    ]
    results = _model_index_results(evals)
    if results:
        index = [{"name": name, "results": results}]
        lines.append("model-index: " + json.dumps(index, ensure_ascii=False))
    lines.append("---")
    return "\n".join(lines) + "\n"


def _model_index_results(evals: dict[str, dict]) -> list[dict]:
    """The final model's figures: the last evaluated stage."""
    if not evals:
        return []
    final = evals[list(evals)[-1]]
    results = []
    for task, t in final.get("tasks", {}).items():
        pass1 = t.get("greedy", {}).get("pass@1")
        if pass1 is not None:
            results.append(
                {
                    "task": {"type": "text-generation", "name": f"{task} (held-out test split)"},
                    "dataset": {
                        "type": f"nanoseek/{task}",
                        "name": f"nanoseek {task}, test split",
                        "split": "test",
                    },
                    "metrics": [
                        {"type": "pass@1", "value": round(pass1, 4), "name": "greedy pass@1"}
                    ],
                }
            )
    for lang, bpb in final.get("bpb", {}).items():
        results.append(
            {
                "task": {"type": "text-generation", "name": f"language modelling ({lang})"},
                "dataset": {
                    "type": "nanoseek/corpus",
                    "name": f"held-out {lang} text of the run's corpus",
                    "split": "validation",
                },
                "metrics": [{"type": "bits_per_byte", "value": bpb, "name": "bits per byte"}],
            }
        )
    return results


def body(
    name: str,
    data: dict,
    preset: dict,
    sources: list[dict],
    evals: dict[str, dict],
    samples: list[dict],
) -> str:
    from nanoseek.eval.quality import to_markdown

    md = data.get("model", {})
    stages = data["stages"]
    machine = data["machine"]
    wall = sum(s.get("wall_s", 0) for s in stages.values())
    lines = [
        f"# {name}",
        "",
        f"A {_m(md.get('params'))}-parameter ({_m(md.get('active_params'))} active per token) "
        "language model with the DeepSeek-V3 architecture (mixture of experts, multi-head "
        "latent attention, multi-token prediction), trained from scratch in English and "
        f"Chinese by nanoseek's `speedrun` in {wall / 60:.0f} minutes on {machine['cpu']} "
        f"({machine['cores']} cores{', ' + machine['gpu'] if machine.get('gpu') else ''}). "
        f"Preset: {preset.get('description', 'a custom one').rstrip('.')}.",
        "",
        "It is a small research model, made to study the "
        "pipeline; the evaluation below says what it can do.",
        "",
        "## Use",
        "",
        "```bash",
        "nanoseek serve .        # OpenAI-compatible API + web chat on :8000",
        "nanoseek chat .         # in the terminal",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained(".")',
        'tok = AutoTokenizer.from_pretrained(".")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], '
        "add_generation_prompt=True,",
        '                              return_tensors="pt")',
        "print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "## Training",
        "",
        "| stage | steps | tokens | wall (s) |",
        "|---|---|---|---|",
    ]
    for stage in ("pretrain", "long_context", "sft", "grpo"):
        s = stages.get(stage)
        if s:
            lines.append(
                f"| {stage} | {s.get('steps', '–')} | "
                f"{s.get('tokens', '–')} | {s.get('wall_s', '–')} |"
            )
    lines += [
        "",
        f"Context: {md.get('context')} tokens. Latent KV cache: "
        f"{md.get('kv_cache_bytes_per_token_bf16')} bytes per token in bf16.",
        "",
    ]
    if evals:
        lines += ["## Evaluation", "", to_markdown(list(evals.values()), list(evals)), ""]
    if samples:
        lines += ["## Sample answers (greedy)", ""]
        for s in samples:
            verdict = "" if "correct" not in s else (" ✓" if s["correct"] else " ✗")
            lines += [
                f"**{s['prompt']}**{verdict}",
                "",
                f"> *thinking:* {_one_line(s['reasoning'])}",
                ">",
                f"> {_one_line(s['answer'])}",
                "",
            ]
    lines += [
        "## Training data",
        "",
        "| source | language | licence | attribution |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {s['name']} | {s['lang']} | {s['license']} | {s['attribution']} |" for s in sources
    ]
    lines += [
        "",
        "Text under CC BY-SA is attributed above. The SFT and RL data (task "
        "problems, worked solutions, chat turns) are generated by nanoseek (MIT).",
        "",
        "## Licence",
        "",
        "The weights and code are released under the MIT licence.",
        "",
    ]
    return "\n".join(lines)


def _m(n) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}M"


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(empty)"
