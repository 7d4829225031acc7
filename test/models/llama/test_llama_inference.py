#!/usr/bin/env python3
"""End-to-end check: the candidate engine's logits at every position against HF Transformers.

The reference is HF Transformers (eager attention) on the CPU in float32 (or float64). The candidate
runs on the chosen device and dtype. Reported: max/mean abs diff, NMSE, cosine, top-1 agreement,
top-5 containment; verdict from the dtype's tolerances (README, "Tolerances"). A top-1 flip counts as
a failure only where the reference's top-1/top-2 gap is larger than the tolerance allows (a near-tie
may flip on a correct engine). NaN/Inf and collapse (one token predicted everywhere) fail.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utils  # noqa: E402
from kitcore import cli  # noqa: E402

SCRIPT = "test_llama_inference"


def main(argv=None):
    started = time.perf_counter()
    args = utils.build_parser(__doc__).parse_args(argv)
    run = utils.setup(args, SCRIPT)
    inp, results = run.inputs, run.results

    t0 = time.perf_counter()
    reference = run.reference.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)
    run.timings["reference_forward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    candidate = run.candidate.forward(inp.input_ids, inp.position_ids, inp.mask_or_none)
    run.device.synchronize()
    run.timings["candidate_forward_s"] = time.perf_counter() - t0

    judge = utils.engine_tolerance(run.candidate, run.checkpoint.config)
    check = utils.check_logits(candidate, reference, inp.attention_mask, judge)
    c = check.comparison
    print(f"\nlogits at {check.positions} positions (vocab {reference.shape[-1]}):")
    if check.distribution:
        d = check.distribution
        print(f"  judged by distribution ({d.name}): KL mean <= {d.kl_mean:.2g}, p99 <= {d.kl_p99:.2g}, "
              f"max <= {d.kl_max:.2g}, top-1 >= {d.top1}, top-5 >= {d.top5}")
        print(f"  max abs {c.max_abs:.3e}, mean abs {c.mean_abs:.3e}, nmse {c.nmse:.3e}, cosine {c.cosine:.9f}")
    else:
        print("  " + c.message().replace("\n", "\n  "))
    print(f"  top-1 agreement {check.top1_agreement:.4f}; decisive positions {check.decisive_positions}, "
          f"decisive disagreements {check.decisive_disagreements}; top-5 containment {check.top5_containment:.4f}")
    print(f"  KL(reference || candidate) per position: mean {check.kl_mean:.3e}, p99 {check.kl_p99:.3e}, "
          f"max {check.kl_max:.3e}")
    # the check's own cost: its wall time (after imports) over the two models' load and forward times
    work = sum(run.timings.values())
    run.timings["check_wall_s"] = time.perf_counter() - started
    print("  timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in run.timings.items())
          + f"; check wall / (loads + forwards) = {run.timings['check_wall_s'] / work:.2f}")
    utils.record_logits_check(results, "logits", check)
    for name, seconds in run.timings.items():
        results.add("timing", name, seconds, unit="s")
    verdict = "PASS" if check.passed else f"FAIL: {check.reasons()}"
    print(f"\nverdict: {verdict}")
    return results.finish(check.passed, args.json)


if __name__ == "__main__":
    sys.exit(cli.run(main))
