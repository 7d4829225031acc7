#!/usr/bin/env python3
"""Qwen3-MoE attention of one layer: prefill TTFT and decode throughput, checked against a float32 reference.

Prefill cases (seqlen:pastlen, default 64:512,128:0,256:0,256:256) run one after another, each on top of
its own KV cache holding `pastlen` past positions, with an explicit causal mask offset by the past.
Inputs: `--inputs text` (default) takes a window of real text's hidden states at this layer's attention
input (the checkpoint reads standard-library docstrings), its past K/V what the float32 reference writes
for the window's first positions: a trained checkpoint's own activations, whose q/k norms and score
ranges random inputs do not meet; `--inputs random` (and `--sweep`, whose lengths reach the context)
takes uniform [0, 1) hidden states and past K/V. Timed per request: from the request's start to its
output being ready (device-synchronised); the cache is cropped back to exactly its past between runs
(untimed). Decode: 16 requests of one token with
pasts 50x4, 100x4, 200x4, 400x4, each step timed at its fixed past. `--batched` also runs the 16 decode
requests as one left-padded batch, as a serving engine does.

Correctness: every case's output against the same module in float32 on the CPU (eager attention,
explicit masks) from the same inputs: max abs diff, cosine, NMSE; the verdict is calibrated by a
correct peer, HF's block with eager attention in the candidate dtype on the device (`--peer none`, or
the hf engine with `--attn eager`, which is that peer: the own-error table, one block on exact inputs)
and sets the exit code. GFLOP/s and GB/s come from
the module's FLOPs and bytes moved (weights + activations + KV cache), at the median latency.

The originals' lines are printed word for word (their formulas, labelled): the TTFT there is the mean
time from the batch start to each request's completion; the throughput is tokens / total decode time.
FLOPs and bytes of one request of S new tokens on P past positions (the roofline's inputs, also behind
GFLOP/s and GB/s), with H hidden, D head_dim, Nq/Nkv heads, s bytes per element:
FLOPs = 2 S H (Nq + 2 Nkv) D + 2 S Nq D H (projections) + 4 Nq D (S P + S (S + 1) / 2) (causal attention);
bytes = weights (H (Nq + 2 Nkv) D + Nq D H + 2 D) s + activations 2 S H s + KV cache 2 Nkv D (P + S) s
read + 2 Nkv D S s written. A batch of decode requests reads the weights once.
`--sweep`: prefill length (16 ... 4096 within the context, no past), decode context length (one token
on a past of 16 ... the context), decode batch (1 ... 16 requests of one token at a past of 256, as one
batch); each point timed and checked like a case. `--cold`: every request also timed with the caches
evicted before each call, beside the warm figures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, attention_bench  # noqa: E402


def main(argv=None):
    return attention_bench.main(argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli.run(main))
