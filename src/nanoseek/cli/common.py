"""What several command families share: the weight flags (--dtype, --int8) and the check for a
servable checkpoint."""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_weight_arguments(p) -> None:
    """--dtype and --int8 on a parser or argument group; load_checkpoint takes them as given."""
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights dtype (default: as saved; float32 for 8-bit weights)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights: model.int8.safetensors when present, else quantized at load",
    )


def check_checkpoint(path: str | Path) -> Path:
    """A directory chat and serve can use (config.json, tokenizer.json), checked before loading."""
    path = Path(path)
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a servable checkpoint (no {name})")
    return path
