"""Supervised fine-tuning: a pretrained checkpoint learns the chat format and the R1 answer format.

    conversations (worked task solutions, generated chat, your JSONL) ─► ids + assistant mask
    ─► packed rows ─► Trainer (the same loop as pretraining; loss on assistant tokens only)
    ─► OUT/final

The preset's "sft" section holds TrainConfig fields plus the data knobs below (DATA_DEFAULTS);
everything is optional. Validation loss is measured on held-out (test-split) task problems, on
assistant tokens only.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.chat_tokens import ChatLoader, Messages, read_chat_jsonl, tokenize_conversations
from nanoseek.data.conversations import (
    corpus_conversations,
    identity_conversations,
    task_conversations,
    tool_conversations,
)
from nanoseek.data.corpus import iter_records
from nanoseek.data.retrieval import retrieval_conversations
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import dist
from nanoseek.train.trainer import TrainConfig, Trainer, export_checkpoint

DATA_DEFAULTS = {
    "tasks": {
        "arithmetic": [1, 2],
        "countdown": [1],
        "word_problems": [1],
        "code": [1],
        "passkey": [1],
    },
    # train-split problems per task, spread over its difficulties and the languages
    "problems_per_task": 1000,
    "langs": ["en", "zh"],
    "identity": 200,  # generated greetings / questions about the model
    "corpus_qa": 300,  # factual Q&A read off the run's pretraining corpus (train split)
    # questions about facts stated inside a passage of prose (data/retrieval.py
    # retrieval_conversations): the passkey eval's skill in other words
    "retrieval": 0,
    # their passages' length in tokens, drawn log-uniformly from this range: past the SFT rows'
    # length they are dropped, so longer passages need a longer seq_len
    "retrieval_tokens": [40, 180],
    # the share of the generated mix that is tool use (a declared calculator, called for arithmetic
    # and word problems of the train split; data/conversations.py tool_conversations)
    "tool_use": 0.15,
    "chat_jsonl": [],  # your own {"messages": [...]} files, added to the mix
    "val_problems": 16,  # held-out (test-split) problems per task for the validation loss
    "data_seed": 0,
}
TRAIN_DEFAULTS = {
    "max_steps": 300,
    "batch_size": 8,
    "seq_len": None,
    "lr": 1e-3,
    "warmup_steps": 20,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "eval_every": 50,
    "eval_batches": 8,
    "save_every": 50,
    "log_every": 10,
    "mtp_weight": 0.3,
}


def split_section(section: dict) -> tuple[dict, dict]:
    """A preset section -> (data knobs, TrainConfig fields), defaults
    filled in; unknown keys are an error."""
    train_fields = {f.name for f in fields(TrainConfig)}
    unknown = set(section) - set(DATA_DEFAULTS) - train_fields
    if unknown:
        raise ValueError(
            f"sft: unknown setting(s) {sorted(unknown)}; data settings are "
            f"{sorted(DATA_DEFAULTS)}, the rest must be TrainConfig fields"
        )
    data = {**DATA_DEFAULTS, **{k: v for k, v in section.items() if k in DATA_DEFAULTS}}
    train = {**TRAIN_DEFAULTS, **{k: v for k, v in section.items() if k in train_fields}}
    return data, train


def sft_mix(data: dict, corpus_dir: str | Path | None = None) -> list[Messages]:
    """The training conversations that the data knobs describe."""
    seed = data["data_seed"]
    convs = task_conversations(
        data["tasks"], data["problems_per_task"], langs=data["langs"], seed=seed
    )
    convs += identity_conversations(data["identity"], seed=seed, langs=data["langs"])
    train_file = Path(corpus_dir) / "train.jsonl" if corpus_dir else None
    if data["corpus_qa"] and train_file is not None and train_file.is_file():
        convs += corpus_conversations(iter_records(train_file), data["corpus_qa"], seed=seed)
    convs += retrieval_conversations(
        data["retrieval"], seed=seed, langs=data["langs"], tokens=tuple(data["retrieval_tokens"])
    )
    share = data["tool_use"]
    if not 0 <= share < 1:
        raise ValueError(f"sft: tool_use is a share of the mix in [0, 1), got {share!r}")
    n_tools = round(share / (1 - share) * len(convs))
    convs += tool_conversations(data["tasks"], n_tools, langs=data["langs"], seed=seed)
    for path in data["chat_jsonl"] or []:
        convs += read_chat_jsonl(path)
    return convs


def val_mix(data: dict) -> list[Messages]:
    """Held-out task problems with their worked solutions: the validation loss measures how well the
    model writes solutions it has never seen."""
    return task_conversations(
        data["tasks"],
        data["val_problems"],
        langs=data["langs"],
        seed=data["data_seed"],
        split="test",
    )


def run_sft(
    base: str | Path,
    out: str | Path,
    conversations: list[Messages],
    train: dict,
    *,
    val_conversations: list[Messages] | None = None,
    info: dist.DistInfo | None = None,
) -> dict:
    """Fine-tune the checkpoint `base` on `conversations`; checkpoints go to
    out/checkpoints, the result to out/final. Resumes from out/checkpoints when a
    previous run stopped. -> a summary dict."""
    info = info or dist.DistInfo()
    out = Path(out)
    tok = load_tokenizer(base)
    model = load_model(base, dtype=torch.float32)
    train = {**TRAIN_DEFAULTS, **train}
    # None: up to the context
    train["seq_len"] = train["seq_len"] or min(512, model.config.max_position_embeddings)
    tcfg = TrainConfig(**{**train, "out_dir": str(out)})
    if tcfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"sft seq_len={tcfg.seq_len} exceeds the model's context "
            f"({model.config.max_position_embeddings} tokens)"
        )
    examples = tokenize_conversations(tok, conversations)
    loader = ChatLoader(
        examples,
        tcfg.batch_size,
        tcfg.seq_len,
        pad_id=tok.pad_id,
        seed=tcfg.seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    val = None
    if val_conversations:
        val_examples = tokenize_conversations(tok, val_conversations)

        def val():
            return ChatLoader(
                val_examples,
                1,
                tcfg.seq_len,
                pad_id=tok.pad_id,
                shuffle=False,
                epochs=1,
                rank=info.rank,
                world_size=info.world_size,
            )

    trainable = sum(sum(m[1:]) for _, m in loader.examples)
    result = Trainer(model, tcfg, loader, val_batches=val, tokenizer=tok, dist_info=info).fit()
    if info.is_main:
        export_checkpoint(model, out / "final", tok)
    return {
        "base": str(base),
        "conversations": len(conversations),
        "dropped_too_long": loader.dropped,
        "rows_per_epoch": loader.rows_per_epoch * info.world_size,
        "epochs": round(
            result["steps"]
            * tcfg.batch_size
            * tcfg.grad_accum
            * info.world_size
            / max(1, loader.rows_per_epoch * info.world_size),
            2,
        ),
        "trainable_tokens": trainable,
        "steps": result["steps"],
        "tokens": result["tokens"],
        "final_loss": result.get("lm_loss_avg"),
        "val_loss": result.get("val_loss"),
        "flops": result["flops"],
        "wall_s": result["wall_s"],
        "mfu": result["mfu"],
        "estimated_cost": result["estimated_cost"],
    }
