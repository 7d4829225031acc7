#!/usr/bin/env python3
"""Batches: does every prompt get the same logits alone and inside a batch, and the reference's logits,
through a batched prefill and a batched decode whose rows sit at different cache lengths?

Prompts: windows of real text of ragged lengths (`--lengths`, default 1 to 300 tokens; `--inputs random`
for token ids, `--prompts-file` for your own). Each prompt runs alone on the candidate, then inside
batches of `--batch_sizes` (default 2, 4, 8; each batch pairs short rows with long ones) with left
padding, and right padding where the engine declares it (`padding_sides`). For every row:
  * batch invariance, against the same prompt alone on the same engine: "bitwise", "within rounding"
    (the dtype's table: the same engine's kernels on another batch shape) or "NOT", which fails;
  * against the reference (HF eager float32 on the CPU, the prompt alone), judged like the end-to-end
    check (calibrated by the peer, HF in the candidate dtype, run on the same batches).
Then a batched prefill and a teacher-forced greedy decode (`--decode_steps`) of the largest batch with
ragged caches, in which rows finish early (row j decodes steps - j mod 3 tokens; a finished row is fed
a masked-out padding token): each row's every step against that row's reference. Last, a shared-prefix
batch (one prompt, and that prompt continued two ways): each row against itself alone and the reference.
An engine that keeps its KV cache to itself (vLLM, a server: generate()) gets the batch as concurrent
requests instead (a server's at most 8 at a time, on the loopback): every row's greedy decode alongside the
others against the same request alone (invariance, for the steps whose tokens agree) and against the
reference while its tokens follow the reference's greedy ones.
A failure names the batch, the row and the step. Exit 1 on any failure.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, batch  # noqa: E402


def main(argv=None):
    return batch.main(argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli.run(main))
