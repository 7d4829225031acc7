#!/usr/bin/env python3
"""Regression compare: pair the records of two runs and say what changed. Exit 1 on a regression.

    python tools/compare.py BASELINE CURRENT [--format md|csv|json]

BASELINE and CURRENT are results files (results/results.jsonl, JSON Lines), a script's --json output,
or raw logs (read with tools/metrics.py). Records pair by every label they carry (script, case, metric and
every setting that changes a figure: device, dtype, engine, its --engine_args, attn, impl, gguf_type,
kv_type, control, row, layer, point, phase, kind, expert, sweep, size, cache ...), never by the value, its
unit or where the run was stored: a sweep compares point by point, cold timings with cold ones, a q8_0 KV
cache with a q8_0 one.

  * timing rows (median_ms with its iqr_ms): SAME when the medians differ by less than the measured
    spread of both runs (sqrt(iqr_a^2 + iqr_b^2)), else FASTER or SLOWER. Never a fixed percent.
  * figures with an interval (a `<metric>_low` and `<metric>_high` beside them: corpus scoring's block-bootstrap
    intervals): SAME while the two intervals overlap, else GREW or SHRANK (same_top1, where higher is better: FELL
    or ROSE). The interval is the spread; never a fixed factor.
  * error rows (max_abs, mean_abs, nmse): GREW when the current error is above twice the baseline
    (and above 1e-12), else SAME or SHRANK.
  * memory rows (unit bytes: peak memory per phase or case, growth per call under --repeat): GREW when
    the current value is above the baseline by more than 10% and more than 1 MiB (growth per call: more
    than the leak limit, 64 KiB), else SAME or SHRANK. A verdict or `passed` flag that goes from pass to fail:
    REGRESSED.
  * records without a partner are listed as ONLY_BASELINE / ONLY_CURRENT, never dropped.
SLOWER, GREW, FELL and REGRESSED are regressions.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metrics  # noqa: E402
from kitcore import cli, memory, store  # noqa: E402
from kitcore.errors import EXIT_FAIL, EXIT_PASS, UsageError  # noqa: E402

# the columns shown first; every other label a record carries identifies it too
KEY = ("script", "case", "device", "dtype", "engine", "attn", "impl", "gguf_type", "kv_type", "row", "layer", "point",
       "phase", "kind", "expert", "sweep", "size", "cache", "metric")
NOT_IDENTIFYING = {"value", "unit", "run_id", "session", "env", "log", "source", "line", "verdict", "commit"}
ERROR_METRICS = {"max_abs", "mean_abs", "nmse", "own_max_abs", "own_nmse", "kl_mean", "kl_max"}
REGRESSIONS = {"SLOWER", "GREW", "FELL", "REGRESSED"}
HIGHER_IS_BETTER = {"same_top1"}
MEMORY_RELATIVE_NOISE, MEMORY_NOISE_BYTES = 0.10, 2**20


def load(path):
    """Records of a results file, a --json output or a log; the last record of a key wins (latest run)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    text = p.read_text(errors="replace")
    if p.suffix == ".json":
        try:
            return json.loads(text)["records"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path}: not a kit --json result (no records)") from None
    if p.suffix == ".jsonl":
        return store.read_records(path)
    return metrics.parse_file(path)


def key_columns(*record_lists):
    """KEY, then every other identifying label any record carries (sorted), ending with the metric."""
    extra = sorted({k for records in record_lists for r in records for k in r} - set(KEY) - NOT_IDENTIFYING)
    return KEY[:-1] + tuple(extra) + KEY[-1:]


def index(records, columns):
    return {tuple(str(r.get(k, "")) for k in columns): r for r in records}


def timing_status(b, iqr_b, c, iqr_c):
    """The rule for two medians: SAME within the measured spread of both runs, else SLOWER or FASTER; and why.
    tools/report.py marks a benchmark's history with it."""
    noise = math.hypot(iqr_b, iqr_c)
    if abs(c - b) <= noise:
        return "SAME", f"|{c - b:+.4g}| ms within spread {noise:.4g} ms"
    return ("SLOWER" if c > b else "FASTER"), f"{c - b:+.4g} ms ({(c / b - 1) * 100 if b else float('inf'):+.1f}%), spread {noise:.4g} ms"


def interval_status(metric, low_b, high_b, low_c, high_c, b, c):
    """Two figures with their intervals: SAME while the intervals overlap, else which way it moved."""
    detail = f"{b:.4g} [{low_b:.4g}, {high_b:.4g}] -> {c:.4g} [{low_c:.4g}, {high_c:.4g}]"
    if low_c <= high_b and low_b <= high_c:
        return "SAME", detail
    up = low_c > high_b
    if metric in HIGHER_IS_BETTER:
        return ("ROSE" if up else "FELL"), detail
    return ("GREW" if up else "SHRANK"), detail


def judge(key, base, cur, base_idx, cur_idx):
    metric = key[-1]
    b, c = float(base["value"]), float(cur["value"])
    if metric == "median_ms":
        spread_key = key[:-1] + ("iqr_ms",)
        iqr_b = float(base_idx.get(spread_key, {}).get("value", 0.0))
        iqr_c = float(cur_idx.get(spread_key, {}).get("value", 0.0))
        return timing_status(b, iqr_b, c, iqr_c)
    if cur.get("unit") == "bytes":
        floor = memory.LEAK_BYTES_PER_ITERATION if "growth" in metric else MEMORY_NOISE_BYTES
        noise = max(MEMORY_RELATIVE_NOISE * abs(b), floor)
        detail = f"{b / 2**20:.2f} -> {c / 2**20:.2f} MiB"
        return ("GREW" if c - b > noise else "SHRANK" if b - c > noise else "SAME"), detail
    bounds = [idx.get(key[:-1] + (f"{metric}_{end}",)) for idx in (base_idx, cur_idx) for end in ("low", "high")]
    if all(bounds):
        return interval_status(metric, *(float(x["value"]) for x in bounds), b, c)
    if metric in ERROR_METRICS:
        if c > 2 * b and c > 1e-12:
            return "GREW", f"{b:.3e} -> {c:.3e}"
        return ("SHRANK" if c < b / 2 else "SAME"), f"{b:.3e} -> {c:.3e}"
    if metric == "passed" or metric == "verdict":
        ok_b = b == (1.0 if metric == "passed" else 0.0)
        ok_c = c == (1.0 if metric == "passed" else 0.0)
        if ok_b and not ok_c:
            return "REGRESSED", "pass -> fail"
        return ("FIXED" if ok_c and not ok_b else "SAME"), ("pass" if ok_c else "fail")
    return "INFO", f"{b:.6g} -> {c:.6g}"


def compare_runs(baseline, current, columns=None):
    columns = columns or key_columns(baseline, current)
    base_idx, cur_idx = index(baseline, columns), index(current, columns)
    rows = []
    for key in sorted(set(base_idx) | set(cur_idx)):
        if key not in cur_idx:
            rows.append((key, "ONLY_BASELINE", ""))
        elif key not in base_idx:
            rows.append((key, "ONLY_CURRENT", ""))
        else:
            rows.append((key, *judge(key, base_idx[key], cur_idx[key], base_idx, cur_idx)))
    return rows


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("baseline")
    parser.add_argument("current")
    parser.add_argument("--format", default="md", choices=["md", "csv", "json"])
    parser.add_argument("--all", action="store_true", help="also list INFO rows (metrics without a rule)")
    args = parser.parse_args(argv)
    baseline, current = load(args.baseline), load(args.current)
    columns = key_columns(baseline, current)
    rows = compare_runs(baseline, current, columns)
    shown = [r for r in rows if args.all or r[1] != "INFO"]
    if args.format == "json":
        print(json.dumps([dict(zip(columns, key), status=s, detail=d) for key, s, d in shown], indent=1))
    else:
        sep = "," if args.format == "csv" else " | "
        print(sep.join(columns + ("status", "detail")))
        for key, status, detail in shown:
            print(sep.join(list(key) + [status, detail]))
    regressions = [r for r in rows if r[1] in REGRESSIONS]
    counts = {}
    for _, status, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    print(f"\n{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=sys.stderr)
    if regressions:
        print(f"REGRESSION: {len(regressions)} row(s) are SLOWER, GREW or REGRESSED", file=sys.stderr)
    return EXIT_FAIL if regressions else EXIT_PASS


if __name__ == "__main__":
    sys.exit(cli.run(main))
