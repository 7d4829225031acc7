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
(one token predicted everywhere) fail.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utils  # noqa: E402
from kitcore import cli, judges  # noqa: E402

SCRIPT = "test_llama_inference"


def main(argv=None):
    started = time.perf_counter()
    parser = utils.build_parser(__doc__)
    utils.add_repeat_arg(parser, "forward")
    args = parser.parse_args(argv)
    if args.plan:
        return utils.print_plan(args, SCRIPT)
    run = utils.setup(args, SCRIPT)
    inp, results, phases = run.inputs, run.results, run.phases

    with phases("reference_forward"):
        reference = run.reference.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)
    with phases("candidate_forward"):
        candidate = run.candidate.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)
    peer = None
    if run.peer is not None and run.peer is not run.candidate:
        with phases("peer_forward"):
            peer = run.peer.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)
    check = judges.check_logits(candidate, reference, inp.attention_mask, run.judge(run.candidate), peer,
                                space=judges.output_space(run.candidate))
    utils.print_logits_check(check, reference.shape[-1])
    # the check's own cost: its wall time (after imports) over the two models' load and forward times
    work = sum(phases.seconds.values())
    wall = time.perf_counter() - started
    print("  timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.seconds.items())
          + f"; check wall {wall:.3f}, wall / (loads + forwards) = {wall / work:.2f}")
    print("  " + phases.summary())
    utils.record_logits_check(results, "logits", check)
    phases.report(results)
    results.add("timing", "check_wall", wall, unit="s")
    passed = check.passed
    if args.repeat:
        del candidate
        passed &= utils.check_growth(run, lambda: run.candidate.forward(inp.input_ids, inp.position_ids,
                                                                         inp.mask_or_none), "forward")
    verdict = "PASS" if passed else f"FAIL: {check.reasons() if not check.passed else 'memory grows with every call'}"
    print(f"\nverdict: {verdict}")
    return run.finish(passed)


if __name__ == "__main__":
    sys.exit(cli.run(main))
