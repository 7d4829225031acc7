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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli, devices, judges, session  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402
from kitcore.verdict import Verdict  # noqa: E402

SCRIPT = "test_llama_inference"


def end_to_end(run, forward, case, controls):
    """One dtype's check, printed and recorded under `case` ("logits", "logits_float32"): (LogitsCheck, its
    judge, the controls' sensitivity line or None)."""
    inp = run.inputs
    reference, candidate, peer = run.run_all(case.replace("logits", "forward"), forward)
    judge = run.judge(run.candidate)
    check = judges.check_logits(candidate, reference, inp.attention_mask, judge, peer,
                                space=judges.output_space(run.candidate))
    session.print_logits_check(check, reference.shape[-1])
    session.record_logits_check(run.results, case, check)
    sensitivity = None
    if controls:
        def judged(logits, shape):  # a control is judged exactly as the candidate was
            c = judges.check_logits(logits, reference, inp.attention_mask, judge, peer)
            return c.passed, c.reasons() or f"within bounds (nmse {c.comparison.nmse:.2e})"
        sensitivity = run.controls(forward, judged, case=f"controls_{case}" if case != "logits" else "controls")
    return check, judge, sensitivity


def main(argv=None):
    started = time.perf_counter()
    parser = session.build_parser(__doc__)
    session.add_repeat_arg(parser, "forward")
    session.add_controls_arg(parser)
    session.add_tokenization_arg(parser)
    parser.add_argument("--also_float32", action="store_true",
                        help="also run the candidate and its peer in float32 and judge that too (one more copy of "
                             "each): float32 rounding hides far less, so the model's logic (weights, RoPE, norms, "
                             "scales) is checked finely; bugs only in the reduced-precision kernels are not")
    args = parser.parse_args(argv)
    session.check_tokenization_args(args)
    if args.also_float32 and args.engine.startswith("openai:"):
        raise UsageError(f"--also_float32: the server behind {args.engine} runs the dtype it was started with; start "
                         "one in float32 and run this check on it with --dtype float32")
    if args.plan:
        return session.print_plan(args, SCRIPT)
    run = session.Session.open(args, SCRIPT)
    inp = run.inputs

    def forward(engine):
        return engine.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)

    check, judge, sensitivity = end_to_end(run, forward, "logits", args.controls)
    companion = None
    if args.also_float32 and run.dtype == torch.float32:
        print("\n--also_float32: the candidate runs in float32 already")
    elif args.also_float32:
        print("\n--also_float32: the candidate and its peer again, in float32")
        companion = end_to_end(run.in_dtype(torch.float32), forward, "logits_float32", args.controls)
    wall = session.print_timings(run.phases, started)
    run.phases.report(run.results)
    run.results.add("timing", "check_wall", wall, unit="s")
    verdict = Verdict()
    verdict.add("logits", check.passed, check.reasons())
    if companion:
        verdict.add("logits in float32", companion[0].passed, f"in float32: {companion[0].reasons()}")
    if args.tokenization:
        verdict.add("tokenisation", run.check_tokenization(), "the engine's own tokenisation differs (above)")
    if args.repeat:
        verdict.add("memory", run.check_growth(lambda: forward(run.candidate), "forward"),
                    "memory grows with every call")
    notes = [session.blind_spot(judge, args.controls, companion is not None)] if verdict.passed else []
    if sensitivity:
        notes = [f"{devices.dtype_name(run.dtype)} {sensitivity}" if companion else sensitivity]
    if companion and companion[2]:
        notes.append(f"float32 {companion[2]}")
    return run.finish(verdict, notes)


if __name__ == "__main__":
    sys.exit(cli.run(main))
