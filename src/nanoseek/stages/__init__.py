"""The pipeline, one module per stage, each writing into `runs/NAME/<stage>/`:

    corpus ─► tokenizer ─► shards ─► pretrain ─► long_context ─► sft ─► grpo
    (text)    (BPE)        (tokens)  (MoE+MLA+MTP) (YaRN)        (chat)  (RL)
           ─► eval ─► export ─► report
              (figures) (runs/NAME/final/) (report.md)

common.py holds what every stage shares (the done marker, skip-if-done, the checkpoint lookup);
speedrun.py drives the stages in order. Stages exchange files only (checkpoints, token shards, JSON)
and call the library (data/, train/, eval/, reporting/), which knows nothing of them.
"""
