#!/usr/bin/env python3
"""Layer by layer: where does the candidate first diverge from HF Transformers, and which component is wrong?

Llama and Qwen3-MoE checkpoints. Both models run one no-cache forward; the tensors at every capture point
(names: tools/kitcore/points.py, e.g. `layers.3.q_rope`, `layers.1.experts_selected`) are compared with the
candidate dtype's tolerance ("total error"), a layer at a time.

The dual test: each component of the candidate is also run on the reference's own captured input and
compared with the reference's output ("own error"). A component whose own error is out of tolerance
ADDS error (it is wrong itself); one whose total error fails but own error passes only INHERITS error
from before it. Expert sets are judged near-tie-aware; the RoPE layout and q/k row permutations are named.
The check itself: tools/kitcore/intermediate.py.

Exit 1 when any point, own error or RoPE check fails; a point missing on either side, or of another
shape, is a failure. `--json` includes "first_divergence": null or {"layer": N, "point": "<point>"}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, intermediate, session  # noqa: E402


def main(argv=None):
    parser = session.build_parser(__doc__)
    intermediate.add_args(parser)
    session.add_controls_arg(parser)
    args = parser.parse_args(argv)
    if args.plan:
        return session.print_plan(args, intermediate.SCRIPT)
    run = session.Session.open(args, intermediate.SCRIPT, specs=intermediate.engine_specs(args))
    return intermediate.check(run)


if __name__ == "__main__":
    sys.exit(cli.run(main))
