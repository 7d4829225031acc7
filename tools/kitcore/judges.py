"""Judges: where figures become judged outcomes (a tensor, a step, a row passes or not, and why); the check's
verdict is folded from those outcomes in kitcore.verdict. Every script judges through this module.

A candidate computes in dtype D on device X; the reference is HF Transformers in float32 on the CPU.
How far from the reference may a correct candidate be? Two answers:

* calibrated (`--peer hf`, the default): a correct peer, HF Transformers in D on X reading the
  reference's checkpoint, runs on the same inputs in the same run, and every figure the verdict
  uses must stay within k times the peer's same figure plus a rounding floor f:
      RMS error       rmse_cand <= k * rmse_peer + f * rms(ref)              (per tensor)
      largest error   max_cand  <= k_el * max_peer + 2f * max|ref|           (per tensor, k_el = 12)
      RMS error       rmse_cand <= k_max * rmse_peer + f * rms(ref)          (per logits position, k_max = 6)
      KL              kl_cand   <= k^2 * kl_peer + f^2                       (KL grows with the squared error)
  where f is the rounding floor of D (ROUNDING_FLOOR). Per logits position the peer's RMS error is
  taken no lower than its 90th percentile over the positions: the error at one position moves with that
  position's attention pattern independently in two engines, and one lucky position of the peer is
  no bound (measured on SmolLM2 at 512 tokens: a correct engine needs k 3.8 per position, 1.2 per tensor).
  The machine, its kernels, thread count and the model's depth move the peer's error and the bound
  with it: nothing is extrapolated from another machine or model.
* table (`--peer none`, or no independent peer: the candidate *is* HF in D on the reference's
  checkpoint): the fixed thresholds of kitcore.compare, measured on the tiny and the real checkpoint.

Distribution judges (an engine of a number format, MoE models in reduced precision, whose router near-ties
flip discretely): an engine of a weight format kitcore.formats simulates is calibrated by HF with that format
simulated, whose KL alone sets the limits (k^2 x its own) and the decisive positions; otherwise the table's
limits stand, and a peer can only widen them to k^2 x its own figure, when this machine's rounding flips more.
A distribution statistic is never gated on a single position: KL mean, p99 and the top-1/top-5 rates need `aggregate=True` (forward validation judges the steps together),
and the p99 needs P99_MIN_POSITIONS positions (below that it is the maximum, gated as such); a rate fails on
two misses or more (one flip at a near-tie is rounding; at a decisive position it fails by itself).

Decisiveness never comes from the candidate: a logits position is decisive when the reference's
top-1/top-2 gap exceeds twice the error a correct engine may have at a logit there: DECISIVE_SIGMAS x
k x the peer's RMS error at that position (in table mode, x the RMS error the table's LOGITS_NMSE
allows), plus the rounding floor at the top logit. This is tighter than the largest
error the element gate allows, on purpose: a flip needs the two top logits to move by the gap, and a
correct engine's errors there are typical, not extreme. A top-1 flip at a decisive position fails,
also when every logit is inside the element tolerance.

Engines that return log-probabilities (`returns = "logprobs"`, kitcore.serving) are compared in that space:
the reference's and the peer's logits are log-softmaxed first, so every figure, the peer's included, is
measured with the same formula. A position the engine did not return (an all-NaN row) is left out and
counted. With only each position's top k returned (`top_k`, space "topk"), the kit sees: the logprobs of the
tokens both sides list (element figures, calibrated by the peer's on the same tokens), the top-1 at decisive
positions and the top-5 rates, and a KL over the returned tokens only (_kl_lower_bound) - a lower bound of
the true KL, reported, and gated where the judge is a distribution judge (its limits, widened to k^2 x the
peer's same lower bound); under element judges the listed logprobs already bound it. A fault that only
moves probability among the tokens it does not return stays invisible.
"""

from dataclasses import dataclass, field, replace

import torch

from . import protocol
from .compare import (CHUNK_ELEMENTS, DISTRIBUTIONS, LOGITS_NMSE, NON_FINITE, OUT_OF_BOUNDS, OWN_TOLERANCES, SHAPE,
                      TOLERANCES, UNJUDGEABLE, Distribution, compare, tolerance_for)
from .devices import dtype_name
from .errors import UsageError

# k, the factor a candidate's error may exceed the peer's by. Measured (tools/measure_tolerances.py,
# README "Verdicts") on correct engines against a peer of another implementation: hf eager vs
# hf sdpa, compile vs hf, on the tiny Llamas and SmolLM2-135M, fp32/bf16/fp16, prompts up to 512 tokens.
PEER_K = 3.0  # RMS errors and KL (as k^2)
PEER_K_MAX = 6.0  # the RMS error at one logits position, and a near-tie's router margin: noisier than the whole
# the largest element error of a tensor: an extreme value. Measured need: 3.2 (SmolLM2, the tiny Llamas),
# 10.9 on Qwen2.5-0.5B in bfloat16 (hf eager against an sdpa peer, 128 tokens, layers.22.post_attention_layernorm)
PEER_K_ELEMENT = 12.0
# the KL p99 is gated from this many positions on: below, it is the maximum, which kl_max gates
P99_MIN_POSITIONS = 100
# a position is decisive when the top-1/top-2 gap exceeds 2 x this many x the RMS error allowed there
DECISIVE_SIGMAS = 4.0

# The floor of every calibrated bound, relative to the reference's magnitude. It matters only where the
# peer's error is about zero. In bfloat16/float16 that cannot happen (every output the peer writes is
# rounded, an RMS error of ~0.6 unit roundoffs), so the floor is a quarter of a unit roundoff and the
# peer's error sets the bound. In float32 on the CPU the peer shares the reference's kernels and may be
# exact, while a correct engine that reorders its float32 sums is not (measured up to 1.8e-6 RMS, 31 unit
# roundoffs, at the capture points of SmolLM2-135M): 128 unit roundoffs.
ROUNDING_FLOOR = {torch.float64: 2.0**-53, torch.float32: 2.0**-17, torch.bfloat16: 2.0**-10,
                  torch.float16: 2.0**-13}


def rounding_floor(dtype):
    return ROUNDING_FLOOR.get(dtype, 2.0**-8)


@dataclass(frozen=True)
class Judge:
    """How one engine is judged: `table` (a Tolerance or a Distribution) and, when `calibrated`, the peer."""

    dtype: torch.dtype
    table: object
    calibrated: bool = False
    k: float = PEER_K
    peer_only: bool = False  # calibrated distribution limits come from the peer alone (a simulated format's)

    @property
    def distribution(self):
        return self.table if isinstance(self.table, Distribution) else None

    def describe(self):
        if self.distribution and self.peer_only and self.calibrated:
            d = self.distribution
            return (f"distribution, calibrated by HF with the format simulated ({d.name}): KL mean, p99, max <= "
                    f"k^2 x its (k={self.k:g}), top-1 >= {d.top1}, top-5 >= {d.top5}; decisive positions from its "
                    "error")
        if self.distribution:
            d = self.distribution
            base = (f"distribution {d.name}: KL mean <= {d.kl_mean:.2g}, p99 <= {d.kl_p99:.2g}, max <= "
                    f"{d.kl_max:.2g}, top-1 >= {d.top1}, top-5 >= {d.top5}")
            return base + (f" (widened to k^2 x the peer's where larger, k={self.k:g})" if self.calibrated else "")
        if self.calibrated:
            return (f"calibrated: k={self.k:g} (largest element: {PEER_K_ELEMENT:g}, per position: {PEER_K_MAX:g}) x "
                    f"the peer's error + the {dtype_name(self.dtype)} rounding floor")
        t = tolerance_for(self.table)
        return (f"table {dtype_name(self.dtype)}: atol {t.atol_rms:.1e} x rms + rtol {t.rtol:.1e} x |ref|, "
                f"nmse <= {t.nmse:.1e}")


def judge_for(engine, model_type, calibrated, by_format=False):
    """The Judge of an engine: its dtype's element tolerances, or distribution metrics for an engine of a number
    format (`engine.format`, kitcore.formats) and for mixture-of-experts models in reduced precision; the
    precision is the engine's `judged_dtype` where it declares one (llama.cpp: the least precise of its weights
    and KV cache), else its `dtype`. `by_format`: the peer is HF with the engine's format simulated, whose error
    alone sets the KL limits (k^2 x its) and the decisive positions; else a format is judged by its measured
    table (DISTRIBUTIONS), widened by a peer in the same dtype where that rounds more."""
    moe = "moe-" if model_type == "qwen3_moe" else ""
    fmt = protocol.declared(engine, "format")
    dtype = protocol.declared(engine, "judged_dtype") or engine.dtype
    if fmt and by_format:  # uncalibrated (an engine against itself), its table, or q8_0's where it has none
        rates = replace(DISTRIBUTIONS.get(moe + fmt, DISTRIBUTIONS["q8_0"]), name=fmt)
        return Judge(dtype, rates, calibrated=True, peer_only=True)
    if fmt:
        key = moe + str(fmt)
        if key not in DISTRIBUTIONS:
            known = sorted(k for k in DISTRIBUTIONS if not k.startswith("moe-"))
            raise UsageError(f"engine {type(engine).__name__}: format {fmt!r} has no measured thresholds here "
                             f"(known: {', '.join(known)}) and no simulated peer; drop --peer none, or declare one "
                             "of kitcore.formats' formats")
        return Judge(dtype, DISTRIBUTIONS[key], calibrated)
    if moe and dtype in (torch.bfloat16, torch.float16):
        return Judge(dtype, DISTRIBUTIONS[moe + dtype_name(dtype)], calibrated)
    return Judge(dtype, TOLERANCES[dtype], calibrated)


def looser(a, b):
    """The judge of two engines compared with each other: a distribution if either has one, else the looser
    tolerance; not calibrated (the peer measures the distance to the reference, not between two candidates),
    except by a simulated format's peer, measured against the other engine (kitcore.stepwise)."""
    by_format = [j for j in (a, b) if j.peer_only]
    if by_format:  # an engine judged by its format's simulation: the other side is measured by that peer too
        return by_format[0]
    dists = [j for j in (a, b) if j.distribution]
    if dists:
        return Judge(dists[0].dtype, max((j.table for j in dists), key=lambda d: d.kl_mean))
    return max((Judge(j.dtype, tolerance_for(j.table)) for j in (a, b)), key=lambda j: j.table.nmse)


def calibrate(cand, peer, dtype, k=PEER_K, k_max=PEER_K_ELEMENT, by="calibrated"):
    """The Comparison `cand` (candidate vs reference) judged against `peer` (peer vs reference): a new
    Comparison whose verdict comes from the calibrated bounds instead of the table's. Shape, empty and
    non-finite failures stay what they are. `by` names what the peer is ("calibrated": a correct engine;
    "input_rounding": the reference on inputs rounded to the candidate dtype, judge_own)."""
    peer_figures = {"judge": by, "peer_nmse": peer.nmse, "peer_max_abs": peer.max_abs}
    if cand.failure in UNJUDGEABLE:
        return replace(cand, **peer_figures)
    f = rounding_floor(dtype)
    limit_nmse = (k * peer.nmse**0.5 + f) ** 2
    limit_max_abs = k_max * peer.max_abs + 2 * f * cand.max_abs_reference
    reasons = []
    if cand.nmse > limit_nmse:
        reasons.append(f"nmse {cand.nmse:.3e} above {limit_nmse:.2e} (k={k:g} x peer {peer.nmse:.2e})")
    if cand.max_abs > limit_max_abs:
        reasons.append(f"max abs {cand.max_abs:.3e} above {limit_max_abs:.2e} (k={k_max:g} x peer "
                       f"{peer.max_abs:.2e})")
    return replace(cand, **peer_figures, limit_nmse=limit_nmse, limit_max_abs=limit_max_abs,
                   reason="; ".join(reasons), passed=not reasons, failure=OUT_OF_BOUNDS if reasons else "")


def judge_tensor(candidate, reference, judge, peer=None, name="tensor", peer_reference=None):
    """compare() under `judge`: the table, or calibrated by `peer` (the peer's tensor) when given. The peer
    is measured against `peer_reference` where the reference it should meet differs from the candidate's
    (the MoE block's near-tie tokens, resolved for each side), else against `reference`."""
    table = judge.table if not isinstance(judge.table, Distribution) else judge.dtype
    c = compare(candidate, reference, table, name)
    if judge.calibrated and peer is not None:
        peer_reference = reference if peer_reference is None else peer_reference
        return calibrate(c, compare(peer, peer_reference, table, name), judge.dtype, judge.k)
    return c


def judge_own(got, reference, judge, peer_got=None, rounded=None, name="tensor"):
    """The dual test's own error of one component (its output on the reference's own input): calibrated by
    the peer's own error where there is a peer; else the own-error table, and, where that fails, the
    component's input-rounding floor: `rounded()` computes the reference's component on its inputs rounded to
    the candidate dtype (asked only then). A component that is ill-conditioned there (Qwen2.5's layer-0 attention: q/k biases make
    scores so large that rounding q and k to bfloat16 alone gives an NMSE of 5.8e-3, 20x the table) cannot be
    computed closer in that dtype by any engine; an own error within k x that floor is the dtype's, not the
    engine's. The floor comes from the reference alone, never from the candidate."""
    own_judge = replace(judge, table=OWN_TOLERANCES[judge.dtype])
    c = judge_tensor(got, reference, own_judge, peer_got, name)
    if c.passed or c.failure != OUT_OF_BOUNDS or c.judge == "calibrated" or rounded is None:
        return c
    return calibrate(c, compare(rounded(), reference, OWN_TOLERANCES[judge.dtype], name), judge.dtype, judge.k,
                     by="input_rounding")


def total_by_floor(total, own, judge):
    """A table-judged total error that fails where the component's own error passed by its input-rounding
    floor (judge_own): judged by the same floor, since what that component adds in this dtype is at least
    the floor, whatever came before it. Anything else stays as it is."""
    if total.passed or total.failure != OUT_OF_BOUNDS or total.judge != "table" or own.judge != "input_rounding":
        return total
    floor = replace(own, nmse=own.peer_nmse, max_abs=own.peer_max_abs)
    return calibrate(total, floor, judge.dtype, judge.k, by="input_rounding")


def rounded_inputs(inputs, dtype):
    """A component's inputs as the candidate dtype holds them, back in the reference's dtype (judge_own)."""
    return {k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@dataclass
class LogitsCheck:
    """The judged figures of one logits comparison: made by check_logits alone (the figures are filled in,
    then `passed` is decided once from reasons())."""

    comparison: object
    judge: Judge
    positions: int = 0
    top1_agreement: float = 0.0  # fraction of positions with the same argmax
    decisive_positions: int = 0  # positions whose reference top-1/top-2 gap exceeds twice the allowed error
    decisive_disagreements: int = 0  # argmax differs where the gap is decisive: a real failure
    top5_containment: float = 0.0  # each side's top-1 inside the other's top-5, both ways
    collapsed: bool = False  # the candidate predicts one token everywhere while the reference does not
    kl_mean: float = 0.0  # KL(reference || candidate) of the next-token distributions, per position
    kl_p99: float = 0.0
    kl_max: float = 0.0
    aggregate: bool = True
    kl_per_position: list = field(default_factory=list)
    position_failures: int = 0  # calibrated: positions whose RMS error exceeds the peer's bound there
    worst_position: int = -1
    peer: dict = None  # the peer's figures, when calibrated
    limits: dict = field(default_factory=dict)  # the limits the figures were judged by
    space: str = "logits"  # logits | logprobs | topk (then the KL figures are lower bounds)
    skipped_positions: int = 0  # positions the engine returned nothing for (all NaN), left out
    passed: bool = False

    @property
    def distribution(self):
        return self.judge.distribution

    def reasons(self):
        out = []
        c, d = self.comparison, self.distribution
        if c.failure in (SHAPE, NON_FINITE):
            out.append(c.reason)
        elif d is None and not c.passed:
            out.append(c.reason)
        if self.position_failures:
            out.append(f"{self.position_failures} position(s) with an RMS error above k x the peer's there "
                       f"(worst at position {self.worst_position})")
        if d is not None and self.positions:
            gates = [("KL max", self.kl_max, "kl_max")]
            if self.aggregate:
                gates.insert(0, ("KL mean", self.kl_mean, "kl_mean"))
            if self.aggregate and self.positions >= P99_MIN_POSITIONS:  # with fewer, p99 is the max
                gates.insert(1, ("KL p99", self.kl_p99, "kl_p99"))
            for label, value, key in gates:
                if value > self.limits[key]:
                    out.append(f"{label} {value:.2e} above {self.limits[key]:.2g}")
            # a rate, gated once it is more than one position: one flip at a near-tie is what rounding
            # does (a flip at a decisive position fails below), and over 27 positions it alone is 3.7%
            for label, rate, limit in (("top-1", self.top1_agreement, d.top1), ("top-5", self.top5_containment, d.top5)):
                misses = round((1 - rate) * self.positions)
                if self.aggregate and rate < limit and misses > 1:
                    out.append(f"{label} agreement {rate:.3f} below {limit} ({misses} of {self.positions} positions)")
        if self.decisive_disagreements:
            out.append(f"top-1 differs at {self.decisive_disagreements} decisive position(s)")
        if self.collapsed:
            out.append("collapse: the candidate predicts the same token at every position")
        return "; ".join(out)


def _kl(ref, cand):
    """KL(ref || cand) per position of [N, V] logits (float64)."""
    log_p = ref.log_softmax(-1)
    kl = torch.linalg.vecdot(log_p.exp(), log_p - cand.log_softmax(-1))
    return torch.where(torch.isfinite(kl), kl, torch.full_like(kl, float("inf")))


@dataclass(frozen=True)
class Space:
    """What an engine's outputs are: kind "logits", "logprobs" or "topk" (only some tokens per position), and
    `hidden`, the token ids it can never return (a server keying logprobs by a text several ids share)."""

    kind: str = "logits"
    hidden: tuple = ()


def output_space(*engines):
    """How the outputs of `engines` are compared (a Space): log-probabilities when one returns them, top k
    when one returns only some tokens per position."""
    serving = [e for e in engines if protocol.declared(e, "returns") == "logprobs"]
    hidden = tuple(sorted({i for e in serving for i in protocol.declared(e, "hidden")}))
    if any(protocol.declared(e, "top_k") or hidden for e in serving):
        return Space("topk", hidden)
    return Space("logprobs" if serving else "logits")


def _logprobs(t):
    """Logits -> log-probabilities; a tensor with NaN (a top-k engine's own output) already is one."""
    return t if bool(torch.isnan(t).any()) else t.log_softmax(-1)


def _per_position(cand, ref, peer=None, kl=True):
    """Figures per position of [N, V] scores, in float64 row chunks (a long prompt's [N, V] never exists in
    float64 whole): the reference's RMS and top-2 values, each side's top-1, each side's top-1 inside the
    other's top-5, and, with `kl`, KL(ref || cand) and the RMS errors of the candidate and the peer."""
    figures = {}
    step = max(1, CHUNK_ELEMENTS // max(ref.shape[-1], 1))
    for start in range(0, ref.shape[0], step):
        c, r = cand[start:start + step].double(), ref[start:start + step].double()
        c_top1, r_top1 = c.argmax(-1), r.argmax(-1)
        r_best = r.topk(5, dim=-1)  # its first two values are the top-2
        c_top5, r_top5 = c.topk(5, dim=-1).indices, r_best.indices
        chunk = {"rms": torch.linalg.vector_norm(r, dim=-1) / r.shape[-1]**0.5, "top2": r_best.values[:, :2],
                 "c_top1": c_top1,
                 "r_top1": r_top1,
                 "contained": (c_top5 == r_top1[:, None]).any(-1) & (r_top5 == c_top1[:, None]).any(-1)}
        if kl:
            chunk.update(kl=_kl(r, c), cand_rmse=torch.linalg.vector_norm(c - r, dim=-1) / r.shape[-1]**0.5)
            if peer is not None:
                p = peer[start:start + step].double()
                chunk.update(peer_kl=_kl(r, p), peer_rmse=torch.linalg.vector_norm(p - r, dim=-1) / r.shape[-1]**0.5)
        for key, value in chunk.items():
            figures.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in figures.items()}


def _fill_agreement(check, rows, decisive, kl):
    """The ranking figures of a LogitsCheck from _per_position's `rows` and the KL per position."""
    n = rows["r_top1"].shape[0]
    agree = rows["c_top1"] == rows["r_top1"]
    check.top1_agreement = float(agree.double().mean())
    check.decisive_positions = int(decisive.sum())
    check.decisive_disagreements = int((decisive & ~agree).sum())
    check.top5_containment = float(rows["contained"].double().mean())
    check.collapsed = n >= 4 and rows["c_top1"].unique().numel() == 1 and rows["r_top1"].unique().numel() > 1
    check.kl_per_position = kl.tolist()
    check.kl_mean, check.kl_max = float(kl.mean()), float(kl.max())
    check.kl_p99 = float(torch.quantile(kl, 0.99)) if n else 0.0


def check_logits(candidate, reference, mask, judge, peer=None, name="logits", aggregate=True, space=Space()):
    """Logits [B, S, V] at the real (unpadded) positions: figures, top-1/top-5, KL, collapse, judged by
    `judge`; `peer` (the peer's logits, same shape) calibrates the bounds when the judge is calibrated.
    aggregate=False judges a single position (a decode step): no KL mean/p99 and no agreement rates.
    space (output_space()): "logprobs" and "topk" compare log-probabilities (module docstring); its hidden
    token ids are left out of every side after the log-softmax."""
    space, hidden = space.kind, space.hidden
    valid = mask.bool().to("cpu")
    table = judge.dtype if judge.distribution else judge.table
    if candidate.shape != reference.shape:
        c = compare(candidate, reference, table, name)
        nan = float("nan")
        return LogitsCheck(c, judge, kl_mean=nan, kl_p99=nan, kl_max=nan, aggregate=aggregate, space=space)
    # the real positions, in the tensors' own dtype: logits stay so (read in float64 chunks below);
    # log-probabilities are made in float64 (a server's are few positions)
    def real(t):  # [positions, V]: a view when every position is real, else a copy of the real ones
        t = t.detach().to("cpu")
        return t.reshape(-1, t.shape[-1]) if bool(valid.all()) else t[valid]

    cand, ref = real(candidate), real(reference)
    calibrated = judge.calibrated and peer is not None
    peer = real(peer) if calibrated else None
    skipped = 0
    if space != "logits":
        cand, ref = cand.double(), ref.double()
        returned = ~torch.isnan(cand).all(-1)
        skipped = int((~returned).sum())
        shown = torch.ones(cand.shape[-1], dtype=torch.bool)
        shown[list(hidden)] = False
        cand, ref = cand[returned], _logprobs(ref[returned])[:, shown]
        cand = (cand.log_softmax(-1) if space == "logprobs" else cand)[:, shown]
        peer = None if peer is None else _logprobs(peer.double()[returned])[:, shown]
    if space == "topk":
        check = _check_topk(cand, ref, judge, peer, name, aggregate)
        check.skipped_positions = skipped
        check.passed = not check.reasons()
        return check
    comparison = judge_tensor(cand, ref, judge, peer, name)
    f = rounding_floor(judge.dtype)
    n = ref.shape[0]
    rows = _per_position(cand, ref, peer)
    rms_row, top2 = rows["rms"], rows["top2"]
    gap = top2[:, 0] - top2[:, 1]
    check = LogitsCheck(comparison, judge, positions=n, aggregate=aggregate, space=space, skipped_positions=skipped)
    if calibrated:
        peer_rmse = rows["peer_rmse"]
        peer_rmse = peer_rmse.clamp_min(float(peer_rmse.quantile(0.9)))  # one lucky position of the peer is no bound
        bound = PEER_K_MAX * peer_rmse + f * rms_row
        check.position_failures = int((rows["cand_rmse"] > bound).sum())
        check.worst_position = int((rows["cand_rmse"] / bound).argmax())
        sigma = judge.k * peer_rmse + f * rms_row  # typical, not the extreme the RMS gate allows
    else:
        sigma = LOGITS_NMSE[judge.dtype] ** 0.5 * rms_row
    if judge.distribution is not None and judge.distribution.nmse is not None:  # a quantised cache's own error
        sigma = torch.maximum(sigma, judge.distribution.nmse ** 0.5 * rms_row)
    # the error a correct engine may have at one logit of a position, typical rather than extreme
    allowed = DECISIVE_SIGMAS * sigma + 2 * f * top2[:, 0].abs()
    decisive = gap > 2 * allowed
    _fill_agreement(check, rows, decisive, rows["kl"])
    if calibrated:
        peer_kl = rows["peer_kl"]
        check.peer = {"nmse": comparison.peer_nmse, "max_abs": comparison.peer_max_abs,
                      "kl_mean": float(peer_kl.mean()), "kl_max": float(peer_kl.max()),
                      "kl_p99": float(torch.quantile(peer_kl, 0.99)) if n else 0.0}
    d = judge.distribution
    if d is not None:
        check.limits = {"kl_mean": d.kl_mean, "kl_p99": d.kl_p99, "kl_max": d.kl_max}
        if calibrated:
            for key in check.limits:
                by_peer = judge.k**2 * check.peer[key] + f * f
                check.limits[key] = by_peer if judge.peer_only else max(check.limits[key], by_peer)
        check.position_failures = 0  # element figures are reported, not gated, under a distribution judge
    check.passed = not check.reasons()
    return check


def _kl_lower_bound(ref, cand, known):
    """A lower bound of KL(ref || cand) per position of [N, V] log-probabilities from the `known` tokens S only:
    P_ref(S) x KL(ref given S || cand given S), both renormalised over S with log-sum-exps. By the chain rule
    the full KL is that plus the KL of the coarse split (S, rest) and of the rest, both >= 0. The coarse
    term is left out: its "rest" mass, 1 - sum over S, cancels to rounding noise (seen: 1e-7 of a float32
    server's logprobs); a server that moves mass out of S shows in the element figures of S instead."""
    neg = torch.tensor(float("-inf"), dtype=ref.dtype)
    r, c = torch.where(known, ref, neg), torch.where(known, cand, neg)
    log_ps = r.logsumexp(-1)
    r, c = r - log_ps[:, None], c - c.logsumexp(-1)[:, None]
    kl = torch.where(known, r.exp() * (r - c), torch.zeros((), dtype=ref.dtype)).sum(-1)
    kl = (log_ps.exp() * kl).clamp_min(0)
    return torch.where(torch.isfinite(kl), kl, torch.full_like(kl, float("inf")))


def _check_topk(cand, ref, judge, peer, name, aggregate):
    """check_logits for an engine that returned only its top k log-probabilities per position (NaN for the
    rest): cand, ref, peer are [positions, V] log-probabilities; ref may itself be a top-k output (NaN)."""
    n = ref.shape[0]
    known = ~torch.isnan(cand)
    both = known & ~torch.isnan(ref)
    comparison = judge_tensor(cand[both], ref[both], judge, None if peer is None else peer[both], name)
    check = LogitsCheck(comparison, judge, positions=n, aggregate=aggregate, space="topk")
    if not n:
        return check
    f = rounding_floor(judge.dtype)
    neg = torch.tensor(float("-inf"), dtype=ref.dtype)
    cand_f, ref_f = torch.where(known, cand, neg), torch.where(torch.isnan(ref), neg, ref)
    finite_ref = torch.where(torch.isnan(ref), torch.zeros((), dtype=ref.dtype), ref)
    rms_row = finite_ref.pow(2).sum(-1).div((~torch.isnan(ref)).sum(-1).clamp_min(1)).sqrt()
    top2 = ref_f.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    if peer is not None:
        peer_rmse = (peer - ref).pow(2).mean(-1).sqrt()
        peer_rmse = peer_rmse.clamp_min(float(peer_rmse.quantile(0.9)))
        sigma = judge.k * peer_rmse + f * rms_row
    else:
        sigma = LOGITS_NMSE[judge.dtype] ** 0.5 * rms_row
    if judge.distribution is not None and judge.distribution.nmse is not None:  # a quantised cache's own error
        sigma = torch.maximum(sigma, judge.distribution.nmse ** 0.5 * rms_row)
    decisive = gap > 2 * (DECISIVE_SIGMAS * sigma + 2 * f * top2[:, 0].abs())
    _fill_agreement(check, _per_position(cand_f, ref_f, kl=False), decisive, _kl_lower_bound(ref_f, cand_f, both))
    if peer is not None:
        peer_kl = _kl_lower_bound(ref_f, peer, both)
        check.peer = {"nmse": comparison.peer_nmse, "max_abs": comparison.peer_max_abs,
                      "kl_mean": float(peer_kl.mean()), "kl_max": float(peer_kl.max()),
                      "kl_p99": float(torch.quantile(peer_kl, 0.99))}
    d = judge.distribution
    if d is not None:  # the distribution gates, on the lower bound (element judges gate the listed logprobs)
        check.limits = {key: getattr(d, key) for key in ("kl_mean", "kl_p99", "kl_max")}
        for key in check.limits if check.peer else ():
            by_peer = judge.k**2 * check.peer[key] + f * f
            check.limits[key] = by_peer if judge.peer_only else max(check.limits[key], by_peer)
    return check


# ---- invariance: the same engine on the same prompt, alone and in a batch ------------------------------


def rounding_noise(correct, reference):
    """A correct engine's rounding error per prompt, the bound of what a batch may change: for each prompt's
    logits [S, V] (`correct`: a correct engine's, `reference`: the reference's), its error against the
    reference, each position's raised to at least the 90th percentile over every prompt's positions
    (relative to the reference's RMS there), since one position that happens to round exactly (a one-token
    prompt) bounds nothing. Where the engine rounded exactly, the floor is taken along the reference."""
    errors = [c.double() - r.double() for c, r in zip(correct, reference)]
    rms = [r.double().pow(2).mean(-1).sqrt().clamp_min(1e-30) for r in reference]
    relative = [e.pow(2).mean(-1).sqrt() / n for e, n in zip(errors, rms)]
    floor = float(torch.quantile(torch.cat(relative), 0.9))
    noise = []
    for e, rel, r in zip(errors, relative, reference):
        scale = (floor / rel.clamp_min(1e-300)).clamp_min(1.0)[:, None]
        noise.append(torch.where(rel[:, None] > 0, e * scale, r.double() * floor))
    return noise


@dataclass(frozen=True)
class Invariance:
    """One prompt's logits in a batch against the same prompt alone on the same engine."""

    kind: str  # "bitwise", "within rounding" or "NOT"
    max_abs: float
    passed: bool


def judge_invariance(batched, alone, noise, judge, space=Space()):
    """Invariance of logits [S, V] of one prompt: bitwise equal, within rounding (the batch moves them by
    no more than k x a correct engine's rounding `noise` [S, V], per position and overall, as every
    calibrated bound), or NOT. Without a correct engine to measure (`noise` None), the dtype's table.
    `space`: what the engine returns (output_space; a server's positions without logprobs are NaN on both)."""
    alone = alone.to(batched.dtype)
    if bool(((batched == alone) | (batched.isnan() & alone.isnan())).all()):
        return Invariance("bitwise", 0.0, True)
    shifted = None if noise is None else (alone.double() + noise)[None]
    judge = replace(judge, calibrated=shifted is not None)
    check = check_logits(batched[None], alone[None], torch.ones(1, len(alone)), judge, shifted, aggregate=False,
                         space=space)
    return Invariance("within rounding" if check.passed else "NOT", check.comparison.max_abs, check.passed)


# ---- intermediate validation: one capture point ---------------------------------------------------------


@dataclass(frozen=True)
class ExpertSets:
    """The judged expert sets of one sparse MoE layer's tokens (judge_expert_sets)."""

    name: str
    passed: bool
    reason: str  # why it failed ("" when it passed)
    judge: str  # "calibrated": the allowed router error from the peer's; "table": from a table; "rounding"
    tokens: int = 0
    near_ties: int = 0  # tokens whose reference k-th/(k+1)-th router logits are within twice the allowed error
    rerouted: tuple = ()  # tokens routed to another admissible set than the reference's (not a fault)
    not_admissible: int = 0  # tokens routed to a set no correct engine may choose: the failures
    failure: str = ""

    def as_dict(self):
        return {**self.__dict__, "rerouted": list(self.rerouted)}


def router_margin(ref_logits, dtype, peer_logits=None, table=None):
    """[T]: the router-logit error a correct engine may have on each token: PEER_K_MAX x the peer's largest
    there (calibrated), else DECISIVE_SIGMAS x the RMS error `table` (a Tolerance) allows; plus two roundings of
    the largest logit (alone, for the dual test: the router's input is then the reference's own)."""
    margin = 2 * rounding_floor(dtype) * ref_logits.abs().max(-1).values
    if peer_logits is not None:
        return margin + PEER_K_MAX * (peer_logits.double() - ref_logits).abs().max(-1).values
    if table is not None:
        return margin + DECISIVE_SIGMAS * table.nmse**0.5 * ref_logits.pow(2).mean(-1).sqrt()
    return margin


def is_admissible(chosen, ref_logits, top_k, margin):
    """[T] bool: whether each token's chosen experts ([T, k]) form a set a correct engine may choose: the
    reference's own set, or on a near-tie token (k-th/(k+1)-th gap within 2 x margin) every expert above the
    band [k+1-th - 2 margin, k-th + 2 margin] and the rest from inside it (kitcore.qwen3_moe.admissible_sets' rule, for any set)."""
    values = ref_logits.sort(-1, descending=True).values
    low, high = values[:, top_k] - 2 * margin, values[:, top_k - 1] + 2 * margin
    near_tie = values[:, top_k - 1] - values[:, top_k] <= 2 * margin
    picked = ref_logits.gather(-1, chosen)
    distinct = chosen.sort(-1).values.diff(dim=-1).ne(0).all(-1)
    every_sure = (picked > high[:, None]).sum(-1) == (ref_logits > high[:, None]).sum(-1)
    inside = (picked >= low[:, None]).all(-1)
    own = (chosen.sort(-1).values == ref_logits.topk(top_k, -1).indices.sort(-1).values).all(-1)
    return own | (near_tie & distinct & every_sure & inside)


def judge_expert_sets(chosen, ref_sets, ref_logits, margin, name, by):
    """Each token's chosen experts ([T, k], ids ascending) against the reference's: the reference's set, or
    on a near-tie token (k-th/(k+1)-th reference logits within 2 x `margin`) another set a correct engine's
    rounding may choose (is_admissible). Any other set fails; `by` says where the margin
    came from."""
    tokens, k = ref_sets.shape
    if chosen.shape != ref_sets.shape:
        return ExpertSets(name, False, f"routes each token to {chosen.shape[-1]} expert(s), the reference to {k}",
                          by, tokens, failure=SHAPE)
    ref_logits = ref_logits.double()
    values = ref_logits.sort(-1, descending=True).values
    near = values[:, k - 1] - values[:, k] <= 2 * margin if ref_logits.shape[-1] > k else torch.zeros(tokens, dtype=bool)
    same = (chosen == ref_sets).all(-1)
    admissible = same | is_admissible(chosen, ref_logits, k, margin)
    rerouted = tuple((~same & admissible).nonzero().flatten().tolist())
    bad = (~admissible).nonzero().flatten().tolist()
    reason = ""
    if bad:
        t = bad[0]
        gap = float(values[t, k - 1] - values[t, k])
        reason = (f"{len(bad)} of {tokens} token(s) routed to an expert set no correct engine may choose (first: "
                  f"token {t}, experts {chosen[t].tolist()}, the reference's {ref_sets[t].tolist()}, its k-th/(k+1)-th "
                  f"router-logit gap {gap:.3g} against an allowed error of {float(margin[t]):.3g})")
    return ExpertSets(name, not bad, reason, by, tokens, int(near.sum()), rerouted, len(bad),
                      OUT_OF_BOUNDS if bad else "")


def point_status(total, own):
    """The dual test's ladder for one capture point: "ok"; "FAIL: ADDS error" when the component's own error
    (on the reference's own input) fails: it is wrong itself; "FAIL: inherits error" when only its total
    error fails: it carries error from before it. Without an own error, the total's reason; without a total
    (an engine that hands out no activations), the own error alone."""
    if own is not None and not own.passed:
        return "FAIL: ADDS error"
    if total is not None and not total.passed:
        return "FAIL: inherits error" if own is not None else f"FAIL: {total.reason}"
    return "ok"
