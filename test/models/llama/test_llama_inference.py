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
the same way, and says what this check could have caught here (kitcore/controls.py).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, judges, session  # noqa: E402

SCRIPT = "test_llama_inference"


def main(argv=None):
    started = time.perf_counter()
    parser = session.build_parser(__doc__)
    session.add_repeat_arg(parser, "forward")
    session.add_controls_arg(parser)
    session.add_tokenization_arg(parser)
    args = parser.parse_args(argv)
    session.check_tokenization_args(args)
    if args.plan:
        return session.print_plan(args, SCRIPT)
    run = session.Session.open(args, SCRIPT)
    inp = run.inputs

    def forward(engine):
        return engine.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)

    reference, candidate, peer = run.run_all("forward", forward)
    judge = run.judge(run.candidate)
    check = judges.check_logits(candidate, reference, inp.attention_mask, judge, peer,
                                space=judges.output_space(run.candidate))
    session.print_logits_check(check, reference.shape[-1])
    wall = session.print_timings(run.phases, started)
    session.record_logits_check(run.results, "logits", check)
    run.phases.report(run.results)
    run.results.add("timing", "check_wall", wall, unit="s")
    tokens_ok = run.check_tokenization() if args.tokenization else True
    passed = check.passed and tokens_ok
    if args.controls:
        def judged(logits, shape):  # a control is judged exactly as the candidate was
            c = judges.check_logits(logits, reference, inp.attention_mask, judge, peer)
            return c.passed, c.reasons() or f"within bounds (nmse {c.comparison.nmse:.2e})"
        sensitivity = run.controls(forward, judged)
    if args.repeat:
        del candidate
        passed &= run.check_growth(lambda: forward(run.candidate), "forward")
    failure = (check.reasons() if not check.passed else "the engine's own tokenisation differs (above)"
               if not tokens_ok else "memory grows with every call")
    verdict = "PASS" if passed else f"FAIL: {failure}"
    note = sensitivity if args.controls else session.blind_spot(judge, args.controls) if passed else None
    print(f"\nverdict: {verdict}" + (f"\n{note}" if note else ""))
    return run.finish(passed)


if __name__ == "__main__":
    sys.exit(cli.run(main))
