"""Orchestration: metric parser, results file, regression compare, HTML report, nox sessions."""

import json
import multiprocessing
import shutil
import subprocess
import sys

import pytest
from kit_helpers import FAULTY_ENGINES, ROOT, run_script, run_subprocess

import metrics
from kitcore import store

ORIGINAL_LOG = """Namespace(model_path='/data/Qwen3-30B-A3B', cpu=False, nvidia=True)

**********************************************************************************************************************************
Test Qwen3attention 
Test Case PREFILL_TESTCASES : {'seqlens': [64, 128, 256, 256], 'pastlens': [512, 0, 0, 256]}
\t WARMUPS=10 RUNS=100, Attention Torch, average TTFT: 16.15 ms

Test DECODE_TESTCASES: {'seqlens': [1, 1], 'pastlens': [50, 50]}
\t WARMUPS=10 RUNS=100, Attention Torch, average throughput: 524.35 tok/s 
Test Qwen3 MoE
Test Case PREFILL_TESTCASES : {'seqlens': [64, 128, 256, 256], 'pastlens': [512, 0, 0, 256]}
\t WARMUPS=10 RUNS=100, MoE Torch average latency: 21.09 ms   throughput: 33387.11 tok/s
Test DECODE_TESTCASES: {'seqlens': [1, 1, 1], 'pastlens': [50, 50, 50]}
\t WARMUPS=10 RUNS=100, MoE Torch average latency: 5.72 ms   throughput: 2795.93 tok/s
======================================== PREFILL ========================================
>>> Injecting Cache to InfiniLM...
Latency: Torch=3.217ms, Infini=1.002ms
Cosine Similarity: 0.999512
✅ Result Match
======================================== DECODE ========================================
Throughput: Torch=812.5 tok/s, Infini=2301.0 tok/s
Cosine Similarity: 0.987001
\t WARMUPS=10 RUNS=100, Attention Torch, average TTFT: 1x.5 ms
     Max absolute difference: 1.234567e-02
"""


def test_parser_reads_the_original_formats():
    warnings = []
    records = metrics.parse_lines(ORIGINAL_LOG.splitlines(), "orig.log", warnings.append)
    got = {(r["script"], r["case"], r["metric"], r.get("engine")): r["value"] for r in records}
    assert got[("attention_test", "prefill", "ttft_batch_relative_mean_ms", "torch")] == 16.15
    assert got[("attention_test", "decode", "tokens_per_s_original_formula", "torch")] == 524.35
    assert got[("moe_test", "prefill", "mean_ms", "torch")] == 21.09
    assert got[("moe_test", "decode", "tokens_per_s_mean", "torch")] == 2795.93
    assert got[("attention_test", "prefill", "latency_ms", "infini")] == 1.002
    assert got[("attention_test", "decode", "tokens_per_s", "torch")] == 812.5
    assert got[("original", "prefill", "cosine", None)] == 0.999512
    assert got[("original", "decode", "cosine", None)] == 0.987001
    assert got[("original", "decode", "max_abs", None)] == 0.01234567
    bad_line = next(i for i, line in enumerate(ORIGINAL_LOG.splitlines(), 1) if "1x.5" in line)
    assert warnings == [f"orig.log:{bad_line}: malformed number '1x.5' in: "
                        "WARMUPS=10 RUNS=100, Attention Torch, average TTFT: 1x.5 ms"]


def test_parser_reads_real_kit_logs_and_their_original_lines(moe_checkpoint, tmp_path):
    r = run_script("test/models/qwen3_moe/moe_test.py", "--model_path", moe_checkpoint, "--warmups", 1, "--runs", 3)
    log = tmp_path / "moe.log"
    log.write_text(r.out)
    records = metrics.parse_file(log)
    kit = [x for x in records if x["format"] == "kit"]
    original = [x for x in records if x["format"] == "original"]
    assert kit[-1]["metric"] == "verdict" and kit[-1]["value"] == 0 and kit[-1]["verdict"] == "pass"
    assert {x["metric"] for x in kit} >= {"median_ms", "iqr_ms", "tokens_per_s", "nmse", "expert_tokens"}
    assert {x["case"] for x in original} == {"prefill", "decode"}
    assert len(kit) == r.out.count("\nKIT ") + r.out.startswith("KIT ")
    for fmt in ("json", "csv", "md"):
        assert run_script("tools/metrics.py", log, "--format", fmt).code == 0


def test_parser_survives_empty_and_truncated_logs(tmp_path):
    (tmp_path / "empty.log").write_text("")
    (tmp_path / "cut.log").write_text("KIT script=a case=b metric=c value=1.5 unit=ms\nKIT script=a case=b metr")
    assert metrics.parse_file(tmp_path / "empty.log") == []
    warnings = []
    records = metrics.parse_file(tmp_path / "cut.log", warnings.append)
    assert len(records) == 1 and records[0]["value"] == 1.5
    assert len(warnings) == 1 and "cut.log:2" in warnings[0]
    r = run_script("tools/metrics.py", tmp_path / "missing.log")
    assert r.code == 2 and "cannot read" in r.err


def _append_many(path, worker):
    for i in range(200):
        store.append_records(path, [{"script": "s", "case": str(worker), "metric": "m", "value": float(i)}] * 3)


def test_results_file_concurrent_writers_and_half_written_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(store.read_records(path)) == 2 * 200 * 3
    with open(path, "a") as f:
        f.write('{"script": "s", "case": "x", "met')  # a writer killed mid-line
    store.append_records(path, [{"script": "s", "case": "after", "metric": "m", "value": 1.0}])
    warnings = []
    records = store.read_records(path, warnings.append)
    assert len(records) == 1201 and records[-1]["case"] == "after"
    assert len(warnings) == 1 and f"{path}:1201:" in warnings[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timing_rows(median, iqr, extra=()):
    base = {"script": "moe_test", "case": "prefill", "device": "cpu", "dtype": "bfloat16", "engine": "hf"}
    return [{**base, "metric": "median_ms", "value": median}, {**base, "metric": "iqr_ms", "value": iqr},
            *[{**base, **e} for e in extra]]


@pytest.mark.parametrize("current,status,code", [
    (timing_rows(10.3, 0.4), "SAME", 0),
    (timing_rows(12.0, 0.4), "SLOWER", 1),
    (timing_rows(8.0, 0.4), "FASTER", 0),
    (timing_rows(10.0, 0.4, [{"metric": "nmse", "value": 5e-5}]), "GREW", 1),
    (timing_rows(10.0, 0.4, [{"metric": "passed", "value": 0.0}]), "REGRESSED", 1),
])
def test_regression_compare(current, status, code, tmp_path):
    baseline = write_jsonl(tmp_path / "base.jsonl", timing_rows(10.0, 0.5, [{"metric": "nmse", "value": 2e-5},
                                                                           {"metric": "passed", "value": 1.0}]))
    cur = write_jsonl(tmp_path / "cur.jsonl", current)
    r = run_script("tools/compare.py", baseline, cur, "--format", "json")
    assert r.code == code, r
    rows = {row["metric"]: row["status"] for row in json.loads(r.out)}
    assert status in rows.values(), rows


def test_compare_lists_records_without_a_partner(tmp_path):
    baseline = write_jsonl(tmp_path / "b.jsonl", timing_rows(10.0, 0.5))
    cur = write_jsonl(tmp_path / "c.jsonl", [{**timing_rows(10.0, 0.5)[0], "case": "decode"}])
    rows = json.loads(run_script("tools/compare.py", baseline, cur, "--format", "json").out)
    assert sorted(r["status"] for r in rows) == ["ONLY_BASELINE", "ONLY_BASELINE", "ONLY_CURRENT"]


def test_compare_pairs_on_every_identifying_label(tmp_path):
    """Per-expert and per-layer records, and two attention implementations, never collapse into one row."""
    base = {"script": "moe_test", "case": "prefill", "device": "cpu", "dtype": "bfloat16", "engine": "hf",
            "metric": "expert_tokens"}
    rows = [{**base, "expert": e, "value": 10.0 * e} for e in range(4)]
    rows += [{**base, "script": "test_intermediate_validation", "metric": "nmse", "layer": i, "point": "q_proj",
              "attn": attn, "value": 1e-5} for i in range(2) for attn in ("eager", "sdpa")]
    baseline = write_jsonl(tmp_path / "b.jsonl", rows)
    cur = write_jsonl(tmp_path / "c.jsonl", rows)
    out = json.loads(run_script("tools/compare.py", baseline, cur, "--format", "json", "--all").out)
    assert len(out) == 8 and all(r["status"] in ("SAME", "INFO") for r in out), out


def test_compare_never_pairs_runs_of_other_settings(tmp_path):
    """A q8_0 and a q4_0 KV-cache run of one script, two controls, two --engine_args: each only with its own."""
    base = {"script": "test_forward_validation", "case": "all_steps", "device": "cpu", "dtype": "float32",
            "engine": "llama.cpp", "metric": "kl_mean"}
    baseline = write_jsonl(tmp_path / "b.jsonl", [{**base, "kv_type": "q8_0", "value": 1e-4},
                                                  {**base, "control": "scale_1pct", "value": 1.0},
                                                  {**base, "engine_args": '{"n_batch":16}', "value": 1e-6}])
    cur = write_jsonl(tmp_path / "c.jsonl", [{**base, "kv_type": "q4_0", "value": 1e-3},
                                             {**base, "control": "scale_3pct", "value": 1.0},
                                             {**base, "engine_args": '{"n_batch":32}', "value": 1e-6}])
    r = run_script("tools/compare.py", baseline, cur, "--format", "json")
    rows = json.loads(r.out)
    assert r.code == 0 and sorted(row["status"] for row in rows) == ["ONLY_BASELINE"] * 3 + ["ONLY_CURRENT"] * 3, rows
    assert {row["kv_type"] for row in rows} == {"q8_0", "q4_0", ""}, rows


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, llama_checkpoint, moe_checkpoint):
    """A results file from real runs of three scripts and a sweep, as nox sessions write it."""
    path = tmp_path_factory.mktemp("results") / "results.jsonl"
    runs = [("test/models/llama/test_intermediate_validation.py", ["--model_path", llama_checkpoint]),
            ("test/models/qwen3_moe/moe_test.py", ["--model_path", moe_checkpoint, "--warmups", 1, "--runs", 3]),
            ("test/models/qwen3_moe/attention_test.py", ["--model_path", moe_checkpoint, "--warmups", 1, "--runs", 3]),
            ("test/models/qwen3_moe/moe_test.py", ["--model_path", moe_checkpoint, "--sweep", "--cold", "--engine",
                                                   "compile", "--warmups", 1, "--runs", 3]),
            ("test/models/llama/test_forward_validation.py", ["--model_path", llama_checkpoint, "--engine",
                                                              f"{FAULTY_ENGINES}:GrowingCacheErrorEngine",
                                                              "--decode_steps", 64, "--dtype", "float32"])]
    for i, (script, argv) in enumerate(runs):
        out = run_script(script, *argv).out
        records = metrics.parse_lines(out.splitlines(), script)
        store.append_records(path, [{**r, "run_id": f"run{i}"} for r in records])
    return path


def test_report_has_every_section(results_file, tmp_path):
    out = tmp_path / "report.html"
    assert run_script("tools/report.py", results_file, "-o", out).code == 0
    text = out.read_text()
    for chart in ("error-growth", "heatmap", "latency", "routing", "sweep", "decode-error"):
        assert f'data-chart="{chart}"' in text, chart
    assert "a_vs_ref: slope +" in text  # the growing cache's curve, its slope in the legend
    assert "Sweep tokens of moe_test" in text and text.count('data-chart="sweep"') == 1
    assert "<script" not in text and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_registry_drives_make_and_nox_on_a_moe(moe_checkpoint):
    """make validate-real's driver on a Qwen3-MoE checkpoint: every registered check of test/models/llama runs;
    nox's lists and summary headlines come from the same registry."""
    from kitcore import registry

    r = run_subprocess("tools/run_checks.py", "llama", "--", "--model_path", moe_checkpoint, "--dtype", "float32",
                       cwd=ROOT)
    assert r.code == 0, r
    llama_checks = [c for c in registry.CHECKS if c.family == "llama"]
    assert r.out.count("KIT script=") and r.out.count("metric=verdict") == len(llama_checks) == 5, r
    assert "layers.1.experts_selected" in r.out
    makefile = (ROOT / "Makefile").read_text()
    assert "test_forward_validation" not in makefile and "attention_test" not in makefile
    assert [c.name for c in registry.CHECKS if c.family == "llama"][0] == "test_llama_inference"


def test_report_draws_each_benchmarks_history_and_marks_the_slower_run(tmp_path):
    """Three runs of one benchmark: the report's history marks the third (median 14 ms after 10.2, spreads 0.5)
    as slower by compare.py's rule; its other sections show the latest run of each configuration only, and a
    q8_0 and a q4_0 KV-cache run are two configurations."""
    rows = []
    for run, median in (("r1", 10.0), ("r2", 10.2), ("r3", 14.0)):
        rows += [{**r, "run_id": run, "commit": f"c{run}"} for r in timing_rows(median, 0.5)]
        rows += [{"script": "moe_test", "case": "all", "metric": "verdict", "value": 0, "engine": "hf",
                  "device": "cpu", "dtype": "bfloat16", "run_id": run}]
    for kv in ("q8_0", "q4_0"):
        rows.append({"script": "test_forward_validation", "case": "all", "metric": "verdict", "value": 0,
                     "engine": "llama.cpp", "kv_type": kv, "device": "cpu", "dtype": "float32", "run_id": "r4"})
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    out = tmp_path / "report.html"
    assert run_script("tools/report.py", results, "-o", out).code == 0
    text = out.read_text()
    assert text.count('data-chart="history"') == 1
    assert text.count('class="run-slower"') == 1 and text.count('class="run-same"') == 1, text
    assert "r3 cr3: median 14 ms SLOWER" in text
    assert "kv_type=q8_0" in text and "kv_type=q4_0" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(results_file, tmp_path):
    out = tmp_path / "report.html"
    run_script("tools/report.py", results_file, "-o", out)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    for chart in ("error-growth", "heatmap", "latency", "routing", "sweep", "decode-error"):
        assert f'data-chart="{chart}"' in dom.stdout, (chart, dom.stderr[-500:])
    assert dom.stdout.count("<rect") > 50 and "<path" in dom.stdout
    png = tmp_path / "report.png"
    subprocess.run(["chromium", *flags, "--window-size=1200,2000", f"--screenshot={png}", out.as_uri()],
                   capture_output=True, timeout=120)
    assert png.stat().st_size > 20_000  # a blank page is a few kB


def run_nox(*args):
    return subprocess.run([sys.executable, "-m", "nox", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_nox_lists_the_matrix():
    r = run_nox("-l")
    assert r.returncode == 0, r.stderr
    for name in ("validate-llama-cpu(dtype='float16')", "bench-cuda(dtype='bfloat16')", "bench-musa", "matrix",
                 "tests-transformers-oldest", "validate-llama-iluvatar", "bench-mars"):
        assert name in r.stdout, name


def test_nox_skips_an_absent_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_nox("-s", "bench-cuda")
    assert r.returncode == 0, r.stderr
    assert "skipped (--nvidia: no cuda device is present" in r.stderr
