"""Intermediate validation, layer by layer: where does the candidate first diverge from HF Transformers, and
which component is wrong? (test/models/llama/test_intermediate_validation.py is its shell.)

Both models run one no-cache forward; the tensors at every capture point (kitcore.points, e.g.
`layers.3.q_rope`) are compared with the candidate dtype's tolerance ("total error"). The forwards advance
together a layer at a time: each layer's points are compared and dropped before the next layer runs.

The dual test: each component of the candidate is also run on the reference's own captured input and
compared with the reference's output ("own error"). A component whose own error is out of tolerance ADDS
error (it is wrong itself); one whose total error fails but own error passes only INHERITS error.

A sparse MoE layer (Qwen3-MoE) adds the router's points. Expert sets are judged near-tie-aware
(judges.judge_expert_sets): where a token's k-th and (k+1)-th reference router logits are closer than a
correct engine's router error may be (the peer's, calibrated), another set is admissible. A token that the
candidate or the peer routes to another admissible set is left out of every later total error of its row
(its later tensors legitimately differ); its own errors are still judged, and the output counts such tokens.

An engine that captures only some points (it declares `captured_points`) is compared on those: its first
divergence lies between the last point that agreed and the first that did not, and the points it does not hand
out are listed. `--engines A,B` validates both against the reference in one pass and compares them point by
point: where their distance exceeds what each may be off by (the sum of their bounds), they part, and the
reference says which of the two left it.

RoPE: the candidate's rotation is checked against analytic references at small positions and at the end of
max_position_embeddings, in both layouts, so the interleaved-vs-half-split mistake is named. When
q_proj/k_proj diverge, the kit also tests whether their output rows are a per-head layout permutation of the
reference's (a GGUF-style weight permutation applied or omitted).
"""

import contextlib
import io
import math
from dataclasses import replace

import torch

from . import controls, judges, protocol, rope
from .compare import OWN_TOLERANCES, SHAPE, TOLERANCES, Tolerance, compare
from .errors import Unavailable, UsageError
from .points import HEADS_FIRST, component_inputs, is_sparse, point_order
from .results import Results
from .verdict import Verdict

SCRIPT = "test_intermediate_validation"
ROPE_POSITIONS = 16
COMMON_THETAS = (10000.0, 100000.0, 500000.0, 1000000.0, 5000000.0, 10000000.0)


def add_args(parser):
    parser.add_argument("--engines", help="A,B: validate two engines and say where they part (default: --engine)")
    parser.add_argument("--max_capture_mb", type=float, default=1024,
                        help="for engines without capture_layers(): memory for captured activations of every "
                             "model; their layers are captured in chunks that fit (default 1024)")


def engine_specs(args):
    """The engines under test: [--engine], or --engines A,B (two engines that capture; not the reference)."""
    if not args.engines:
        return None
    specs = args.engines.split(",")
    if len(specs) != 2 or not all(specs) or "reference" in specs or specs[0] == specs[1]:
        raise UsageError(f"--engines {args.engines!r}: expected two different engines, e.g. llama.cpp,hf")
    return specs


def rope_tolerance(dtype, max_position):
    """The dtype's tolerance plus what float32 angles cost: every implementation rounds pos * inv_freq in
    float32, an error of about pos * 2^-24 radians, which at the end of a long context exceeds the
    float32 tolerance itself (4e-4 at position 4096; HF's own rotation is that far from the exact one)."""
    base = OWN_TOLERANCES[dtype]
    angle = 2 * max_position * 2.0**-24
    return Tolerance(base.rtol, base.atol_rms + angle, base.nmse + angle**2)


def _rotations(engine, x, dtype, device, max_pos):
    """The engine's rotation of x at positions [0, 16) and at the last 16 positions of the context."""
    out = []
    for start in (0, max_pos - ROPE_POSITIONS):
        pos = torch.arange(start, start + ROPE_POSITIONS)[None]
        out.append((engine.rope(x.to(device.torch_device, dtype), pos.to(device.torch_device)), pos))
    return out


def check_rope(engine, config, hf_config, dtype, device, seed):
    """The candidate's RoPE against the analytic half-split (HF) and interleaved layouts; scaled variants
    (llama3, yarn ...) take the reference config's frequencies."""
    theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    max_pos = config.get("max_position_embeddings", 2048)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, ROPE_POSITIONS, head_dim, generator=g)
    inv_freq, scale = rope.scaled_frequencies(hf_config)
    rotations = _rotations(engine, x, dtype, device, max_pos)
    cases = {}
    for label, (got, pos) in zip(("small", "large"), rotations):
        start = int(pos[0, 0])
        tol = rope_tolerance(dtype, start + ROPE_POSITIONS)
        half = compare(got, rope.rope_half(x, pos, theta, inv_freq, scale), tol,
                       f"rope {label} positions vs half-split")
        inter = compare(got, rope.rope_interleaved(x, pos, theta, inv_freq, scale), tol,
                        f"rope {label} positions vs interleaved")
        cases[label] = (start, half, inter)
    passed = all(half.passed for _, half, _ in cases.values())
    if passed:
        diagnosis = "matches the half-split (NeoX) rotation at small and large positions"
    elif all(inter.passed for _, _, inter in cases.values()):
        diagnosis = ("the candidate rotates in the INTERLEAVED (GPT-J) layout, HF uses HALF-SPLIT (NeoX): "
                     "pair dimension i with i + head_dim/2, or permute the q/k weight rows")
    else:
        diagnosis = f"matches neither layout with rope_theta {theta:g} (head_dim {head_dim})"
        for other in COMMON_THETAS if inv_freq is None else ():
            if other != theta and all(
                    compare(got, rope.rope_half(x, pos, other), rope_tolerance(dtype, max_pos)).passed
                    for got, pos in rotations):
                diagnosis = f"the candidate rotates with rope_theta {other:g}, the reference uses {theta:g}"
    return passed, diagnosis, cases


def layout_permutation(cand, ref, n_heads, dtype):
    """Name the layout mistake when the candidate's projection rows are a per-head permutation."""
    if compare(cand, rope.half_to_interleaved_rows(ref, n_heads), dtype).passed:
        return "rows are the reference's permuted half-split -> interleaved (a GGUF-style permutation was applied)"
    if compare(rope.half_to_interleaved_rows(cand, n_heads), ref, dtype).passed:
        return "rows are the reference's permuted interleaved -> half-split (a layout permutation was omitted)"
    return None


def layers_per_capture(config, tokens, max_capture_mb, models=2):
    """How many layers' activations of `models` models (float32, on the CPU) fit in the capture budget."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    mlp = 3 * config["intermediate_size"]
    if config.get("num_experts"):  # router logits and weights, the selected experts' outputs, the block's output
        mlp = max(mlp, 2 * config["num_experts"] + (config["num_experts_per_tok"] + 1) * hidden)
    per_layer = models * 4 * tokens * (7 * hidden + 4 * q + 4 * kv + mlp)
    return max(1, min(config["num_hidden_layers"], int(max_capture_mb * 2**20 // per_layer)))


def tensor_judge(judge):
    """The judge of single tensors: a distribution judge (a MoE model in reduced precision, judged end to end by
    its token distributions) becomes its dtype's tensor table here."""
    return replace(judge, table=TOLERANCES[judge.dtype]) if judge.distribution else judge


def _tokens(point, tensor, keep):
    """`tensor` of `point` on the tokens `keep` (an index tensor) only; None keeps every token."""
    if tensor is None or keep is None:
        return tensor
    return tensor.index_select(2 if point in HEADS_FIRST else 1, keep)


class Row:
    """What one row's validation carries from point to point: the models' captures of the current layer, the
    engines of the dual test, the judge, and the tokens left out of total errors (rerouted at a near tie)."""

    def __init__(self, run, cand, peer, dual, judge, ids, pos, results, own_only, other=None):
        self.config = run.reference_checkpoint.config
        self.seen = protocol.declared(cand, "captured_points")  # None: every point
        self.other = other  # engine B of --engines A,B, and its judge
        # engine B is calibrated by the peer wherever it computes in the peer's precision, the peer itself included:
        # its bound is then k x the peer's error, not the table's
        self.other_judge = None if other is None else tensor_judge(judges.judge_for(
            other, run.checkpoint.model_type, calibrated=peer is not None and (
                protocol.declared(other, "judged_dtype") or other.dtype) == peer.dtype))
        self.parted = None  # the first point where A and B part
        self.n_layers = self.config["num_hidden_layers"]
        self.cand, self.peer, self.judge, self.ids, self.pos, self.results = cand, peer, judge, ids, pos, results
        self.dual_engines = (cand, peer, run.reference_components) if dual else None
        self.own_only = own_only
        self.rerouted = set()  # token positions
        self.own_rerouted = set()  # tokens the candidate's router, on the reference's logits, routes elsewhere
        self.near_ties = 0
        self.captures = ({}, {}, None, None)

    def unseen(self, point):
        """Whether the candidate does not hand out this kind of point (it declares the ones it does)."""
        return self.seen is not None and point not in self.seen

    def keep(self):
        """The tokens every total error is taken on (None: all of them)."""
        if not self.rerouted:
            return None
        return torch.tensor([t for t in range(self.ids.shape[1]) if t not in self.rerouted])


def check_point(row, layer, point, name):
    """Total error of one point and, with a dual-test engine, its own error (the component on the reference's
    input), each judged by the row's judge (own errors by the own-error table, or calibrated by the peer's own
    error at the same component): one printed table row."""
    reference, candidate, peer, _ = row.captures
    out = {"layer": layer, "point": name}
    if row.unseen(point) and row.dual_engines is None:
        out["status"] = "not seen"
        print(f"{name:<36} {'-':>10} {'-':>10} {'-':>9} | {'-':>10} {'-':>10} {'-':>9} | not seen (the engine does "
              "not hand it out)")
        return out
    if point == "experts_selected":
        return check_expert_sets(row, layer, name, out)
    if (row.own_only or row.unseen(point)) and name in reference and name not in candidate:
        own = own_error(row, layer, point, name)
        out.update(own=own.as_dict(), status=judges.point_status(None, own))
        _print_point(name, None, own, out["status"])
        _record(row.results, name, layer, point, None, own)
        return out
    if name not in reference or name not in candidate:
        side = "reference" if name not in reference else "candidate"
        out.update(status="MISSING", reason=f"missing on the {side} side")
        print(f"{name:<36} {'-':>10} {'-':>10} {'-':>9} | {'-':>10} {'-':>10} {'-':>9} | FAIL: missing on the {side} side")
        return out
    keep = row.keep()
    total = judges.judge_tensor(_tokens(point, candidate[name], keep), _tokens(point, reference[name], keep),
                                row.judge, _tokens(point, peer and peer.get(name), keep), name)
    own = None
    if row.dual_engines is not None:
        own = own_error(row, layer, point, name)
        out["own"] = own.as_dict()
        total = judges.total_by_floor(total, own, row.judge)
    out["total"] = total.as_dict()
    out["status"] = judges.point_status(total, own)
    if total.failure == SHAPE:
        out["reason"] = total.reason
    _print_point(name, total, own, out["status"])
    _record(row.results, name, layer, point, total, own)
    if row.other is not None:
        check_other(row, layer, point, name, out, total)
    return out


def _limit(c):
    """The nmse a comparison allowed: the calibrated bound, or the table's."""
    return c.limit_nmse if c.judge in ("calibrated", "input_rounding") else c.tolerance.nmse


def check_other(row, layer, point, name, out, total):
    """Engine B at this point: its total error (its own judge), and its distance from A against the sum of what
    each may be off by (sqrt(nmse bound) A + B): beyond it the two part, and at most one of them is right."""
    reference, candidate, peer, other = row.captures
    if name not in other or name not in reference:
        return
    keep = row.keep()
    ref, a, b = (_tokens(point, x[name], keep).double() for x in (reference, candidate, other))
    judged = judges.judge_tensor(b, ref, row.other_judge,
                                 _tokens(point, peer.get(name), keep) if peer and row.other_judge.calibrated else None,
                                 name + " (B)")
    apart = float((a - b).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))
    bound = (_limit(total) ** 0.5 + _limit(judged) ** 0.5) ** 2
    parted = apart > bound
    out["b_total"] = judged.as_dict()
    out["a_vs_b"] = {"nmse": apart, "bound": bound, "parted": parted}
    if parted and row.parted is None:
        left = [label for label, c in (("A", total), ("B", judged)) if not c.passed]
        row.parted = (name, left)
    print(f"{'':<36} B {judged.max_abs:>10.3e} {judged.nmse:>10.2e} {'':>9} | A vs B nmse {apart:.2e}, bound "
          f"{bound:.2e}{' PARTED' if parted else ''} | B {'ok' if judged.passed else 'FAIL: ' + judged.reason}")
    row.results.add(name, "b_nmse", judged.nmse, layer=layer, point=point)
    row.results.add(name, "a_vs_b_nmse", apart, layer=layer, point=point)


def _print_point(name, total, own, status):
    def figures(c):
        return f"{c.max_abs:>10.3e} {c.nmse:>10.2e} {_ratio(c):>9}" if c else f"{'-':>10} {'-':>10} {'-':>9}"
    print(f"{name:<36} {figures(total)} | {figures(own)} | {status}")


def _record(results, name, layer, point, total, own):
    if total:
        results.add(name, "max_abs", total.max_abs, layer=layer, point=point)
        results.add(name, "cosine", total.cosine, layer=layer, point=point)
        results.add(name, "nmse", total.nmse, layer=layer, point=point)
        if total.judge == "calibrated":
            results.add(name, "peer_nmse", total.peer_nmse, layer=layer, point=point)
    if own:
        results.add(name, "own_max_abs", own.max_abs, layer=layer, point=point)
        results.add(name, "own_nmse", own.nmse, layer=layer, point=point)
        if own.judge == "calibrated":
            results.add(name, "own_peer_nmse", own.peer_nmse, layer=layer, point=point)


def own_error(row, layer, point, name):
    """The component run by the candidate (and the peer) on the reference's own input, judged
    (kitcore.judges.judge_own; without a peer, the reference engine gives the input-rounding floor). The
    routing weights are compared on the tokens whose own expert set is the reference's."""
    reference = row.captures[0]
    cand, peer, reference_engine = row.dual_engines
    inputs = component_inputs(reference, row.config, layer, point, row.ids)
    got = cand.run_component(point, layer, inputs, row.pos)
    peer_got = peer.run_component(point, layer, inputs, row.pos) if peer else None
    expected = reference[name]
    if point == "routing_weights" and row.own_rerouted:
        keep = torch.tensor([t for t in range(row.ids.shape[1]) if t not in row.own_rerouted])
        got, peer_got, expected = (_tokens(point, t, keep) for t in (got, peer_got, expected))
    rounded = None if peer is not None or reference_engine is None or point == "routing_weights" else (
        lambda: reference_engine.run_component(point, layer, judges.rounded_inputs(inputs, row.judge.dtype), row.pos))
    return judges.judge_own(got, expected, row.judge, peer_got, rounded, name + " (own)")


def check_expert_sets(row, layer, name, out):
    """A sparse layer's expert sets: the total (each model's own router inputs, on the tokens not rerouted
    before) and the dual test's (the candidate's top-k on the reference's router logits); tokens the candidate
    or the peer routes to another admissible set are left out of every later total error."""
    reference, candidate, peer, other = row.captures
    logits_name = f"layers.{layer}.router_logits"
    ref_sets, ref_logits = reference[name][0], reference[logits_name][0].double()
    kept = [t for t in range(ref_sets.shape[0]) if t not in row.rerouted]
    total = None
    if name in candidate:
        peer_logits = peer[logits_name][0, kept] if peer and row.judge.calibrated and logits_name in peer else None
        margin = judges.router_margin(ref_logits[kept], row.judge.dtype, peer_logits,
                                      None if peer_logits is not None else TOLERANCES[row.judge.dtype])
        total = judges.judge_expert_sets(candidate[name][0, kept], ref_sets[kept], ref_logits[kept], margin, name,
                                         "calibrated" if peer_logits is not None else "table")
        row.near_ties += total.near_ties
        rerouted = {kept[t] for t in total.rerouted}
        for side in (peer, other):  # the peer's and engine B's other admissible sets leave their tokens too
            if side and name in side and side[name].shape == reference[name].shape:
                rerouted |= {kept[t] for t in (side[name][0, kept] != ref_sets[kept]).any(-1).nonzero().flatten().tolist()}
        row.rerouted |= rerouted
        out["total"] = total.as_dict()
    elif not row.own_only:
        out.update(status="MISSING", reason="missing on the candidate side")
        print(f"{name:<36} FAIL: missing on the candidate side")
        return out
    own = None
    if row.dual_engines is not None:
        got = row.cand.run_component("experts_selected", layer,
                                     component_inputs(reference, row.config, layer, "experts_selected", row.ids),
                                     row.pos).cpu()[0]
        own = judges.judge_expert_sets(got, ref_sets, ref_logits, judges.router_margin(ref_logits, row.judge.dtype),
                                       name + " (own)", "rounding")
        row.own_rerouted = set(own.rerouted)
        out["own"] = own.as_dict()
    out["status"] = judges.point_status(total, own)

    def figures(s):
        return (f"sets: {s.not_admissible} of {s.tokens} not admissible, {s.near_ties} near tie(s), "
                f"{len(s.rerouted)} rerouted" if s and s.failure != SHAPE else (s.reason if s else "-"))
    print(f"{name:<36} {figures(total)} | own {figures(own)} | {out['status']}")
    for label, s in (("", total), ("own_", own)):
        if s is not None:
            row.results.add(name, label + "sets_not_admissible", s.not_admissible, layer=layer, point="experts_selected")
            row.results.add(name, label + "near_ties", s.near_ties, layer=layer, point="experts_selected")
    return out


def largest_own_error(rows):
    """The component whose own error stands out most: own NMSE over the peer's own NMSE at the same
    component (calibrated), else over the median own NMSE of that component kind across layers."""
    owns = [r for r in rows if "nmse" in (r.get("own") or {})]
    if not owns:
        return None
    by_kind = {}
    for r in owns:
        by_kind.setdefault(r["point"].split(".")[-1], []).append(r["own"]["nmse"])

    def score(r):
        own = r["own"]
        if own["judge"] == "calibrated":  # an exact peer (float32 on the CPU): any own error is infinitely more
            ratio = own["nmse"] / own["peer_nmse"] if own["peer_nmse"] > 0 else (math.inf if own["nmse"] else 1.0)
            return ratio, "the peer's own error there"
        values = sorted(by_kind[r["point"].split(".")[-1]])
        return own["nmse"] / max(values[len(values) // 2], 1e-300), "the median of that component across layers"

    worst = max(owns, key=lambda r: (score(r)[0], r["own"]["nmse"]))
    ratio, baseline = score(worst)
    return {"layer": worst["layer"], "point": worst["point"].split(".")[-1], "name": worst["point"],
            "nmse": worst["own"]["nmse"], "ratio": ratio, "baseline": baseline}


def _ratio(c):
    """RMS error over the peer's (the figure k bounds), or over the input-rounding floor's (marked ~), or '-'
    for the table."""
    if c.judge not in ("calibrated", "input_rounding"):
        return "-"
    mark = "~" if c.judge == "input_rounding" else ""
    return (f"{(c.nmse / c.peer_nmse) ** 0.5:.2f}" if c.peer_nmse > 0 else ("1.00" if c.nmse == 0 else "inf")) + mark


def own_only_captures(engine, ids, pos, n_layers):
    """An engine without capture(): nothing per layer, and at the last layer its final hidden states where
    it hands them out (final_hidden(), e.g. InfiniLM's forward_raw)."""
    for _ in range(n_layers - 1):
        yield {}
    yield {"final_norm": engine.final_hidden(ids, pos)} if "final_hidden" in protocol.capabilities(engine) else {}


def validate_row(run, cand, ids, pos, judge, peer, dual, results, verdict, other=None):
    """Every capture point of one unpadded row [1, S] of engine `cand` (and engine B, `other`), a layer of every
    model at a time, each an outcome of `verdict`: its printed table rows, the first failing point (layer, point,
    name, row, layout finding, the last point that agreed) or None, the row's near-tie and rerouted tokens, and
    where A and B part."""
    config = run.reference_checkpoint.config
    n_layers = config["num_hidden_layers"]
    own_only = "capture" not in protocol.capabilities(cand)
    models = [m for m in (run.reference, cand, peer, other) if m is not None]
    capturing = [m for m in models if not (own_only and m is cand)]
    chunk = layers_per_capture(config, ids.shape[1], run.args.max_capture_mb, models=len(capturing))
    chunked = [m for m in capturing if "capture_layers" not in protocol.capabilities(m)]
    if chunked and chunk < n_layers:
        print(f"note: {', '.join(type(m).__name__ for m in chunked)} has no capture_layers(): capturing {chunk} "
              f"layer(s) at a time to stay within --max_capture_mb {run.args.max_capture_mb}, each chunk's "
              "forward from layer 0")
    print(f"\n{'point':<36} {'max abs':>10} {'nmse':>10} {'vs peer':>9} | {'own maxabs':>10} {'own nmse':>10} "
          f"{'vs peer':>9} | status")
    row = Row(run, cand, peer, dual, judge, ids, pos, results, own_only, other)
    points, first, last_agreeing = [], None, None
    previous_output = {}  # the reference's output of the previous layer: this layer's input
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(contextlib.closing(
            own_only_captures(m, ids, pos, n_layers) if own_only and m is cand
            else protocol.layer_captures(m, ids, pos, n_layers, chunk))) for m in models]
        for i in range(n_layers):
            captured = iter([next(s, {}) for s in sources])
            reference, candidate = {**previous_output, **next(captured)}, next(captured)
            row.captures = (reference, candidate, next(captured) if peer else None, next(captured) if other else None)
            for layer, point, name in point_order(config, range(i, i + 1)):
                found = check_point(row, layer, point, name)
                points.append(found)
                if found["status"] == "not seen":
                    continue
                if "b_total" in found:
                    verdict.add(name + " (B)", found["b_total"]["passed"], f"{name} (engine B): "
                                + (found["b_total"]["reason"] or "out of bounds"))
                failed = not verdict.add(name, found["status"] == "ok", f"{name}: {found['status']}")
                results.add(name, "passed", not failed, unit="bool", layer=layer, point=point)
                if failed and first is None:
                    layout = None
                    if point in ("q_proj", "k_proj") and name in candidate:
                        heads = config["num_attention_heads"] if point == "q_proj" else config["num_key_value_heads"]
                        layout = layout_permutation(candidate[name], reference[name], heads, run.dtype)
                    finding = f"{name}: {layout} -- the interleaved-vs-half-split RoPE layout mistake" if layout else None
                    if finding is None and "ranks_of" in protocol.capabilities(cand) and name in candidate:
                        finding = rank_finding(name, candidate[name], reference[name], cand.ranks_of(name))
                    if finding is None and name in candidate:
                        finding = bias_finding(name, candidate[name], reference[name], run.reference_checkpoint)
                    first = (layer, point, name, found, finding, last_agreeing)
                if not failed and first is None:
                    last_agreeing = name
            output = f"layers.{i}.output"
            previous_output = {output: reference[output]} if output in reference else {}
    return points, first, (row.near_ties, len(row.rerouted)), row.parted


def _nmse(a, b):
    return float((a.double() - b.double()).pow(2).sum() / b.double().pow(2).sum().clamp_min(1e-300))


def rank_finding(name, candidate, reference, ranks):
    """Which rank's share of a point is off (`ranks` from the engine's ranks_of: ("computed", [(rank, index)]), each
    rank's elements as `tensor[index]`); for a replicated point the ranks hold differently (("held", [(rank, its
    tensor)])), whether their tensors sum to the reference while none alone is close (partial sums never all-reduced:
    the sum at least 1000x closer than the closest rank); None otherwise."""
    if not ranks:
        return None
    kind, shares = ranks
    if kind == "held":
        alone = min(_nmse(part, reference) for _, part in shares)
        summed = _nmse(sum(part.double() for _, part in shares), reference)
        if summed < 1e-3 * alone:
            return (f"{name}: the ranks hold different tensors that sum to the reference (nmse {summed:.1e}; the "
                    f"closest rank alone {alone:.1e}): partial sums never all-reduced")
        return None
    errors = {rank: _nmse(candidate[index], reference[index]) for rank, index in shares
              if candidate[index].numel()}
    if not errors:
        return None
    worst = max(errors, key=errors.get)
    shown = ", ".join(f"rank {r} nmse {e:.2e}" for r, e in errors.items())
    return f"{name} by rank: {shown}: rank {worst}'s share is the furthest off"


BIAS_OF = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}


def bias_finding(name, candidate, reference, checkpoint):
    """Whether a projection's error is a multiple of its bias on every token (what a bias added on each rank of a
    row-parallel layer, or added twice, leaves): the multiple, when the rest is under 1% of the error; else None."""
    layer, _, point = name.removeprefix("layers.").partition(".")
    tensor = f"model.layers.{layer}.{BIAS_OF.get(point)}.bias"
    if point not in BIAS_OF or tensor not in checkpoint.tensors:
        return None
    bias = checkpoint.load_tensors([tensor])[tensor].double()
    error = (candidate.double() - reference.double()).reshape(-1, bias.numel())
    times = float((error @ bias).mean() / bias.pow(2).sum().clamp_min(1e-300))
    rest = float((error - times * bias).pow(2).sum() / error.pow(2).sum().clamp_min(1e-300))
    if rest > 1e-2 or abs(times) < 0.5:
        return None
    added = round(times) + 1
    what = ("never added" if added == 0 else f"added {added} times (a row-parallel bias added on every rank?)"
            if added > 1 else f"scaled by {times + 1:.2f}")
    return f"{name} is off by {times:.2f}x its bias on every token (the rest {rest:.1e} of the error): the bias {what}"


def validate_rows(run, judge, peer, dual, verdict, cand=None, results=None, other=None):
    """Every row of the batch, without its padding, of `cand` (default: the candidate; with engine B `other`),
    each point an outcome of `verdict`: its points, the first failing one (row first), the near-tie and rerouted
    token counts, and the first point where A and B part (row first)."""
    cand, results, inp = cand or run.candidate, results or run.results, run.inputs
    batch = inp.input_ids.shape[0]
    rows, first, near_ties, rerouted, parted = [], None, 0, 0, None
    for r in range(batch):
        one = inp.row(r)
        if batch > 1:
            print(f"\n== row {r} of {batch} ({one.input_ids.shape[1]} tokens)")
        row_points, row_first, (near, moved), row_parted = validate_row(
            run, cand, one.input_ids, one.position_ids, judge, peer, dual,
            results if batch == 1 else results.labelled(row=r), verdict, other)
        if row_parted is not None and parted is None:
            parted = (r, *row_parted)
        rows += [{**p, "row": r} for p in row_points] if batch > 1 else row_points
        near_ties, rerouted = near_ties + near, rerouted + moved
        if row_first is not None and first is None:
            first = (r, *row_first)
    return rows, first, (near_ties, rerouted), parted


def findings_of(rows, first, batched, routing=None, coarse=False):
    """The summary lines: the first divergence (and a layout finding; for an engine that hands out only some
    points, the last point that agreed before it and the points not seen), the largest own error, the components
    that add error and how many only inherit it, the near-tie tokens of a MoE model."""
    findings = []
    unseen = sorted({r["point"].split(".")[-1] for r in rows if r["status"] == "not seen"})
    if first is not None:
        r, layer, point, name, row_, finding, agreed = first
        where = f"between {agreed} (the last point that agreed) and {name}" if coarse and agreed else name
        findings.append(f"first divergence: {where}" + (f" in row {r}" if batched else "")
                        + f" ({row_['status']}; {row_.get('reason') or 'out of tolerance'})")
        if finding:
            findings.append(finding)
    worst_own = largest_own_error(rows)
    if worst_own is not None:
        scale = ("the peer's own error there is 0" if math.isinf(worst_own["ratio"])
                 else f"{worst_own['ratio']:.1f}x {worst_own['baseline']}")
        findings.append(f"largest own error: {worst_own['name']} (nmse {worst_own['nmse']:.3e}, {scale})")
    adders = [r["point"] + (f" (row {r['row']})" if "row" in r else "") for r in rows if r["status"] == "FAIL: ADDS error"]
    inheritors = [r["point"] for r in rows if r["status"] == "FAIL: inherits error"]
    if adders:
        findings.append(f"components that add error: {', '.join(adders)}")
    if inheritors:
        findings.append(f"{len(inheritors)} later point(s) only inherit error")
    if unseen:
        findings.append(f"not seen (the engine does not hand them out): {', '.join(unseen)}")
    floored = [r["point"] for r in rows if (r.get("own") or {}).get("judge") == "input_rounding"]
    if floored:
        findings.append(f"judged by their input-rounding floor (~: outside the own-error table, but as close as "
                        f"the inputs rounded to the dtype allow; an own error below k x that floor is not seen "
                        f"there): {', '.join(floored)}")
    if routing is not None:
        near, moved = routing
        findings.append(f"router near ties: {near} token-layer(s) whose k-th/(k+1)-th router logits are closer than a "
                        f"correct engine's router error; {moved} token(s) routed to another admissible expert set by "
                        "the candidate or the peer, left out of the later total errors of their row (their own "
                        "errors judged)")
    return findings, worst_own


def validate_rope(run, cand):
    """The RoPE check's record, finding and verdict, or (None, None, True) for an engine without rope()."""
    if "rope" not in protocol.capabilities(cand):
        print(f"note: engine {candidate_spec(run)!r} has no rope(): the RoPE validation is skipped")
        return None, None, True
    config = run.reference_checkpoint.config
    rope_ok, diagnosis, cases = check_rope(cand, config, run.reference.config, run.dtype, run.device, run.args.seed)
    record = {"passed": rope_ok, "diagnosis": diagnosis,
              **{label: {"start": start, "half_split": h.as_dict(), "interleaved": i.as_dict()}
                 for label, (start, h, i) in cases.items()}}
    for label, (start, h, _) in cases.items():
        run.results.add(f"rope_{label}", "max_abs", h.max_abs, position_start=start)
    run.results.add("rope", "passed", rope_ok, unit="bool")
    return record, f"RoPE: {'PASS' if rope_ok else 'FAIL'} -- {diagnosis}", rope_ok


def candidate_spec(run):
    """The candidate's --engine, or engine A of --engines A,B."""
    return run.args.engines.split(",")[0] if run.args.engines else run.args.engine


def capabilities_note(run):
    """Whether the candidate can be validated layer by layer (Unavailable if not), and the dual test's flag."""
    offered, engine = protocol.capabilities(run.candidate), candidate_spec(run)
    if "capture" not in offered:
        if "run_component" not in offered:
            raise Unavailable(f"engine {engine!r} does not implement capture(), which intermediate validation "
                              "needs (or run_component() alone, for the dual test; see the engine protocol in "
                              "tools/kitcore/protocol.py)")
        print(f"note: engine {engine!r} hands out no per-layer activations (no capture()): each component "
              "runs on the reference's own inputs (the dual test, own error only)"
              + ("; its final hidden states give the total error at final_norm" if "final_hidden" in offered else ""))
    dual = "run_component" in offered
    if not dual:
        print(f"note: engine {engine!r} has no run_component(): the dual test (own error) is skipped")
    return dual


def check(run):
    """The whole check on an open Session: its verdict's exit code."""
    cand = run.candidate
    dual = capabilities_note(run)
    peer, judge = run.peer_for(cand), tensor_judge(run.judge(cand))
    print(f"judged by {judge.describe()}; own errors by the own-error table" + (", calibrated the same way" if peer else ""))
    other = list(run.engines.values())[1] if len(run.engines) > 1 else None
    if other is not None:
        protocol.require(other, "capture", run.args.engines.split(",")[1], "engine B of --engines A,B")
    verdict = Verdict()
    rows, first, routing, parted = validate_rows(run, judge, peer, dual, verdict, other=other)
    batched = run.inputs.input_ids.shape[0] > 1
    sparse = any(is_sparse(run.reference_checkpoint.config, i)
                 for i in range(run.reference_checkpoint.config["num_hidden_layers"]))
    coarse = protocol.declared(cand, "captured_points") is not None
    findings, worst_own = findings_of(rows, first, batched, routing if sparse else None, coarse)
    for name, rank, holder in protocol.declared(cand, "replicated_differences") or ():
        message = f"{name} is replicated across ranks, and rank {rank}'s differs from rank {holder}'s"
        verdict.add(f"{name} replicated", False, message)
        findings.append(message)
    if other is not None:
        findings.append(parting(run, parted, batched))
    rope_record, rope_finding, rope_ok = validate_rope(run, cand)
    if rope_record is not None:
        verdict.add("rope", rope_ok, rope_finding)
        findings.append(rope_finding)
    print()
    for f in findings:
        print(f)
    run.results.extra.update(
        first_divergence=None if first is None else {"layer": first[1], "point": first[2],
                                                      **({"row": first[0]} if batched else {})},
        largest_own_error=worst_own, points=rows, rope=rope_record, findings=findings,
        **({"parted": None if parted is None else {"point": parted[1], "left": parted[2],
                                                   **({"row": parted[0]} if batched else {})}}
           if other is not None else {}),
        **({"router_near_ties": routing[0], "rerouted_tokens": routing[1]} if sparse else {}))
    sensitivity = run.controls(control_call(run, judge, peer, dual), control_judge(run)) if run.args.controls else None
    return run.finish(verdict, [sensitivity])


def parting(run, parted, batched):
    """The finding line of --engines A,B: where the two part and which left the reference."""
    a, b = run.args.engines.split(",")
    if parted is None:
        return f"A ({a}) and B ({b}) do not part: at every point their distance is within what each may be off by"
    r, name, left = parted
    who = {(): "neither fails by itself there (their errors point in opposite directions)",
           ("A",): f"A ({a}) left the reference there, B stays within its bound",
           ("B",): f"B ({b}) left the reference there, A stays within its bound",
           ("A", "B"): "both left the reference there"}[tuple(left)]
    return f"A and B part first at {name}" + (f" in row {r}" if batched else "") + f": {who}"


def control_call(run, judge, peer, dual):
    """--controls: a control validated as the candidate was (its table not printed, its records dropped)."""
    def call(engine):
        verdict = Verdict()
        with contextlib.redirect_stdout(io.StringIO()):
            _, first, _, _ = validate_rows(run, judge, peer, dual, verdict, cand=engine, results=Results(SCRIPT))
        return first, verdict.passed
    return call


def control_judge(run):
    """(caught?, the first divergence, located at the control's layer?) of one control's validation."""
    n_layers = run.reference_checkpoint.config["num_hidden_layers"]

    def judged(outcome, shape):
        first, passed = outcome
        if first is None:
            return passed, "no point out of bounds", None
        _, layer, point, name, row, _, _ = first
        where = controls.expected_layer(shape, n_layers)
        located = name == "final_norm" if where == "final_norm" else layer == where
        return passed, f"first divergence {name} ({row['status']}); its bug is at " + (
            "the final norm" if where == "final_norm" else f"layer {where}"), located
    return judged
