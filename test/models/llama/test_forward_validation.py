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
A step is CLOSE when all of these pass their dtype's tolerance; the exit code follows the verdict.
With `--engines hf,llama.cpp` this is the Python-vs-C++ comparison of the original InfiniLM script.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utils  # noqa: E402
from kitcore import cli, engines  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402

SCRIPT = "test_forward_validation"
REFERENCE = "reference"


def greedy_reference(reference, inp, steps):
    """Teacher tokens [B, steps]: the reference's greedy decode with its KV cache. Then the reference's
    no-cache logits [B, steps + 1, V] at the prefill's last position and every decode step come from one
    full forward of prompt + teacher tokens."""
    cache = reference.new_cache()
    pos, mask = inp.position_ids, inp.attention_mask
    logits = reference.forward(inp.input_ids, pos, mask if inp.padded else None, cache)[:, -1]
    tokens = []
    for k in range(steps):
        tokens.append(logits.argmax(-1, keepdim=True).cpu())
        if k < steps - 1:
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            logits = reference.forward(tokens[-1], pos, mask if inp.padded else None, cache)[:, -1]
    teacher = torch.cat(tokens, 1)
    return teacher, no_cache_steps(reference, inp, teacher)


def no_cache_steps(engine, inp, teacher):
    """The engine's no-cache logits over prompt + teacher tokens [B, steps + 1, V], at the prefill's last
    position and every decode step."""
    ids = torch.cat([inp.input_ids, teacher], 1)
    pos = torch.cat([inp.position_ids, inp.position_ids[:, -1:] + 1 + torch.arange(teacher.shape[1])], 1)
    mask = torch.cat([inp.attention_mask, torch.ones_like(teacher)], 1)
    full = engine.forward(ids, pos, mask if inp.padded else None).cpu()
    return full[:, inp.input_ids.shape[1] - 1:]


def run_engine(engine, inp, teacher):
    """Prefill + teacher-forced decode with the engine's own cache, and its own no-cache forward."""
    cache = engine.new_cache()
    ids, pos, mask = inp.input_ids, inp.position_ids, inp.attention_mask
    cached = [engine.forward(ids, pos, mask if inp.padded else None, cache)[:, -1].cpu()]
    for k in range(teacher.shape[1]):
        token = teacher[:, k:k + 1]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        cached.append(engine.forward(token, pos, mask if inp.padded else None, cache)[:, -1].cpu())
    return torch.stack(cached, 1), no_cache_steps(engine, inp, teacher)


def main(argv=None):
    parser = utils.build_parser(__doc__, decode=True)
    parser.add_argument("--engines", help="A,B: two engines to compare (default: <--engine>,reference)")
    args = parser.parse_args(argv)
    if args.decode_steps < 1:
        raise UsageError(f"--decode_steps must be at least 1, got {args.decode_steps}")
    specs = (args.engines or f"{args.engine},{REFERENCE}").split(",")
    if len(specs) != 2 or not all(specs):
        raise UsageError(f"--engines {args.engines!r}: expected two engines, e.g. hf,compile or hf,reference")
    run = utils.setup(args, SCRIPT, extra_positions=args.decode_steps)
    results, inp = run.results, run.inputs
    results.labels["engine"] = ",".join(specs)

    def engine_for(spec):
        if spec == REFERENCE:
            return run.reference
        if spec == args.engine:
            return run.candidate
        return engines.load_engine(spec, run.checkpoint.path, run.device, run.dtype, args.attn)

    pair = [engine_for(s) for s in specs]
    teacher, ref_steps = greedy_reference(run.reference, inp, args.decode_steps)
    outputs = [run_engine(e, inp, teacher) for e in pair]
    ones = torch.ones(inp.input_ids.shape[0], 1, dtype=torch.long)

    print(f"\nteacher tokens (reference greedy): {teacher.tolist()}")
    header = (f"{'step':>5} {'kind':>8} | {'A vs ref':>19} | {'B vs ref':>19} | {'A vs B':>19} | "
              f"{'A cache':>19} | {'B cache':>19} | verdict")
    print(f"A = {specs[0]} ({pair[0].dtype}), B = {specs[1]} ({pair[1].dtype}); cells: max abs diff / pass")
    print(header)
    print("-" * len(header))
    all_close = True
    steps = []
    for step in range(args.decode_steps + 1):
        kind = "prefill" if step == 0 else f"decode{step}"
        ref = ref_steps[:, step:step + 1]
        (a_cached, a_full), (b_cached, b_full) = [(c[:, step:step + 1], f[:, step:step + 1]) for c, f in outputs]
        config = run.checkpoint.config
        tol_a, tol_b = utils.engine_tolerance(pair[0], config), utils.engine_tolerance(pair[1], config)
        # per step, quantised engines are judged by KL; their top-1/top-5 rates over all steps, below
        checks = {
            "a_vs_ref": utils.check_logits(a_cached, ref, ones, tol_a, rates=False),
            "b_vs_ref": utils.check_logits(b_cached, ref, ones, tol_b, rates=False),
            "a_vs_b": utils.check_logits(a_cached, b_cached, ones, utils.pair_tolerance(*pair, config),
                                         rates=False),
            "a_cache": utils.check_logits(a_cached, a_full, ones, tol_a, rates=False),
            "b_cache": utils.check_logits(b_cached, b_full, ones, tol_b, rates=False),
        }
        close = all(c.passed for c in checks.values())
        all_close &= close
        cells = " | ".join(f"{c.comparison.max_abs:>11.3e} {'ok' if c.passed else 'FAIL':>7}" for c in checks.values())
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
    results.extra["steps"] = steps
    for label, spec, engine, key in (("A", specs[0], pair[0], "a_vs_ref"), ("B", specs[1], pair[1], "b_vs_ref")):
        tol = utils.engine_tolerance(engine, run.checkpoint.config)
        if hasattr(tol, "top1"):  # distribution judge: teacher-forced top-1 / top-5 agreement over every step
            top1 = sum(s[key]["top1_agreement"] for s in steps) / len(steps)
            top5 = sum(s[key]["top5_containment"] for s in steps) / len(steps)
            ok = top1 >= tol.top1 and top5 >= tol.top5
            all_close &= ok
            results.add("all_steps", f"{key}_top1_agreement", top1, unit="fraction")
            results.add("all_steps", f"{key}_top5_agreement", top5, unit="fraction")
            print(f"engine {label} ({spec}, {tol.name}): teacher-forced top-1 agreement {top1:.3f} (>= {tol.top1}), "
                  f"top-5 agreement {top5:.3f} (>= {tol.top5}) -> {'ok' if ok else 'FAIL'}")
    for label, spec, key in (("A", specs[0], "a_cache"), ("B", specs[1], "b_cache")):
        bad = [s["step"] for s in steps if not s[key]["passed"]]
        if bad:
            print(f"engine {label} ({spec}): its cached logits differ from its own no-cache forward from step "
                  f"{bad[0]} on: a KV-cache bug, not kernel rounding")
    print(f"\nverdict: {'PASS: every step CLOSE' if all_close else 'FAIL: some steps NOT_CLOSE'}")
    return results.finish(all_close, args.json)


if __name__ == "__main__":
    sys.exit(cli.run(main))
