#!/usr/bin/env python3
"""Qwen3-MoE sparse MoE block of one layer: latency and tok/s, routing analysis, checked against float32.

Cases: a prefill of 704 tokens in one call and a decode of 16 tokens in one call (as the originals).
Inputs are `--inputs text` (default: the hidden states that reach this layer's MoE block when the
checkpoint itself reads real text, so the routing is realistic) or `--inputs random` (uniform [0, 1),
the originals' way, which routes unrealistically).

Routing analysis, from the float32 reference router on the inputs used: tokens per expert, load
imbalance (max / mean), fraction of experts unused, mean router entropy. Correctness, on every token
(kitcore.qwen3_moe.check_moe_block): the block's output against the same block in float32 with the
eager experts loop on the CPU, calibrated by a correct peer (HF's block with the eager experts loop in
the candidate dtype on the device; with `--peer none`, or for the hf engine with `--experts eager`,
which is that peer, the static table). A token whose k-th/(k+1)-th router
logit gap is within what a correct engine's router error may be there (from the peer, never the
candidate) is a near-tie: it must match the reference recomputed with one of its admissible expert
sets. With a `.gate`, the candidate's router logits are judged too, and its expert set must be the
reference's on every decisive token; without one, routing faults show in the outputs.
GFLOP/s and GB/s use the FLOPs of the experts actually run and the
bytes of the weights actually read.

The originals' result line is printed word for word, with their formula (mean latency over the runs).
FLOPs and bytes of one call of T tokens (the roofline's inputs, also behind GFLOP/s and GB/s), with H
hidden, I moe_intermediate_size, E experts, k experts per token, U experts used by the call, s bytes
per element: FLOPs = 2 T H E (router) + 2 x 3 H I k T (gate, up, down of k experts per token);
bytes = (E H (router) + U x 3 H I (the used experts' weights, read once) + 2 T H (input, output)) x s.
Case `negative_router` (correctness only, on half of the prefill's tokens): the router's rows shifted by one
vector so that every router logit of those tokens is negative while each token's ranking and softmax stay what
they were (the same amount is subtracted from every expert's logit of a token); a top-k that assumes a
positive maximum (a public MoE kernel chose wrong experts only then, vllm-project/vllm #37605) fails here.
`--sweep`: tokens per call 1, 4, 16, 64, 256, 1024, 4096, each point timed and checked like a case.
`--cold`: every case also timed with the caches evicted before each call, beside the warm figures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, moe_bench  # noqa: E402


def main(argv=None):
    return moe_bench.main(argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli.run(main))
