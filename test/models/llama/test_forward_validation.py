#!/usr/bin/env python3
"""Prefill, then decode with a KV cache: two engines compared step by step, and each against HF.

Engines A and B (`--engines A,B`, default: the `--engine` candidate and `reference`, which is HF eager
on the CPU in the reference dtype) each run a prefill and `--decode_steps` decode steps with their
own KV cache. Decode is teacher-forced: both are fed the reference's greedy token, so one flipped
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
rates) are judged over every step together. The exit code follows the verdict.
With `--engines hf,llama.cpp` this is the Python-vs-C++ comparison of the original InfiniLM script.
Engines that keep their KV cache to themselves (vLLM, a server: kitcore.serving) are not teacher-forced:
they decode greedily by themselves, and a step is compared with the reference while their tokens so far
are the teacher's. Where one leaves the teacher, the step is judged (a flip at a decisive position fails;
at a near-tie it is a benign divergence, said so) and the row's later steps are not compared. Their cache
check compares their decode with their own prefill of the same tokens.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utils  # noqa: E402
from kitcore import cli, judges  # noqa: E402
from kitcore.decode import Decoded, run_engine  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402

SCRIPT = "test_forward_validation"


def main(argv=None):
    parser = utils.build_parser(__doc__, decode=True)
    parser.add_argument("--engines", help="A,B: two engines to compare (default: <--engine>,reference)")
    utils.add_repeat_arg(parser, "prefill + decode (engine A)")
    args = parser.parse_args(argv)
    if args.plan:
        return utils.print_plan(args, SCRIPT)
    if args.decode_steps < 1:
        raise UsageError(f"--decode_steps must be at least 1, got {args.decode_steps}")
    specs = (args.engines or f"{args.engine},{utils.REFERENCE}").split(",")
    if len(specs) != 2 or not all(specs):
        raise UsageError(f"--engines {args.engines!r}: expected two engines, e.g. hf,compile or hf,reference")
    run = utils.setup(args, SCRIPT, extra_positions=args.decode_steps, specs=specs)
    results, inp = run.results, run.inputs
    pair = [run.engines[s] for s in specs]

    with run.phases("reference_decode"):
        teacher, ref_steps, ref_cached = utils.reference_greedy(run, inp, args.decode_steps)
    # the reference teacher-forced through its own cache is its greedy decode: not run twice
    outputs = {id(run.reference): Decoded(ref_cached, ref_steps, torch.ones_like(ref_cached[..., 0], dtype=torch.long),
                                          teacher)}
    for label, engine in (("a", pair[0]), ("b", pair[1]), ("peer", run.peer)):
        if engine is not None and id(engine) not in outputs:
            with run.phases(f"{label}_decode"):
                outputs[id(engine)] = run_engine(engine, inp, teacher)
    peer_steps = outputs[id(run.peer)].cached if run.peer is not None else None
    a, b = outputs[id(pair[0])], outputs[id(pair[1])]
    judge_a, judge_b = run.judge(pair[0]), run.judge(pair[1])
    # the cache check compares an engine with itself: the table bounds its rounding, no peer applies
    own_a, own_b = replace(judge_a, calibrated=False), replace(judge_b, calibrated=False)
    every = torch.ones_like(a.comparable)
    space = judges.output_space
    comparisons = {  # name: (candidate, reference, judge, peer, steps compared, space)
        "a_vs_ref": (a.cached, ref_steps, judge_a, peer_steps, a.comparable, space(pair[0])),
        "b_vs_ref": (b.cached, ref_steps, judge_b, peer_steps, b.comparable, space(pair[1])),
        "a_vs_b": (a.cached, b.cached, judges.looser(judge_a, judge_b), None, a.comparable & b.comparable,
                   space(*pair)),
        "a_cache": (a.cached, a.no_cache, own_a, None, every, space(pair[0])),
        "b_cache": (b.cached, b.no_cache, own_b, None, every, space(pair[1])),
    }
    n_steps = args.decode_steps + 1

    print(f"\nteacher tokens (reference greedy): {teacher.tolist()}")
    print(f"A = {specs[0]} ({pair[0].dtype}): {judge_a.describe()}")
    print(f"B = {specs[1]} ({pair[1].dtype}): {judge_b.describe()}")
    for label, spec, decoded in (("A", specs[0], a), ("B", specs[1], b)):
        if not torch.equal(decoded.tokens, teacher):
            print(f"{label} = {spec} decodes by itself: its greedy tokens {decoded.tokens.tolist()}; a step is "
                  "compared with the reference while its tokens so far are the teacher's")
    header = (f"{'step':>5} {'kind':>8} | {'A vs ref':>19} | {'B vs ref':>19} | {'A vs B':>19} | "
              f"{'A cache':>19} | {'B cache':>19} | verdict")
    print("cells: max abs diff / this step's gates (element tolerances, KL max, decisive top-1); "
          "'--': not compared (the engine's tokens left the teacher's)")
    print(header)
    print("-" * len(header))
    all_close = True
    steps = []
    for step in range(n_steps):
        kind = "prefill" if step == 0 else f"decode{step}"
        at = slice(step, step + 1)
        checks = {name: judges.check_logits(c[:, at], r[:, at], m[:, at], j, None if p is None else p[:, at],
                                            aggregate=False, space=sp)
                  for name, (c, r, j, p, m, sp) in comparisons.items() if m[:, at].any()}
        close = all(c.passed for c in checks.values())
        all_close &= close
        cells = " | ".join(f"{checks[n].comparison.max_abs:>11.3e} {'ok' if checks[n].passed else 'FAIL':>7}"
                           if n in checks else f"{'--':>19}" for n in comparisons)
        print(f"{step:>5} {kind:>8} | {cells} | {'CLOSE' if close else 'NOT_CLOSE'}")
        for name, c in checks.items():
            if not c.passed:
                print(f"      {name}: {c.reasons()}")
            results.add(f"step{step}", f"{name}_max_abs", c.comparison.max_abs, kind=kind)
            results.add(f"step{step}", f"{name}_nmse", c.comparison.nmse, kind=kind)
            results.add(f"step{step}", f"{name}_kl", c.kl_mean, unit="nats", kind=kind)
            results.add(f"step{step}", f"{name}_passed", c.passed, unit="bool", kind=kind)
        results.add(f"step{step}", "close", close, unit="bool", kind=kind)
        steps.append({"step": step, "kind": kind, "close": close,
                      **{n: {**c.comparison.as_dict(), "passed": c.passed, "kl": c.kl_mean,
                             "top1_agreement": c.top1_agreement, "top5_containment": c.top5_containment}
                         for n, c in checks.items()}})
    for label, spec, decoded, judge in (("A", specs[0], a, judge_a), ("B", specs[1], b, judge_b)):
        for row in range(teacher.shape[0]):
            left = (decoded.tokens[row] != teacher[row]).nonzero()
            if len(left):
                s = int(left[0])
                flip = judges.check_logits(decoded.cached[row:row + 1, s:s + 1], ref_steps[row:row + 1, s:s + 1],
                                           torch.ones(1, 1, dtype=torch.long), judge,
                                           None if peer_steps is None else peer_steps[row:row + 1, s:s + 1],
                                           aggregate=False, space=space(pair[0] if label == "A" else pair[1]))
                # the token it chose, not only its distribution's argmax: a wrong pick is wrong at a decisive position
                decisive = flip.decisive_positions > 0
                all_close &= not decisive
                print(f"{label} = {spec}, row {row}: chose token {int(decoded.tokens[row, s])} at step {s} where the "
                      f"teacher has {int(teacher[row, s])}: "
                      + ("at a DECISIVE position: a real failure" if decisive else
                         "a near-tie (the reference's top-1/top-2 gap is within rounding): a benign divergence")
                      + "; its later steps are not compared")
                results.add("divergence", "first_step", s, unit="step", engine=label, row=row, decisive=decisive)
    results.extra["steps"] = steps

    # every step together: the statistics a single position cannot carry (KL mean / p99, agreement rates)
    print(f"\nall {n_steps} steps together:")
    overall = {}
    for name, (c, r, j, p, m, sp) in comparisons.items():
        check = judges.check_logits(c, r, m, j, p, space=sp)
        overall[name] = {"passed": check.passed, "kl_mean": check.kl_mean, "kl_p99": check.kl_p99,
                         "kl_max": check.kl_max, "top1_agreement": check.top1_agreement,
                         "top5_containment": check.top5_containment, "nmse": check.comparison.nmse,
                         "decisive_disagreements": check.decisive_disagreements, "peer": check.peer}
        all_close &= check.passed
        peer_note = (f"; peer KL mean {check.peer['kl_mean']:.2e}, nmse {check.peer['nmse']:.2e}"
                     if check.peer else "")
        print(f"  {name:<8} KL mean {check.kl_mean:.2e} p99 {check.kl_p99:.2e} max {check.kl_max:.2e}, nmse "
              f"{check.comparison.nmse:.2e}, top-1 {check.top1_agreement:.3f}, top-5 {check.top5_containment:.3f}"
              f"{peer_note} -> {'ok' if check.passed else 'FAIL: ' + check.reasons()}")
        for metric in ("kl_mean", "kl_p99", "kl_max", "top1_agreement", "top5_containment"):
            results.add("all_steps", f"{name}_{metric}", getattr(check, metric),
                        unit="nats" if metric.startswith("kl") else "fraction")
        results.add("all_steps", f"{name}_passed", check.passed, unit="bool")
    results.extra["all_steps"] = overall
    for label, spec, key in (("A", specs[0], "a_cache"), ("B", specs[1], "b_cache")):
        bad = [s["step"] for s in steps if not s[key]["passed"]]
        if bad:
            print(f"engine {label} ({spec}): its cached logits differ from its own no-cache forward from step "
                  f"{bad[0]} on: a KV-cache bug, not kernel rounding")
    print("\n" + run.phases.summary())
    run.phases.report(results)
    passed = all_close
    if args.repeat:
        del outputs
        passed &= utils.check_growth(run, lambda: run_engine(pair[0], inp, teacher), "prefill + decode")
    verdict = ("PASS: every step CLOSE" if passed else "FAIL: see the NOT_CLOSE steps and FAIL lines" if not all_close
               else "FAIL: memory grows with every call")
    print(f"\nverdict: {verdict}")
    return run.finish(passed)


if __name__ == "__main__":
    sys.exit(cli.run(main))
