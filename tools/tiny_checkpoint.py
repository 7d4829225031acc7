#!/usr/bin/env python3
"""Write a small deterministic HuggingFace checkpoint (config.json, model.safetensors, tokenizer).

    python tools/tiny_checkpoint.py --family llama --out /tmp/tiny-llama [--seed 0] [--size tiny]

`tiny` is the kit's default checkpoint (the Llama is briefly trained on Python docstrings);
`small`, `1b` and `8b` are random-init shapes for scale and speed measurements; `8b` (Llama only, about
16 GB in bfloat16) is written one layer at a time and never held in memory whole:

    python tools/tiny_checkpoint.py --family llama --size 8b --dtype bfloat16 --out /data/llama-8b-random
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import cli, tiny  # noqa: E402
from kitcore.devices import parse_dtype  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--family", required=True, choices=sorted(tiny.SIZES))
    parser.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "1b", "8b", "a3b", "a3b-router"],
                        help="tiny (default, trained), small, 1b, 8b (Llama-3.1-8B's shapes, written layer by layer), "
                             "a3b (Qwen3-MoE: one layer of Qwen3-30B-A3B's shapes, 128 experts, top 8), a3b-router "
                             "(the same, its experts narrowed to 64)")
    parser.add_argument("--dtype", default="float32", help="dtype of the saved weights (default float32)")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="shorten the tiny recipe's training (tests of its determinism); default: the recipe's")
    parser.add_argument("--arithmetic", default="pinned", choices=["pinned", "native"],
                        help="pinned (default): train with the same arithmetic on every x86-64 CPU; native: with "
                             "this machine's own kernels (another model per kind of CPU)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: directory is not empty; choose a new directory")
    if args.size not in tiny.SIZES[args.family]:
        raise UsageError(f"--size {args.size} does not exist for --family {args.family}; "
                         f"use one of {', '.join(tiny.SIZES[args.family])}")
    if args.train_steps is not None and args.train_steps < 1:
        raise UsageError("--train_steps must be at least 1")
    tiny.write_checkpoint(args.family, out, seed=args.seed, size=args.size, dtype=parse_dtype(args.dtype),
                          train_steps=args.train_steps, arithmetic=args.arithmetic)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
