#!/usr/bin/env python3
"""Prefill, then decode with a KV cache: two engines compared step by step, and each against HF.

Engines A and B (`--engines A,B`, default: the `--engine` candidate and `reference`, which is HF eager
on the CPU in the reference dtype; for a candidate in a mode of its own, a quantised KV cache or a
chunked prefill, B is the same engine in its safest mode, its `baseline`) each run a prefill and
`--decode_steps` decode steps with their own KV cache. Decode is teacher-forced: both are fed the reference's greedy token, so one flipped
token cannot cascade. For every step:
  * A vs reference and B vs reference: logits against the reference's no-cache forward at the same
    position;
  * A vs B;
  * cache: each engine's cached logits against its own no-cache forward of the same tokens. Same
    engine, same kernels, same dtype: a difference here is a KV-cache bug, not rounding.
A vs reference and B vs reference are calibrated by a correct peer (HF in the candidate dtype on its
device, run through the same prefill and decode; tools/kitcore/judges.py); A vs B and the cache checks
are judged by the table. A step is CLOSE when its gates pass (element tolerances, KL max, a top-1 flip
at a decisive position); the statistics that need several positions (KL mean and p99, top-1/top-5
rates) are judged over every step together, and over a long decode (64 steps or more) under a distribution
judge, the last quarter of the steps by itself as well: an error that grows with decode length fails there,
named so; every comparison's error by position (its curve and slope) is in the JSON and the report.
The exit code follows the verdict.
With `--engines hf,llama.cpp` this is the Python-vs-C++ comparison of the original InfiniLM script.
Engines that keep their KV cache to themselves (vLLM, a server: kitcore.serving) are not teacher-forced:
they decode greedily by themselves, and a step is compared with the reference while their tokens so far
are the teacher's. Where one leaves the teacher, the step is judged (a flip at a decisive position fails;
at a near-tie it is a benign divergence, said so) and the row's later steps are not compared. Their cache
check compares their decode with their own prefill of the same tokens.
`--cache_pairs` checks an engine's prefix cache instead (kitcore/prefix_pairs.py): the same request cold and
after another request that shares its first L tokens, L swept across the cache's block boundaries; each hot
request against its cold run and the reference, with the hits the engine reports.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, forward  # noqa: E402


def main(argv=None):
    return forward.main(argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli.run(main))
