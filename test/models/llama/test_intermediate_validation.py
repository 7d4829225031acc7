#!/usr/bin/env python3
"""Layer by layer: where does the candidate first diverge from HF Transformers, and which component is wrong?

Both models run one no-cache forward; the tensors at every capture point (names: tools/kitcore/points.py,
e.g. `layers.3.q_rope`) are compared with the candidate dtype's tolerance ("total error").

The dual test: each component of the candidate is also run on the reference's own captured input and
compared with the reference's output ("own error"). A component whose own error is out of tolerance
ADDS error (it is wrong itself); one whose total error fails but own error passes only INHERITS error
from before it.

RoPE: the candidate's rotation is checked against analytic references at small positions and at the
end of max_position_embeddings, in both layouts, so the interleaved-vs-half-split mistake is named.
When q_proj/k_proj diverge, the kit also tests whether their output rows are a per-head layout
permutation of the reference's (a GGUF-style weight permutation applied or omitted).

Exit 1 when any point, own error or RoPE check fails; a point missing on either side, or of another
shape, is a failure. `--json` includes "first_divergence": null or {"layer": N, "point": "<point>"}.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import utils  # noqa: E402
from kitcore import cli, engines  # noqa: E402
from kitcore.compare import Tolerance, compare, tolerance_for  # noqa: E402
from kitcore.points import component_inputs, point_order  # noqa: E402

SCRIPT = "test_intermediate_validation"
ROPE_POSITIONS = 16
COMMON_THETAS = (10000.0, 100000.0, 500000.0, 1000000.0, 5000000.0, 10000000.0)


def rope_tolerance(dtype, max_position):
    """The dtype's tolerance plus what float32 angles cost: every implementation rounds pos * inv_freq in
    float32, an error of about pos * 2^-24 radians, which at the end of a long context exceeds the
    float32 tolerance itself (4e-4 at position 4096; HF's own rotation is that far from the exact one)."""
    base = tolerance_for(dtype)
    angle = 2 * max_position * 2.0**-24
    return Tolerance(base.rtol, base.atol_rms + angle, base.nmse + angle**2)


def _rotations(engine, x, dtype, device, max_pos):
    """The engine's rotation of x at positions [0, 16) and at the last 16 positions of the context."""
    out = []
    for start in (0, max_pos - ROPE_POSITIONS):
        pos = torch.arange(start, start + ROPE_POSITIONS)[None]
        out.append((engine.rope(x.to(device.torch_device, dtype), pos.to(device.torch_device)), pos))
    return out


def check_rope(engine, config, dtype, device, seed):
    """The candidate's RoPE against the analytic half-split (HF) and interleaved layouts."""
    theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    max_pos = config.get("max_position_embeddings", 2048)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, ROPE_POSITIONS, head_dim, generator=g)
    rotations = _rotations(engine, x, dtype, device, max_pos)
    cases = {}
    for label, (got, pos) in zip(("small", "large"), rotations):
        start = int(pos[0, 0])
        tol = rope_tolerance(dtype, start + ROPE_POSITIONS)
        half = compare(got, utils.rope_half(x, pos, theta), tol, f"rope {label} positions vs half-split")
        inter = compare(got, utils.rope_interleaved(x, pos, theta), tol, f"rope {label} positions vs interleaved")
        cases[label] = (start, half, inter)
    passed = all(half.passed for _, half, _ in cases.values())
    if passed:
        diagnosis = "matches the half-split (NeoX) rotation at small and large positions"
    elif all(inter.passed for _, _, inter in cases.values()):
        diagnosis = ("the candidate rotates in the INTERLEAVED (GPT-J) layout, HF uses HALF-SPLIT (NeoX): "
                     "pair dimension i with i + head_dim/2, or permute the q/k weight rows")
    else:
        diagnosis = f"matches neither layout with rope_theta {theta:g} (head_dim {head_dim})"
        for other in COMMON_THETAS:
            if other != theta and all(
                    compare(got, utils.rope_half(x, pos, other), rope_tolerance(dtype, max_pos)).passed
                    for got, pos in rotations):
                diagnosis = f"the candidate rotates with rope_theta {other:g}, the reference uses {theta:g}"
    return passed, diagnosis, cases


def layout_permutation(cand, ref, n_heads, dtype):
    """Name the layout mistake when the candidate's projection rows are a per-head permutation."""
    if compare(cand, utils.half_to_interleaved_rows(ref, n_heads), dtype).passed:
        return "rows are the reference's permuted half-split -> interleaved (a GGUF-style permutation was applied)"
    if compare(utils.half_to_interleaved_rows(cand, n_heads), ref, dtype).passed:
        return "rows are the reference's permuted interleaved -> half-split (a layout permutation was omitted)"
    return None


def main(argv=None):
    args = utils.build_parser(__doc__).parse_args(argv)
    run = utils.setup(args, SCRIPT, families=("llama",))
    results, inp, cand = run.results, run.inputs, run.candidate
    engines.require(cand, "capture", args.engine, "intermediate validation")
    if inp.padded:
        print("note: a padded batch is checked on its first row only")
    ids, pos = inp.input_ids[:1], inp.position_ids[:1]
    config = run.reference_checkpoint.config
    n_layers = config["num_hidden_layers"]

    reference = run.reference.capture(ids, pos)
    candidate = cand.capture(ids, pos)
    dual = callable(getattr(cand, "run_component", None))
    if not dual:
        print(f"note: engine {args.engine!r} has no run_component(): the dual test (own error) is skipped")

    print(f"\n{'point':<36} {'max abs':>10} {'cosine':>12} {'nmse':>10} | {'own max abs':>11} {'own nmse':>10} | status")
    rows, first, worst_own, all_passed = [], None, None, True
    for layer, point, name in point_order(n_layers):
        row = {"layer": layer, "point": name}
        if name not in reference or name not in candidate:
            side = "reference" if name not in reference else "candidate"
            row.update(status="MISSING", reason=f"missing on the {side} side")
            print(f"{name:<36} {'-':>10} {'-':>12} {'-':>10} | {'-':>11} {'-':>10} | FAIL: missing on the {side} side")
        else:
            total = compare(candidate[name], reference[name], run.dtype, name)
            row["total"] = total.as_dict()
            own = None
            if dual:
                got = cand.run_component(point, layer, component_inputs(reference, layer, point, n_layers, ids), pos)
                own = compare(got, reference[name], run.dtype, name + " (own)")
                row["own"] = own.as_dict()
                if worst_own is None or own.nmse > worst_own[1]:
                    worst_own = (name, own.nmse, layer, point)
            if own is not None and not own.passed:
                status = "FAIL: ADDS error"
            elif not total.passed:
                status = "FAIL: inherits error" if own is not None else f"FAIL: {total.reason}"
            else:
                status = "ok"
            row["status"] = status
            own_cells = f"{own.max_abs:>11.3e} {own.nmse:>10.2e}" if own else f"{'-':>11} {'-':>10}"
            print(f"{name:<36} {total.max_abs:>10.3e} {total.cosine:>12.9f} {total.nmse:>10.2e} | {own_cells} | {status}")
            results.add(name, "max_abs", total.max_abs, layer=layer, point=point)
            results.add(name, "cosine", total.cosine, layer=layer, point=point)
            results.add(name, "nmse", total.nmse, layer=layer, point=point)
            if own:
                results.add(name, "own_max_abs", own.max_abs, layer=layer, point=point)
                results.add(name, "own_nmse", own.nmse, layer=layer, point=point)
            if not total.passed and "shape" in total.reason:
                row["reason"] = total.reason
        failed = row["status"] != "ok"
        results.add(name, "passed", not failed, unit="bool", layer=layer, point=point)
        if failed and first is None:
            first = (layer, point, name, row)
        all_passed &= not failed
        rows.append(row)

    findings = []
    if first is not None:
        layer, point, name, row = first
        findings.append(f"first divergence: {name} ({row['status']}; {row.get('reason') or 'out of tolerance'})")
        if point in ("q_proj", "k_proj") and name in candidate:
            heads = config["num_attention_heads"] if point == "q_proj" else config["num_key_value_heads"]
            layout = layout_permutation(candidate[name], reference[name], heads, run.dtype)
            if layout:
                findings.append(f"{name}: {layout} -- the interleaved-vs-half-split RoPE layout mistake")
    if worst_own is not None:
        findings.append(f"largest own error: {worst_own[0]} (nmse {worst_own[1]:.3e})")
    adders = [r["point"] for r in rows if r["status"] == "FAIL: ADDS error"]
    inheritors = [r["point"] for r in rows if r["status"] == "FAIL: inherits error"]
    if adders:
        findings.append(f"components that add error: {', '.join(adders)}")
    if inheritors:
        findings.append(f"{len(inheritors)} later point(s) only inherit error")

    rope = None
    if callable(getattr(cand, "rope", None)):
        rope_ok, diagnosis, cases = check_rope(cand, config, run.dtype, run.device, args.seed)
        all_passed &= rope_ok
        findings.append(f"RoPE: {'PASS' if rope_ok else 'FAIL'} -- {diagnosis}")
        rope = {"passed": rope_ok, "diagnosis": diagnosis,
                **{label: {"start": start, "half_split": h.as_dict(), "interleaved": i.as_dict()}
                   for label, (start, h, i) in cases.items()}}
        for label, (start, h, _) in cases.items():
            results.add(f"rope_{label}", "max_abs", h.max_abs, position_start=start)
        results.add("rope", "passed", rope_ok, unit="bool")
    else:
        print(f"note: engine {args.engine!r} has no rope(): the RoPE validation is skipped")

    print()
    for f in findings:
        print(f)
    results.extra.update(
        first_divergence=None if first is None else {"layer": first[0], "point": first[1]},
        largest_own_error=None if worst_own is None else {"layer": worst_own[2], "point": worst_own[3],
                                                          "nmse": worst_own[1]},
        points=rows, rope=rope, findings=findings)
    print(f"\nverdict: {'PASS' if all_passed else 'FAIL'}")
    return results.finish(all_passed, args.json)


if __name__ == "__main__":
    sys.exit(cli.run(main))
