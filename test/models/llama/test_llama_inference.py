#!/usr/bin/env python3
"""End-to-end check: the candidate engine's logits at every position against HF Transformers.

The reference is HF Transformers (eager attention) on the CPU in float32 (or float64). The candidate
runs on the chosen device and dtype. Reported: max/mean abs diff, NMSE, cosine, top-1 agreement,
top-5 containment, KL. The verdict is calibrated by a correct peer, HF Transformers in the candidate's
dtype on its device, run on the same input (`--peer hf`, tools/kitcore/judges.py): the candidate's
errors, overall and per position, may be up to k times the peer's. Without a peer (`--peer none`, or
when the candidate is that peer) the static table judges (README, "Tolerances"). A top-1 flip fails
where the reference's top-1/top-2 gap is decisive, i.e. larger than twice what a correct engine's
error may be there (from the peer or the table, never from the candidate). NaN/Inf and collapse
(one token predicted everywhere) fail. `--tokenization` also checks the engine's own ids for the prompt as
text and as a chat message (kitcore/tokenization.py); `--controls` runs the peer with planted bugs, judged
the same way, and says what this check could have caught here (kitcore/controls.py). `--also_float32` judges
the candidate in float32 too, where single-layer errors of 0.3% show (README, "What a PASS cannot see").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, end_to_end  # noqa: E402


def main(argv=None):
    return end_to_end.main(argv, __doc__)


if __name__ == "__main__":
    sys.exit(cli.run(main))
