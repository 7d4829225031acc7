"""The shared core: comparison, device layer, metric lines and JSON, timing."""

import argparse
import io
import json
import math

import pytest
import torch
from kit_helpers import run_script

from kitcore import devices
from kitcore import judges
from kitcore.compare import DISTRIBUTIONS, OWN_TOLERANCES, TOLERANCES, compare
from kitcore.errors import EXIT_UNAVAILABLE, EXIT_USAGE, Unavailable, UsageError
from kitcore.results import Results, write_json_atomic
from kitcore.timing import Measurement, benchmark
from kitcore.verdict import Verdict


def ref_tensor():
    return torch.linspace(-3, 3, 60, dtype=torch.float32).reshape(3, 4, 5)


# ---- compare -------------------------------------------------------------------------------------

def test_identical_tensors_pass_with_zero_error():
    c = compare(ref_tensor(), ref_tensor(), torch.float32)
    assert c.passed and c.max_abs == 0 and c.nmse == 0 and c.cosine == pytest.approx(1.0) and c.mismatched == 0


def test_figures_and_worst_index():
    ref = ref_tensor()
    cand = ref.clone()
    cand[1, 2, 3] += 0.5
    c = compare(cand, ref, torch.float32)
    assert not c.passed and c.worst_index == (1, 2, 3)
    assert c.max_abs == pytest.approx(0.5, rel=1e-6)
    assert c.mean_abs == pytest.approx(0.5 / 60, rel=1e-6)
    assert c.nmse == pytest.approx(0.25 / float(ref.double().pow(2).sum()), rel=1e-6)
    assert c.mismatched == 1 and "1 elements outside tolerance" in c.reason
    assert "greatest absolute difference: 5.000e-01 at index (1, 2, 3)" in c.message()


@pytest.mark.parametrize("side", ["candidate", "reference"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_on_either_side_fails(side, value):
    ref, cand = ref_tensor(), ref_tensor()
    (cand if side == "candidate" else ref)[0, 0, 0] = value
    c = compare(cand, ref, torch.float32)
    assert not c.passed and "non-finite" in c.reason
    counts = (c.nan_candidate, c.inf_candidate) if side == "candidate" else (c.nan_reference, c.inf_reference)
    assert counts == ((1, 0) if math.isnan(value) else (0, 1))
    assert math.isfinite(c.max_abs)  # the figures still describe the finite part


def test_shape_mismatch_fails_with_both_shapes():
    c = compare(torch.zeros(2, 3), torch.zeros(3, 2), torch.float32)
    assert not c.passed and c.reason == "shape mismatch: candidate [2, 3] vs reference [3, 2]"
    assert "shape mismatch" in c.message()


def test_bf16_rounding_passes_bf16_tolerance_but_not_float32():
    ref = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    rounded = ref.to(torch.bfloat16)
    assert compare(rounded, ref, torch.bfloat16).passed
    assert not compare(rounded, ref, torch.float32).passed


def test_uniform_rescale_is_invisible_to_cosine_but_fails():
    ref = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    c = compare(ref * 1.03, ref, OWN_TOLERANCES[torch.bfloat16])
    assert c.cosine == pytest.approx(1.0, abs=1e-12)
    assert not c.passed and "nmse" in c.reason


def test_tolerance_table_is_ordered_by_precision():
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    assert [TOLERANCES[d].nmse for d in order] == sorted(TOLERANCES[d].nmse for d in order)


# ---- devices -------------------------------------------------------------------------------------

def parse_device(*argv):
    parser = argparse.ArgumentParser()
    devices.add_device_args(parser)
    return devices.resolve_device(parser.parse_args(argv))


def test_cpu_is_the_default_and_cpu_flag_works():
    assert parse_device().type == "cpu"
    d = parse_device("--cpu")
    assert d.type == "cpu" and "threads" in d.name()
    assert d.memory_kind == "rss" and d.peak_memory_bytes() >= d.memory_bytes() > 0  # the process's RSS
    d.synchronize()
    d.empty_cache()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("flag", ["--nvidia", "--metax", "--mars", "--iluvatar"])
def test_absent_cuda_vendor_is_refused_with_exit_3(flag):
    with pytest.raises(Unavailable) as exc:
        parse_device(flag)
    assert exc.value.exit_code == EXIT_UNAVAILABLE
    assert str(exc.value).startswith(f"{flag}: no cuda device is present")


def test_moore_without_torch_musa_is_refused():
    with pytest.raises(Unavailable, match="backend module torch_musa is not installed"):
        parse_device("--moore")


def test_bad_device_string_is_a_usage_error():
    with pytest.raises(UsageError) as exc:
        parse_device("--device", "warp:0")
    assert exc.value.exit_code == EXIT_USAGE


def test_dtype_the_device_cannot_compute_in_is_refused():
    devices.Device("cpu", "cpu").check_dtype(torch.bfloat16)
    with pytest.raises(UsageError, match="float8_e4m3fn is not supported on cpu"):
        devices.Device("cpu", "cpu").check_dtype(torch.float8_e4m3fn)


# ---- metric lines and JSON -----------------------------------------------------------------------

def test_metric_lines_are_one_record_per_line():
    out = io.StringIO()
    r = Results("demo", labels={"device": "cpu", "dtype": "bfloat16"}, stream=out)
    r.add("prefill 64", "median_ms", 1.5, unit="ms", engine="hf")
    r.add("case", "passed", True, unit="bool")
    verdict = Verdict()
    verdict.add("case", False, "the case failed")
    code = r.finish(verdict, title=None)
    lines = out.getvalue().splitlines()
    assert lines[0] == "KIT script=demo case=prefill_64 metric=median_ms value=1.5 unit=ms device=cpu dtype=bfloat16 engine=hf"
    assert lines[1].split()[4] == "value=1"
    assert lines[2] == ("KIT script=demo case=all metric=verdict value=1 unit=exit_code device=cpu dtype=bfloat16 "
                        "verdict=fail")
    assert code == 1


def test_json_is_written_atomically(tmp_path):
    target = tmp_path / "sub" / "r.json"
    write_json_atomic(target, {"a": float("nan"), "b": [1, 2]})
    assert json.loads(target.read_text()) == {"a": "nan", "b": [1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()})
    assert json.loads(target.read_text())["b"] == [1, 2]  # the old file survives a failed write
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]  # no temp file left behind


# ---- timing --------------------------------------------------------------------------------------

def test_measurement_statistics():
    m = Measurement("x", [1.0, 2.0, 3.0, 4.0, 100.0], warmups=2)
    assert m.median_ms == 3.0 and m.n == 5 and m.mean_ms == 22.0
    assert m.iqr_ms == pytest.approx(2.0) and m.spread_warning
    assert m.p10_ms == pytest.approx(1.4) and m.p90_ms == pytest.approx(61.6)


def test_benchmark_refuses_zero_runs():
    with pytest.raises(UsageError, match="--runs must be at least 1"):
        benchmark(lambda: None, devices.Device("cpu", "cpu"), 1, 0, "x")


def test_timer_fidelity_reports_the_ratio_to_torch_utils_benchmark():
    """tools/timer_fidelity.py reports the kit/torch.utils.benchmark ratio; a busy machine moves it, so the
    figure is reported, never asserted on."""
    r = run_script("tools/timer_fidelity.py", "--pairs", 1)
    assert r.code == 0, r
    assert "metric=median_ratio" in r.out and "kit / torch.utils.benchmark: median ratio" in r.out


def test_power_table_flags_gross_controls_and_no_correct_engine(tmp_path):
    """tools/power_table.py on the tiny Llama in float32, one short prompt: the kit's judges pass the correct
    engines and its calibrated judge catches every control; the margins are printed."""
    out = tmp_path / "power.json"
    r = run_script("tools/power_table.py", "--seeds", 0, "--prompts", 1, "--tokens", 16, "--dtypes", "float32",
                   "--json", out)
    assert r.code == 0, r
    flagged = {(f["candidate"], f["rule"]): f["flagged"] for f in json.loads(out.read_text())["flagged"]}
    correct = ("hf eager", "hf sdpa, 1 thread")
    assert not any(n for (c, rule), n in flagged.items() if c in correct and rule.startswith("kit")), flagged
    assert all(n for (c, rule), n in flagged.items() if c not in correct and rule == "kit, calibrated"), flagged
    assert "margin" in r.out


# ---- judges --------------------------------------------------------------------------------------

def noisy(ref, scale, seed):
    return ref + scale * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)


def test_calibrated_bound_follows_the_peer():
    ref = torch.randn(16, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    peer = noisy(ref, 1e-2, 1)
    judge = judges.Judge(torch.bfloat16, TOLERANCES[torch.bfloat16], calibrated=True)
    assert judges.judge_tensor(noisy(ref, 2e-2, 2), ref, judge, peer).passed
    worse = judges.judge_tensor(noisy(ref, 5e-2, 2), ref, judge, peer)
    assert not worse.passed and "k=3 x peer" in worse.reason
    # the same candidate passes the static table: only the peer sees that it is 5x worse than a correct engine
    assert compare(noisy(ref, 5e-2, 2), ref, torch.bfloat16).passed


def test_the_input_rounding_floor_judges_only_what_the_table_fails():
    """judge_own: without a peer, an own error outside the table passes within k x the floor the reference
    gives on rounded inputs, and fails beyond it; total_by_floor carries that floor to the point's total
    error, only where the own error was judged by it."""
    ref = torch.randn(16, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = judges.Judge(torch.bfloat16, TOLERANCES[torch.bfloat16])
    floor = noisy(ref, 0.1, 1)  # an ill-conditioned component: rounding its inputs alone moves it this much
    assert not compare(noisy(ref, 0.1, 2), ref, OWN_TOLERANCES[torch.bfloat16]).passed
    own = judges.judge_own(noisy(ref, 0.1, 2), ref, table, rounded=lambda: floor)
    assert own.passed and own.judge == "input_rounding", own
    assert not judges.judge_own(noisy(ref, 0.5, 2), ref, table, rounded=lambda: floor).passed
    small = judges.judge_own(noisy(ref, 1e-3, 2), ref, table, rounded=lambda: 1 / 0)  # within the table: never asked
    assert small.passed and small.judge == "table"
    total = compare(noisy(ref, 0.2, 3), ref, torch.bfloat16)
    assert not total.passed  # beyond the total-error table...
    assert judges.total_by_floor(total, own, table).passed  # ...but 2x the floor's RMS error: within k = 3
    assert not judges.total_by_floor(compare(noisy(ref, 0.5, 3), ref, torch.bfloat16), own, table).passed
    assert not judges.total_by_floor(total, small, table).passed  # the table judged the own error: unchanged


def test_calibrated_float32_floor_allows_reordered_sums_when_the_peer_is_exact():
    ref = torch.randn(16, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    judge = judges.Judge(torch.float32, TOLERANCES[torch.float32], calibrated=True)
    assert judges.judge_tensor(noisy(ref, 2e-6, 1), ref, judge, ref.clone()).passed
    assert not judges.judge_tensor(noisy(ref, 1e-3, 1), ref, judge, ref.clone()).passed


def test_one_position_out_of_line_with_the_peer_fails_where_the_tensor_figures_pass():
    ref = torch.randn(1, 64, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    peer, cand = noisy(ref, 1e-2, 1), noisy(ref, 1e-2, 2)
    cand[0, 5] += 0.1  # one position shifted: its softmax is unchanged, its logits are not
    mask = torch.ones(1, 64, dtype=torch.long)
    judge = judges.Judge(torch.bfloat16, TOLERANCES[torch.bfloat16], calibrated=True)
    check = judges.check_logits(cand, ref, mask, judge, peer)
    assert check.comparison.passed, "the tensor's RMS and largest error stay within the peer's bounds"
    assert check.position_failures == 1 and check.worst_position == 5 and not check.passed, check.reasons()
    assert judges.check_logits(noisy(ref, 1e-2, 2), ref, mask, judge, peer).passed


def logits_with_gaps(gaps, vocab=64):
    """[1, len(gaps), vocab] reference logits whose top-1/top-2 gap at each position is given."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, len(gaps), vocab, generator=g, dtype=torch.float64)
    ref[0, :, 0] = ref.max() + 5.0
    ref[0, :, 1] = ref[0, :, 0] - torch.tensor(gaps, dtype=torch.float64)
    return ref


def test_top1_flip_at_a_decisive_position_fails_inside_the_element_tolerance():
    ref = logits_with_gaps([0.01, 2.0, 2.0, 2.0])
    flipped = ref.clone()
    flipped[0, 1, 0], flipped[0, 1, 1] = ref[0, 1, 1], ref[0, 1, 0]  # swap the top two at position 1 (gap 2.0)
    judge = judges.Judge(torch.bfloat16, TOLERANCES[torch.bfloat16])
    mask = torch.ones(1, 4, dtype=torch.long)
    check = judges.check_logits(flipped, ref, mask, judge)
    assert check.comparison.passed, "the flip stays inside the element tolerance"
    assert check.decisive_disagreements == 1 and not check.passed and "decisive" in check.reasons()
    # a flip at the near-tie (gap 0.01) is rounding's right
    near = ref.clone()
    near[0, 0, 0], near[0, 0, 1] = ref[0, 0, 1], ref[0, 0, 0]
    assert judges.check_logits(near, ref, mask, judge).passed


def test_decisiveness_does_not_come_from_the_candidate():
    """A candidate with a large error everywhere cannot make a flip 'indecisive' by its own error."""
    ref = logits_with_gaps([2.0] * 4)
    cand = ref.clone()
    cand[0, 2, 0], cand[0, 2, 1] = ref[0, 2, 1], ref[0, 2, 0]
    cand = cand + 1.5 * torch.randn(cand.shape, generator=torch.Generator().manual_seed(3), dtype=cand.dtype)
    check = judges.check_logits(cand, ref, torch.ones(1, 4, dtype=torch.long),
                                judges.Judge(torch.bfloat16, TOLERANCES[torch.bfloat16]))
    assert check.decisive_positions == 4 and check.decisive_disagreements >= 1


def test_a_distribution_judge_never_gates_a_single_positions_mean():
    ref = logits_with_gaps([3.0] * 16)
    cand = ref.clone()
    cand[0, 8, 2] = ref[0, 8, 0] - 3.0  # one position's distribution moves (a routing flip): KL ~4e-2
    d = DISTRIBUTIONS["moe-bfloat16"]
    judge = judges.Judge(torch.bfloat16, d)
    one = judges.check_logits(cand[:, 8:9], ref[:, 8:9], torch.ones(1, 1, dtype=torch.long), judge, aggregate=False)
    assert d.kl_mean < one.kl_mean < d.kl_max and one.passed, "one position: only its KL max is gated"
    together = judges.check_logits(cand, ref, torch.ones(1, 16, dtype=torch.long), judge)
    assert together.kl_mean < d.kl_mean and together.passed


def test_unknown_format_of_a_plugin_is_one_clear_line():
    class Plugin:
        dtype, format = torch.float16, "q3_k"

    with pytest.raises(UsageError, match="format 'q3_k' has no measured thresholds"):
        judges.judge_for(Plugin(), "llama", calibrated=False)


def test_logits_check_reads_long_prompts_in_chunks_with_the_same_figures(monkeypatch):
    """check_logits and compare() read [positions x vocab] in float64 slices: the figures do not depend on the
    slice size (a long prompt of a 128k vocabulary never exists in float64 whole)."""
    from kitcore import compare as compare_module

    torch.manual_seed(0)
    ref = torch.randn(2, 40, 300) * 3
    cand, peer = ref + 1e-4 * torch.randn_like(ref), ref + 1e-4 * torch.randn_like(ref)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0
    judge = judges.Judge(torch.float32, judges.TOLERANCES[torch.float32], calibrated=True)
    whole = judges.check_logits(cand, ref, mask, judge, peer)
    monkeypatch.setattr(compare_module, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(judges, "CHUNK_ELEMENTS", 1000)
    sliced = judges.check_logits(cand, ref, mask, judge, peer)
    for key in ("max_abs", "mean_abs", "nmse", "mismatched", "worst_index", "cosine"):
        assert getattr(sliced.comparison, key) == pytest.approx(getattr(whole.comparison, key), rel=1e-9), key
    for key in ("kl_mean", "kl_max", "top1_agreement", "decisive_positions", "position_failures", "passed"):
        assert getattr(sliced, key) == pytest.approx(getattr(whole, key), rel=1e-9), key
    assert sliced.positions == 73


def test_failed_steps_skip_steps_a_comparison_did_not_reach():
    """A vs B is not compared once an engine that decodes by itself leaves the teacher (no key at that step)."""
    from kitcore.stepwise import failed_steps

    steps = [{"step": 0, "a_vs_b": {"passed": True}}, {"step": 1, "a_vs_b": {"passed": False}}, {"step": 2}]
    assert failed_steps(steps, "a_vs_b") == [1]


def test_a_distribution_rate_fails_on_two_misses_not_one():
    """One top-1 flip among 27 positions (3.7%, below moe-float16's 0.97) is a near-tie's rounding: passes;
    two fail, naming how many."""
    ref = logits_with_gaps([0.01] * 27)  # every position a near-tie: no flip is decisive
    judge = judges.Judge(torch.float16, DISTRIBUTIONS["moe-float16"])
    mask = torch.ones(1, 27, dtype=torch.long)
    for flips, passes in ((1, True), (2, False)):
        cand = ref.clone()
        for p in range(flips):
            cand[0, p, 0], cand[0, p, 1] = ref[0, p, 1], ref[0, p, 0]
        check = judges.check_logits(cand, ref, mask, judge)
        assert check.passed == passes and check.decisive_disagreements == 0, check.reasons()
    assert "top-1 agreement 0.926 below 0.95 (2 of 27 positions)" in check.reasons()


def test_a_verdict_is_every_outcome_and_names_the_first_failure():
    verdict = Verdict("every step CLOSE")
    assert verdict.passed and verdict.line() == "PASS: every step CLOSE"
    verdict.add("step 0", True)
    verdict.add("step 3", False, "step 3 is NOT_CLOSE: KL max 2.1e-02 above 1.0e-02")
    verdict.add("memory", False, "memory grows with every call")
    assert not verdict.passed
    assert verdict.line() == "FAIL: step 3 is NOT_CLOSE: KL max 2.1e-02 above 1.0e-02 (and 1 more: memory)"
    assert [o["about"] for o in verdict.as_list()] == ["step 0", "step 3", "memory"]
