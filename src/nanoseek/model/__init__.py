"""The DeepSeek-V3 architecture, in paper order: layers.py (RMSNorm, SwiGLU), rope.py (RoPE + YaRN),
attention.py (MLA), moe.py (router + experts), transformer.py (blocks, MTP, the model)."""

from nanoseek.model.transformer import IGNORE_INDEX, LossOutput, Transformer

__all__ = ["IGNORE_INDEX", "LossOutput", "Transformer"]
