"""What several command families share: the weight flags (--dtype, --int8), the decode-path flags
(--decode, --decode-dtype) and the check for a servable checkpoint."""

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


def add_decode_arguments(p) -> None:
    """--decode and --decode-dtype: the Engine's decode path (engine/compiled.py)."""
    p.add_argument(
        "--decode",
        choices=("eager", "compiled", "auto"),
        default=None,
        help="decode step: auto (the default, or $NANOSEEK_DECODE when set) compiles the step "
        "and times it against eager PyTorch on this CPU at start, then keeps the faster; "
        "compiled (Inductor, one graph per batch bucket, for any context) or eager (no "
        "compilation) force one. Compiling costs up to about a minute per graph the first "
        "time; the compiled graphs are cached on disk (AOTInductor packages beside Inductor's "
        "cache), so a later start with the same weights loads them in about a second",
    )
    p.add_argument(
        "--decode-dtype",
        choices=("auto", "float32", "bfloat16", "int8"),  # engine/compiled.py DECODE_DTYPES
        default="auto",
        help="the compiled step's matrices (auto: bfloat16 is tried only where the CPU has it; "
        "int8, weight-only int8 dense products and LM head, only when asked for)",
    )


def decode_options(args) -> dict:
    """The Engine keyword arguments of --decode and --decode-dtype."""
    return {"decode": args.decode, "decode_dtype": args.decode_dtype}


def check_checkpoint(path: str | Path) -> Path:
    """A directory chat and serve can use (config.json, tokenizer.json), checked before loading."""
    path = Path(path)
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a servable checkpoint (no {name})")
    return path
