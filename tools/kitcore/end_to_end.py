"""End-to-end validation; its shell, with the description --help prints: test/models/llama/test_llama_inference.py.

End-to-end check: the candidate engine's logits at every position against HF Transformers.
"""

import time

import torch

from . import devices, judges, session
from .errors import UsageError
from .verdict import Verdict

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


def main(argv=None, doc=None):
    started = time.perf_counter()
    parser = session.build_parser(doc)
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


