"""The comparison core: one function, `compare`, used for every tensor the kit checks.

A candidate tensor is compared with a reference tensor (the reference is always the second
argument). Both are cast to float64 on the CPU, so the figures do not depend on the device.

Figures:
    max_abs, mean_abs     |cand - ref|
    max_rel               max |cand - ref| / |ref| over elements with ref != 0 (reported, never gated:
                          near-zero reference values dominate it)
    cosine                cosine similarity of the flattened tensors (reported, never gated alone:
                          it is blind to a uniform rescale, e.g. a wrong final-norm weight)
    nmse                  sum((cand - ref)^2) / sum(ref^2), the error measure of llama.cpp's test-backend-ops
    allclose              every element within  atol + rtol * |ref|,  atol = atol_rms * rms(ref)
    nan/inf counts        on each side; any NaN or Inf on either side is a failure
    worst_index           where |cand - ref| is largest

A comparison passes when the shapes match, nothing is NaN/Inf, allclose holds and nmse <= the
tolerance's nmse. Tolerances scale with the reference's RMS so that the same table serves the
logits (RMS ~ 3) and the residual stream of layer 0 (RMS ~ 0.04).
"""

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol_rms: float
    nmse: float


# The static table: how far from a float32 (or float64) reference a candidate computing in the given dtype
# may be, used where no independent peer calibrates the verdict (kitcore/judges.py): with --peer none, or
# for HF itself. rtol is about twice the dtype's unit roundoff; atol_rms and nmse are the worst that
# tools/measure_tolerances.py found on correct engines (hf eager and sdpa, compile for the logits), over
# the default tiny checkpoints (seeds 0-2) and the real SmolLM2-135M (30 layers, massive activations),
# prompts of 32-512 tokens, at every capture point and the logits, times a margin of ~3:
#   float32   total: atol_rms 1.0e-4, nmse 3.4e-12      own: atol_rms 5.0e-6, nmse 7.2e-14
#   bfloat16  total: atol_rms 9.4,    nmse 9.2e-3       own: atol_rms 0.55,   nmse 9.3e-5
#   float16   total: atol_rms 1.44,   nmse 4.6e-5       own: atol_rms 0.041,  nmse 1.4e-6
# (worst totals: SmolLM2's residual stream, where a few channels reach 22,500 and their rounding
# dominates; worst own errors: attn_out). Qwen2.5-0.5B and the Qwen3-MoE built from it then needed more in
# float16: total nmse 2.7e-4 / 2.5e-4 at layers.23.act_mul (HF itself, 27 tokens), so the float16 total nmse
# is 8e-4, 3x that. In reduced precision the total error deep in a real model is
# so large that a table can say little about it; the peer can (README "Verdicts").
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-12, atol_rms=1e-10, nmse=1e-20),
    torch.float32: Tolerance(rtol=1e-6, atol_rms=4e-4, nmse=1e-9),
    torch.float16: Tolerance(rtol=1e-3, atol_rms=4.5, nmse=8e-4),
    torch.bfloat16: Tolerance(rtol=8e-3, atol_rms=30.0, nmse=3e-2),
}

# The dual test's own error: one component on the reference's own input, so no accumulation.
OWN_TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-12, atol_rms=1e-10, nmse=1e-20),
    torch.float32: Tolerance(rtol=1e-6, atol_rms=1e-4, nmse=1e-9),
    torch.float16: Tolerance(rtol=1e-3, atol_rms=0.12, nmse=5e-6),
    torch.bfloat16: Tolerance(rtol=8e-3, atol_rms=1.6, nmse=3e-4),
}

# The NMSE of the logits of correct engines (worst measured, x3), which sets the RMS error per logit
# that decides which positions are decisive in table mode (kitcore.judges.check_logits).
LOGITS_NMSE = {torch.float64: 1e-20, torch.float32: 1e-10, torch.float16: 3e-5, torch.bfloat16: 3e-3}


@dataclass(frozen=True)
class Distribution:
    """Thresholds for quantised weights, judged on next-token distributions (logits only): per-position
    KL(reference || candidate) mean / p99 / max, and the minimum top-1 and top-5 agreement rates."""

    name: str
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1: float
    top5: float
    nmse: float = None  # a correct engine's logits NMSE of this kind (None: the dtype's LOGITS_NMSE); it sets
    # the error a logit may have, hence which top-1/top-2 gaps are decisive (kitcore.judges.check_logits)


# Measured on the default checkpoints with 7 standard-library docstring prompts (45-190 tokens)
# and the default prompt; the thresholds leave a margin of 3-5x on the KL figures.
#   q8_0 (llama.cpp, dense Llama seeds 0-2): KL mean <= 7.4e-5, p99 <= 2.9e-4, max <= 4.4e-4, top-1 1.0
# Mixture-of-experts models in reduced precision are judged by distribution too: a router near-tie that
# rounding flips sends a token to another expert, which moves its logits far beyond rounding (measured
# max abs 0.72 on a correct float16 engine) while its next-token distribution barely moves.
#   moe bfloat16 (hf eager/sdpa, compile, llama.cpp): KL mean <= 3.3e-4, p99 <= 2.4e-3, max <= 5.6e-2, top-1 >= 0.986
#   moe float16 (same engines):                       KL mean <= 2.8e-5, p99 <= 1.7e-5, max <= 1.2e-2, top-1 >= 0.998
#   moe q8_0 (llama.cpp):                             KL mean <= 6.4e-4, p99 <= 2.4e-4, max <= 6.9e-2, top-1 >= 0.989
# and on the Qwen3-MoE built from Qwen2.5's trained weights (kitcore.trained_moe; hf eager/sdpa, the default
# prompt and 7 docstring prompts of 39-298 tokens), which the tiny models' figures would false-alarm on:
#   moe bfloat16: KL mean <= 3.9e-3, p99 <= 2.4e-2, max <= 3.4e-2, top-1 >= 0.938
#   moe float16:  KL mean <= 2.1e-4, p99 <= 1.8e-3, max <= 3.9e-3, top-1 >= 0.963 (one flip)
# The kv-* rows (llama.cpp's caches over 256 decode steps; tiny Llama, SmolLM2, q8_0 on Qwen2.5 too, beside the
# format's own cost from tools/kv_cache_cost.py): tools/measurements.md.
DISTRIBUTIONS = {
    "q8_0": Distribution("q8_0", kl_mean=3e-4, kl_p99=1e-3, kl_max=2e-3, top1=0.9, top5=0.97),
    "kv-f16": Distribution("kv-f16", kl_mean=1e-5, kl_p99=1e-4, kl_max=2e-4, top1=0.97, top5=0.99, nmse=1.5e-5),
    "kv-q8_0": Distribution("kv-q8_0", kl_mean=3e-3, kl_p99=5e-2, kl_max=8e-2, top1=0.9, top5=0.98, nmse=8e-4),
    "kv-q4_0": Distribution("kv-q4_0", kl_mean=0.07, kl_p99=0.6, kl_max=1.5, top1=0.9, top5=0.98, nmse=0.1),
    "moe-bfloat16": Distribution("moe-bfloat16", kl_mean=1.2e-2, kl_p99=7e-2, kl_max=0.2, top1=0.9, top5=0.97),
    "moe-float16": Distribution("moe-float16", kl_mean=6e-4, kl_p99=5e-3, kl_max=0.05, top1=0.95, top5=0.98),
    "moe-q8_0": Distribution("moe-q8_0", kl_mean=3e-3, kl_p99=1e-3, kl_max=0.3, top1=0.95, top5=0.98),
}


def tolerance_for(dtype_or_tolerance):
    """The Tolerance of a dtype; a Tolerance passes through unchanged."""
    if isinstance(dtype_or_tolerance, Tolerance):
        return dtype_or_tolerance
    return TOLERANCES[dtype_or_tolerance]


# What kind of failure a Comparison is (`failure`; "" when it passed): figures beyond a bound, or tensors
# that cannot be judged by figures at all (a calibration leaves those as they are).
OUT_OF_BOUNDS, SHAPE, EMPTY, NON_FINITE = "out_of_bounds", "shape", "empty", "non_finite"
UNJUDGEABLE = (SHAPE, EMPTY, NON_FINITE)


@dataclass
class Comparison:
    name: str
    passed: bool
    reason: str  # the one line that says why it failed ("" when it passed)
    shape_candidate: tuple
    shape_reference: tuple
    failure: str = ""  # OUT_OF_BOUNDS | SHAPE | EMPTY | NON_FINITE, "" when it passed
    numel: int = 0
    max_abs: float = float("nan")
    mean_abs: float = float("nan")
    max_rel: float = float("nan")
    cosine: float = float("nan")
    nmse: float = float("nan")
    rms_reference: float = float("nan")
    max_abs_reference: float = float("nan")
    allclose: bool = False
    mismatched: int = 0
    nan_candidate: int = 0
    inf_candidate: int = 0
    nan_reference: int = 0
    inf_reference: int = 0
    worst_index: tuple = ()
    worst_candidate: float = float("nan")
    worst_reference: float = float("nan")
    tolerance: Tolerance = None
    judge: str = "table"  # "calibrated": by the peer's figures; "input_rounding": by the reference on inputs
    # rounded to the candidate dtype (kitcore.judges.calibrate, judge_own)
    peer_nmse: float = float("nan")
    peer_max_abs: float = float("nan")
    limit_nmse: float = float("nan")
    limit_max_abs: float = float("nan")

    def as_dict(self):
        d = asdict(self)
        d["shape_candidate"] = list(self.shape_candidate)
        d["shape_reference"] = list(self.shape_reference)
        d["worst_index"] = list(self.worst_index)
        return d

    def message(self):
        """One paragraph in the spirit of torch.testing.assert_close."""
        head = f"{self.name}: {'PASS' if self.passed else 'FAIL'}"
        if self.reason and not self.passed:
            head += f" ({self.reason})"
        if self.shape_candidate != self.shape_reference:
            return head
        tol = self.tolerance
        if self.judge in ("calibrated", "input_rounding"):
            by = "the peer's" if self.judge == "calibrated" else "the input-rounding floor's"
            return (
                f"{head}\n"
                f"  greatest absolute difference: {self.max_abs:.3e} at index {self.worst_index} "
                f"(candidate {self.worst_candidate:.6g}, reference {self.worst_reference:.6g}); allowed "
                f"{self.limit_max_abs:.3e} from {by} {self.peer_max_abs:.3e}\n"
                f"  nmse {self.nmse:.3e} (allowed {self.limit_nmse:.2e} from {by} {self.peer_nmse:.2e}), "
                f"mean abs {self.mean_abs:.3e}, cosine {self.cosine:.9f}"
            )
        return (
            f"{head}\n"
            f"  mismatched elements: {self.mismatched} / {self.numel} "
            f"({100.0 * self.mismatched / max(self.numel, 1):.3f}%)\n"
            f"  greatest absolute difference: {self.max_abs:.3e} at index {self.worst_index} "
            f"(candidate {self.worst_candidate:.6g}, reference {self.worst_reference:.6g}; "
            f"allowed atol {tol.atol_rms:.1e} x rms {self.rms_reference:.3e} + rtol {tol.rtol:.1e} x |ref|)\n"
            f"  mean abs {self.mean_abs:.3e}, max rel {self.max_rel:.3e}, cosine {self.cosine:.9f}, "
            f"nmse {self.nmse:.3e} (allowed {tol.nmse:.1e})"
        )


CHUNK_ELEMENTS = 2**24  # float64 working set of compare(): 128 MiB a side, whatever the tensors' size


def _flat_chunks(c, r):
    """The two flattened tensors in float64 slices of CHUNK_ELEMENTS: (offset, candidate, reference)."""
    c, r = c.detach().reshape(-1), r.detach().reshape(-1)
    for start in range(0, r.numel(), CHUNK_ELEMENTS):
        stop = start + CHUNK_ELEMENTS
        yield start, c[start:stop].to("cpu", torch.float64), r[start:stop].to("cpu", torch.float64)


def compare(candidate, reference, tolerance, name="tensor"):
    """Compare `candidate` with `reference`; `tolerance` is a Tolerance or the candidate's torch dtype.
    Both are read in float64 slices (CHUNK_ELEMENTS), so a [positions x vocab] tensor of a long prompt and a
    large vocabulary never exists in float64 whole: one pass for the sums, one for the element tolerance
    (it needs the reference's RMS over everything)."""
    tolerance = tolerance_for(tolerance)
    shape_c, shape_r = tuple(candidate.shape), tuple(reference.shape)
    if shape_c != shape_r:
        return Comparison(name, False, f"shape mismatch: candidate {list(shape_c)} vs reference {list(shape_r)}",
                          shape_c, shape_r, failure=SHAPE, tolerance=tolerance)
    result = Comparison(name, False, "", shape_c, shape_r, numel=reference.numel(), tolerance=tolerance)
    if reference.numel() == 0:
        result.reason, result.failure = "empty tensors", EMPTY
        return result
    sums = dict(finite=0, diff=0.0, err_sq=0.0, ref_sq=0.0, c_sq=0.0, cr=0.0)
    result.max_abs, result.max_rel, result.max_abs_reference, worst = -1.0, 0.0, 0.0, 0
    excess = -float("inf")  # the largest |c - r| - rtol |r|: no element is out of tolerance unless it exceeds atol x rms
    for start, c, r in _flat_chunks(candidate, reference):
        finite_c, finite_r = torch.isfinite(c), torch.isfinite(r)
        finite = finite_c & finite_r
        if not bool(finite.all()):  # non-finite elements are counted, then left out of every figure
            result.nan_candidate += int(torch.isnan(c).sum())
            result.inf_candidate += int((~finite_c).sum()) - int(torch.isnan(c).sum())
            result.nan_reference += int(torch.isnan(r).sum())
            result.inf_reference += int((~finite_r).sum()) - int(torch.isnan(r).sum())
            c, r = torch.where(finite, c, 0.0), torch.where(finite, r, 0.0)
        sums["finite"] += int(finite.sum())
        d = c - r
        sums["err_sq"] += float(torch.dot(d, d))
        sums["ref_sq"] += float(torch.dot(r, r))
        sums["c_sq"] += float(torch.dot(c, c))
        sums["cr"] += float(torch.dot(c, r))
        diff, ref_abs = d.abs_(), r.abs()
        sums["diff"] += float(diff.sum())
        at = int(diff.argmax())
        if float(diff[at]) > result.max_abs:
            result.max_abs, worst = float(diff[at]), start + at
            result.worst_candidate, result.worst_reference = float(c[at]), float(r[at])
        result.max_rel = max(result.max_rel, float(torch.where(ref_abs > 0, diff / ref_abs, 0.0).max()))
        result.max_abs_reference = max(result.max_abs_reference, float(ref_abs.max()))
        excess = max(excess, float((diff - tolerance.rtol * ref_abs).max()))
    result.mean_abs = sums["diff"] / max(sums["finite"], 1)
    ref_sq, err_sq = sums["ref_sq"], sums["err_sq"]
    result.nmse = err_sq / ref_sq if ref_sq > 0 else (0.0 if err_sq == 0 else float("inf"))
    result.rms_reference = (ref_sq / reference.numel()) ** 0.5
    denom = (sums["c_sq"] * ref_sq) ** 0.5
    result.cosine = sums["cr"] / denom if denom > 0 else (1.0 if err_sq == 0 else 0.0)
    result.worst_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), shape_r))
    non_finite_count = sums["finite"] < reference.numel()
    # the element tolerance needs the reference's RMS over everything: a second pass, only where an element may
    # exceed it (a margin of 1e-12 keeps the count exact where the two formulas round differently)
    if non_finite_count or excess > tolerance.atol_rms * result.rms_reference * (1 - 1e-12):
        for _, c, r in _flat_chunks(candidate, reference):
            finite = torch.isfinite(c) & torch.isfinite(r)
            allowed = tolerance.atol_rms * result.rms_reference + tolerance.rtol * torch.where(finite, r, 0.0).abs()
            result.mismatched += int((~finite).sum() + (torch.where(finite, (c - r).abs(), 0.0) > allowed).sum())
    result.allclose = result.mismatched == 0

    non_finite = result.nan_candidate + result.inf_candidate + result.nan_reference + result.inf_reference
    if non_finite:
        result.reason = (f"non-finite values: candidate {result.nan_candidate} NaN / {result.inf_candidate} Inf, "
                         f"reference {result.nan_reference} NaN / {result.inf_reference} Inf")
        result.failure = NON_FINITE
    elif not result.allclose:
        result.reason, result.failure = f"{result.mismatched} elements outside tolerance", OUT_OF_BOUNDS
    elif result.nmse > tolerance.nmse:
        result.reason, result.failure = f"nmse {result.nmse:.3e} above {tolerance.nmse:.1e}", OUT_OF_BOUNDS
    result.passed = not result.reason
    return result
