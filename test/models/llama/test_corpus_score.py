#!/usr/bin/env python3
"""Corpus scoring: how much an engine's deployment costs over real text, and whether it is faithful to its format.

The candidate is teacher-forced over thousands of tokens of real text (default: Python's language reference as the
standard library ships it; --text for your own), in windows of --n_ctx tokens whose second half is scored, as
llama.cpp's perplexity tool does. The text is tokenised once into a frozen token manifest (--manifest: the ids,
their sha256, the scored positions, the tokenizer's digest), reused by every engine; a manifest made by another
tokenizer, or flags that ask for other tokens, are refused (exit 2). The reference is HF Transformers float32
eager on the CPU; its final hidden states are cached, and its lm_head gives the exact full-vocabulary
distributions back.

Two answers:
  * faithful to its format: a quantised engine (its declared `format`, or --format: q8_0, q4_0, w8a8-int8,
    fp8-e4m3, kv-f16, kv-q8_0, kv-q4_0; tools/kitcore/formats.py) is compared with HF with that format simulated
    in float64 (the format's exact value); its mean KL from it must be within k^2 x that of a correct peer (the same
    simulation in the candidate's precision). Without a format: the candidate against the reference, the peer HF
    in the candidate dtype. A kernel bug hiding inside the format's cost fails here.
  * cost of the deployment: KL (mean, p99, p99.9, max), the log-PPL ratio (mean change in the next token's NLL),
    same top-1 rate and RMS change in the next token's probability against the float32 reference, each with an
    interval from a block bootstrap over windows (tokens of a window are not independent); signed off against
    --max_kl_mean / --max_log_ppl_ratio (the interval's upper end must be below), else reported. What the format
    costs by itself is reported beside it.
--plan scores a few pilot windows and says how many tokens each margin needs at --confidence and --power.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, corpus  # noqa: E402


def main(argv=None):
    return corpus.main(argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli.run(main))
