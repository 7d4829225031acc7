#!/usr/bin/env python3
"""One self-contained HTML report of a results file (no scripts, no network: inline SVG and CSS).

    python tools/report.py results/results.jsonl -o report.html

Sections: verdicts; Llama per-layer error growth (chart); the layer x component error heatmap; forward
validation's KL by decode step (how a KV cache's error moves with length);
latency per case with p10-p90 spread bars; scaling sweeps (latency and fraction of the roofline against
size); the MoE routing histogram; each benchmark median's history over every run in the file, a run
marked where tools/compare.py's rule calls it slower than the one before. Each chart is an <svg> with
class "kit-chart" and a data-chart name. Of each configuration (script, device, dtype, engine and its
settings) the latest run is shown, but in the history.
"""

import html
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from kitcore import cli, store  # noqa: E402
from kitcore.compare import TOLERANCES  # noqa: E402
from kitcore.judges import PEER_K  # noqa: E402
from kitcore.devices import DTYPES  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402
from kitcore.points import LAYER_POINTS  # noqa: E402
from kitcore.results import write_text_atomic  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def esc(x):
    return html.escape(str(x))


SETTINGS = ("gguf_type", "kv_type", "engine_args", "attn", "impl")  # besides device and dtype: what a run ran with


def group_key(r):
    """A configuration: the script, device, dtype and engine with every setting that changes its figures."""
    engine = r.get("engine", "") + "".join(f" {k}={r[k]}" for k in SETTINGS if r.get(k))
    return (r.get("script", ""), r.get("device", ""), r.get("dtype", ""), engine)


def latest_runs(records):
    """Records of the latest run of each configuration (by run_id, else by order)."""
    last_run = {}
    for r in records:
        last_run[group_key(r)] = r.get("run_id", "")
    return [r for r in records if r.get("run_id", "") == last_run[group_key(r)]]


def log10(v):
    return math.log10(v) if v > 0 else -16.0


def svg(name, width, height, body, title):
    return (f'<figure><figcaption>{esc(title)}</figcaption><svg class="kit-chart" data-chart="{name}" '
            f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'{body}</svg></figure>')


def verdict_table(records):
    rows = [r for r in records if r.get("metric") == "verdict"]
    if not rows:
        return "<p>No verdicts in this file.</p>"
    words = {0: "pass", 1: "FAIL", 2: "usage error", 3: "unavailable", 4: "internal error"}
    out = ["<table><tr><th>script</th><th>device</th><th>dtype</th><th>engine</th><th>verdict</th><th>run</th></tr>"]
    for r in rows:
        v = words.get(int(r["value"]), r["value"])
        out.append(f'<tr class="{"pass" if v == "pass" else "fail"}"><td>{esc(r.get("script"))}</td>'
                   f'<td>{esc(r.get("device"))}</td><td>{esc(r.get("dtype"))}</td><td>{esc(group_key(r)[3])}</td>'
                   f'<td>{esc(v)}</td><td>{esc(r.get("run_id", ""))}</td></tr>')
    return "\n".join(out) + "</table>"


def error_growth(records):
    """nmse at every capture point, in execution order, one line per device/dtype/engine."""
    series = {}
    for r in records:
        if r.get("script") == "test_intermediate_validation" and r.get("metric") == "nmse":
            series.setdefault(group_key(r)[1:], []).append((r["case"], float(r["value"])))
    if not series:
        return "<p>No intermediate-validation records.</p>"
    w, h, left, bottom = 900, 320, 60, 40
    n = max(len(s) for s in series.values())
    lo = min(log10(v) for s in series.values() for _, v in s)
    hi = max(log10(v) for s in series.values() for _, v in s)
    lo, hi = math.floor(lo), math.ceil(hi) if hi > lo else math.floor(lo) + 1
    x = lambda i: left + i * (w - left - 20) / max(n - 1, 1)  # noqa: E731
    y = lambda v: h - bottom - (log10(v) - lo) / (hi - lo) * (h - bottom - 20)  # noqa: E731
    body = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - 20}" y2="{h - bottom}" stroke="#888"/>']
    for e in range(lo, hi + 1):
        yy = h - bottom - (e - lo) / (hi - lo) * (h - bottom - 20)
        body.append(f'<text x="5" y="{yy + 4:.1f}" font-size="11">1e{e}</text>'
                    f'<line x1="{left}" y1="{yy:.1f}" x2="{w - 20}" y2="{yy:.1f}" stroke="#eee"/>')
    for k, (label, points) in enumerate(sorted(series.items())):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{x(i):.1f},{y(v):.1f}" for i, (_, v) in enumerate(points))
        body.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for i, (case, v) in enumerate(points):
            body.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2" fill="{color}"><title>{esc(case)}: '
                        f'{v:.3e}</title></circle>')
        body.append(f'<text x="{left + 10}" y="{14 + 14 * k}" font-size="12" fill="{color}">{esc(" / ".join(label))}</text>')
    body.append(f'<text x="{left}" y="{h - 10}" font-size="11">capture points in execution order '
                f'(embed_tokens ... logits)</text>')
    return svg("error-growth", w, h, "".join(body), "Llama: NMSE against the reference at every capture point")


DECODE_COLUMNS = ("a_vs_ref", "b_vs_ref", "a_vs_b")  # forward validation's comparisons with a curve worth drawing


def running_mean(points, window=16):
    """(step, value) points averaged over the last `window` steps: the trend under one step's noise."""
    out, values = [], []
    for step, value in points:
        values = (values + [value])[-window:]
        out.append((step, sum(values) / len(values)))
    return out


def decode_curves(records):
    """Forward validation's KL by decode step (one chart per run of 8 steps or more): how a KV cache's error
    moves with decode length. Each step faint, its 16-step running mean solid, the length gate's bound
    dashed where one applies; each line's slope (from the trend records) in the legend."""
    curves, trends = {}, {}
    for r in records:
        if r.get("script") != "test_forward_validation":
            continue
        metric, case = r.get("metric", ""), r.get("case", "")
        if case.startswith("step") and metric.endswith("_kl") and metric[:-3] in DECODE_COLUMNS:
            curves.setdefault(group_key(r)[1:], {}).setdefault(metric[:-3], []).append((int(case[4:]), float(r["value"])))
        elif case == "trend" and metric.endswith(("_slope", "_limit")):
            trends[group_key(r)[1:] + (metric[:-6], metric[-5:])] = float(r["value"])
    out = []
    for label, columns in sorted(curves.items()):
        if max(len(points) for points in columns.values()) < 8:
            continue
        w, h, left, top, bottom = 900, 360, 60, 20 + 14 * len(columns), 40
        limits = {c: trends.get(label + (c, "limit")) for c in columns}
        values = [v for points in columns.values() for _, v in points if v > 0] + [v for v in limits.values() if v]
        lo, hi = math.floor(min(map(log10, values))), math.ceil(max(map(log10, values)))
        hi = hi if hi > lo else lo + 1
        n = max(s for points in columns.values() for s, _ in points)
        x = lambda s: left + s * (w - left - 20) / max(n, 1)  # noqa: E731
        y = lambda v: h - bottom - (log10(max(v, 10.0**lo)) - lo) / (hi - lo) * (h - bottom - top)  # noqa: E731
        body = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - 20}" y2="{h - bottom}" stroke="#888"/>']
        for e in range(lo, hi + 1):
            yy = y(10.0**e)
            body.append(f'<text x="5" y="{yy + 4:.1f}" font-size="11">1e{e}</text>'
                        f'<line x1="{left}" y1="{yy:.1f}" x2="{w - 20}" y2="{yy:.1f}" stroke="#eee"/>')
        for k, (column, points) in enumerate(sorted(columns.items())):
            color, points = COLORS[k % len(COLORS)], sorted(points)
            for line, style in ((points, 'stroke-width="0.8" opacity="0.35"'),
                                (running_mean(points), 'stroke-width="2"')):
                path = " ".join(f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (s, v) in enumerate(line))
                body.append(f'<path d="{path}" fill="none" stroke="{color}" {style}/>')
            if limits[column]:
                yy = y(limits[column])
                body.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{w - 20}" y2="{yy:.1f}" stroke="{color}" '
                            f'stroke-dasharray="6,4"><title>{esc(column)}: KL-mean bound of the last quarter '
                            f'{limits[column]:.2g}</title></line>')
            slope = trends.get(label + (column, "slope"))
            legend = column + ("" if slope is None else f": slope {slope:+.2e} nats per 100 steps") + (
                f", last quarter gated at {limits[column]:.2g} (dashed)" if limits[column] else "")
            body.append(f'<text x="{left + 10}" y="{14 + 14 * k}" font-size="12" fill="{color}">{esc(legend)}</text>')
        body.append(f'<text x="{left}" y="{h - 10}" font-size="11">decode step (0: the prefill\'s last position); '
                    f'KL(reference || engine) per step (faint) and its 16-step running mean, log scale</text>')
        out.append(svg("decode-error", w, h, "".join(body), f"Forward validation: KL by decode step ({' / '.join(label)})"))
    return "\n".join(out) or "<p>No forward validation of 8 decode steps or more.</p>"


def heatmap(records):
    """layer x component log10(nmse) of the latest intermediate run per device/dtype/engine."""
    out = []
    runs = {}
    limits = {}  # calibrated runs: each cell's allowed nmse, k^2 x the peer's there
    for r in records:
        if r.get("script") == "test_intermediate_validation" and r.get("layer") not in (None, "", "None"):
            cell = (int(r["layer"]), r.get("point"))
            if r.get("metric") == "nmse":
                runs.setdefault(group_key(r)[1:], {})[cell] = float(r["value"])
            elif r.get("metric") == "peer_nmse":
                limits.setdefault(group_key(r)[1:], {})[cell] = PEER_K**2 * float(r["value"])
    for label, cells in sorted(runs.items()):
        tolerance = TOLERANCES[DTYPES.get(label[1], torch.float32)].nmse
        cell_limits = limits.get(label, {})
        layers = sorted({layer for layer, _ in cells})
        cw, ch, left, top = 44, 18, 60, 110
        w, h = left + cw * len(LAYER_POINTS) + 10, top + ch * len(layers) + 10
        body = []
        for j, point in enumerate(LAYER_POINTS):
            tx = left + j * cw + cw / 2
            body.append(f'<text transform="translate({tx:.0f},{top - 6}) rotate(-60)" font-size="10">{esc(point)}</text>')
        for i, layer in enumerate(layers):
            body.append(f'<text x="5" y="{top + i * ch + 13}" font-size="11">layer {layer}</text>')
            for j, point in enumerate(LAYER_POINTS):
                v = cells.get((layer, point))
                if v is None:
                    color = "#ccc"
                else:  # by nmse / what the verdict allowed: green at 1/100 or below, red at 10x or above
                    limit = max(cell_limits.get((layer, point), tolerance if not cell_limits else 0.0), 1e-300)
                    t = min(max((log10(max(v, 1e-300) / limit) + 2) / 3, 0.0), 1.0)
                    color = f"rgb({int(255 * t)},{int(200 * (1 - t))},60)"
                body.append(f'<rect x="{left + j * cw}" y="{top + i * ch}" width="{cw - 1}" height="{ch - 1}" '
                            f'fill="{color}"><title>layer {layer} {esc(point)}: '
                            f'{"missing" if v is None else f"{v:.3e}"}</title></rect>')
        out.append(svg("heatmap", w, h, "".join(body),
                       f"Layer x component NMSE ({' / '.join(label)}); colour: NMSE / "
                       + (f"k^2 x the peer's NMSE there (calibrated, k={PEER_K:g})" if cell_limits else
                          f"the dtype's tolerance ({tolerance:.0e})") + ", green <= 1/100, red >= 10"))
    return "\n".join(out) or "<p>No per-layer records.</p>"


def latency(records):
    """Median latency per case with a p10-p90 bar."""
    stats = {}
    for r in records:
        if r.get("metric") in ("median_ms", "p10_ms", "p90_ms", "tokens_per_s") and not r.get("sweep"):
            case = r["case"] + (" (cold)" if r.get("cache") == "cold" else "")
            stats.setdefault(group_key(r) + (case,), {})[r["metric"]] = float(r["value"])
    rows = [(k, s) for k, s in stats.items() if {"median_ms", "p10_ms", "p90_ms"} <= set(s)]
    if not rows:
        return "<p>No timing records.</p>"
    w, left, rh = 900, 380, 16
    h = 30 + rh * len(rows)
    top = max(s["p90_ms"] for _, s in rows)
    sx = lambda v: left + v / top * (w - left - 60)  # noqa: E731
    body = []
    for i, (key, s) in enumerate(rows):
        yy = 20 + i * rh
        label = f"{key[0]} {key[4]} ({key[1]} {key[2]} {key[3]})"
        body.append(f'<text x="5" y="{yy + 11}" font-size="10">{esc(label)}</text>'
                    f'<rect x="{left}" y="{yy + 2}" width="{sx(s["median_ms"]) - left:.1f}" height="{rh - 5}" fill="#1f77b4">'
                    f'<title>median {s["median_ms"]:.4g} ms, p10 {s["p10_ms"]:.4g}, p90 {s["p90_ms"]:.4g}</title></rect>'
                    f'<line x1="{sx(s["p10_ms"]):.1f}" y1="{yy + rh / 2}" x2="{sx(s["p90_ms"]):.1f}" y2="{yy + rh / 2}" '
                    f'stroke="#000" stroke-width="1.5"/>'
                    f'<text x="{sx(s["p90_ms"]) + 4:.1f}" y="{yy + 11}" font-size="10">{s["median_ms"]:.3g} ms'
                    + (f', {s["tokens_per_s"]:.4g} tok/s' if "tokens_per_s" in s else "") + '</text>')
    return svg("latency", w, h, "".join(body), "Latency per case: median (bar), p10-p90 (line), throughput at the median")


def history(records):
    """Each benchmark median's history over the runs in the file (every run, in the order stored), a run marked
    where compare.py's rule calls it SLOWER (red) or FASTER (green) than the run before it."""
    import compare

    series = {}
    for r in records:
        if r.get("metric") in ("median_ms", "iqr_ms") and not r.get("sweep") and r.get("cache") != "cold":
            run = (r.get("run_id", ""), r.get("commit", ""))
            series.setdefault(group_key(r) + (r["case"],), {}).setdefault(run, {})[r["metric"]] = float(r["value"])
    series = {k: [(run, v) for run, v in runs.items() if "median_ms" in v] for k, runs in series.items()}
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return "<p>One run of each benchmark so far: a history needs two.</p>"
    charts = []
    for key, runs in series.items():
        w, h, left = 900, 120, 60
        top = max(v["median_ms"] + v.get("iqr_ms", 0) for _, v in runs) or 1.0
        sx = lambda i: left + i * (w - left - 20) / max(len(runs) - 1, 1)  # noqa: E731
        sy = lambda ms: h - 20 - ms / top * (h - 40)  # noqa: E731
        body = ['<polyline fill="none" stroke="#1f77b4" points="'
                + " ".join(f"{sx(i):.1f},{sy(v['median_ms']):.1f}" for i, (_, v) in enumerate(runs)) + '"/>']
        for i, ((run_id, commit), v) in enumerate(runs):
            status, why = ("FIRST", "") if i == 0 else compare.timing_status(
                runs[i - 1][1]["median_ms"], runs[i - 1][1].get("iqr_ms", 0.0), v["median_ms"], v.get("iqr_ms", 0.0))
            color = {"SLOWER": "#d62728", "FASTER": "#2ca02c"}.get(status, "#1f77b4")
            body.append(f'<circle class="run-{status.lower()}" cx="{sx(i):.1f}" cy="{sy(v["median_ms"]):.1f}" r="4" '
                        f'fill="{color}"><title>{esc(run_id)} {esc(commit)}: median {v["median_ms"]:.4g} ms '
                        f'{esc(status)} {esc(why)}</title></circle>')
        body.append(f'<text x="5" y="{sy(top) + 4:.1f}" font-size="10">{top:.3g} ms</text>'
                    f'<text x="5" y="{h - 16}" font-size="10">0</text>')
        title = f"{key[0]} {key[4]} ({key[1]} {key[2]} {key[3]}): median by run"
        charts.append(svg("history", w, h, "".join(body), title))
    return "\n".join(charts)


def _axis_log(values):
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    return lo, hi if hi > lo else lo + 1


def sweep_charts(records):
    """One chart per sweep (script, sweep family, device, dtype, engine): median latency (log) and the
    fraction of the roofline bound achieved against the swept size (log), warm and cold lines."""
    series = {}
    for r in records:
        if r.get("sweep") and r.get("metric") in ("median_ms", "roofline_fraction"):
            key = (r["script"], r["sweep"], r.get("device", ""), r.get("dtype", ""), r.get("engine", ""))
            line = series.setdefault(key, {}).setdefault(r.get("cache") or "warm", {})
            line.setdefault(float(r["size"]), {})[r["metric"]] = float(r["value"])
    out = []
    for key, lines in sorted(series.items()):
        points = {c: sorted((x, m) for x, m in pts.items() if len(m) == 2) for c, pts in lines.items()}
        sizes = [x for pts in points.values() for x, _ in pts]
        if not sizes:
            continue
        pw, ph, left, bottom, gap = 400, 240, 60, 45, 70
        w, h = 2 * pw + gap, ph
        xlo, xhi = _axis_log(sizes)
        lat = [m["median_ms"] for pts in points.values() for _, m in pts]
        ylo, yhi = _axis_log(lat)
        fmax = max(max(m["roofline_fraction"] for pts in points.values() for _, m in pts), 1e-9)

        def px(x, panel):
            return panel * (pw + gap) + left + (math.log10(x) - xlo) / (xhi - xlo) * (pw - left - 15)

        def py_lat(v):
            return ph - bottom - (log10(v) - ylo) / (yhi - ylo) * (ph - bottom - 15)

        def py_frac(v):
            return ph - bottom - v / fmax * (ph - bottom - 15)

        body = []
        for panel, title in ((0, "median latency (ms, log)"), (1, "fraction of the roofline bound")):
            x0 = panel * (pw + gap) + left
            body.append(f'<line x1="{x0}" y1="{ph - bottom}" x2="{x0 + pw - left - 15}" y2="{ph - bottom}" stroke="#888"/>'
                        f'<line x1="{x0}" y1="15" x2="{x0}" y2="{ph - bottom}" stroke="#888"/>'
                        f'<text x="{x0}" y="{ph - 8}" font-size="11">{esc(key[1])} (log scale)</text>'
                        f'<text x="{x0}" y="11" font-size="11">{title}</text>')
            for e in range(xlo, xhi + 1):
                xx = px(10**e, panel)
                body.append(f'<text x="{xx - 8:.1f}" y="{ph - bottom + 14}" font-size="10">1e{e}</text>')
        for e in range(ylo, yhi + 1):
            body.append(f'<text x="5" y="{py_lat(10**e) + 4:.1f}" font-size="10">1e{e}</text>')
        for t in (0.0, 0.5, 1.0):
            body.append(f'<text x="{pw + gap + 10}" y="{py_frac(t * fmax) + 4:.1f}" font-size="10">{t * fmax:.2g}</text>')
        for k, (cache, pts) in enumerate(sorted(points.items(), key=lambda kv: kv[0] != "warm")):
            color = COLORS[k % len(COLORS)]
            for panel, (metric, py) in enumerate((("median_ms", py_lat), ("roofline_fraction", py_frac))):
                path = " ".join(f"{'M' if i == 0 else 'L'}{px(x, panel):.1f},{py(m[metric]):.1f}"
                                for i, (x, m) in enumerate(pts))
                body.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
                for x, m in pts:
                    body.append(f'<circle cx="{px(x, panel):.1f}" cy="{py(m[metric]):.1f}" r="2.5" fill="{color}">'
                                f'<title>{esc(key[1])} {x:g}: {metric} {m[metric]:.4g}</title></circle>')
            body.append(f'<text x="{w - 60}" y="{14 + 13 * k}" font-size="11" fill="{color}">{esc(cache)}</text>')
        out.append(svg("sweep", w, h, "".join(body), f"Sweep {key[1]} of {key[0]} ({' / '.join(key[2:])})"))
    return "\n".join(out) or "<p>No sweep records (run a benchmark with --sweep: make sweep).</p>"


def routing(records):
    counts = {}
    for r in records:
        if r.get("metric") == "expert_tokens" and not r.get("sweep"):  # a sweep's routing is its cases' routing
            counts.setdefault(group_key(r)[1:] + (r["case"],), {})[int(r["expert"])] = float(r["value"])
    out = []
    for label, per_expert in sorted(counts.items()):
        n = max(per_expert) + 1
        w, h, left, bottom = 60 + 22 * n, 200, 40, 30
        top = max(per_expert.values()) or 1
        body = []
        for e in range(n):
            v = per_expert.get(e, 0)
            bh = v / top * (h - bottom - 20)
            body.append(f'<rect x="{left + e * 22}" y="{h - bottom - bh:.1f}" width="18" height="{bh:.1f}" fill="#2ca02c">'
                        f'<title>expert {e}: {v:.0f} tokens</title></rect>'
                        f'<text x="{left + e * 22 + 4}" y="{h - 12}" font-size="10">{e}</text>')
        out.append(svg("routing", w, h, "".join(body), f"MoE routing: tokens per expert ({' / '.join(label)})"))
    return "\n".join(out) or "<p>No routing records.</p>"


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px} tr.fail td{background:#fdd} tr.pass td{background:#dfd}
figure{margin:1em 0} figcaption{font-weight:bold;margin-bottom:4px}"""


def build(records, source):
    latest = latest_runs(records)
    sections = [("Verdicts", verdict_table(latest)), ("Per-layer error growth", error_growth(latest)),
                ("Layer x component errors", heatmap(latest)), ("Error by decode step", decode_curves(latest)), ("Latency and spread", latency(latest)),
                ("Scaling sweeps", sweep_charts(latest)), ("MoE routing", routing(latest)),
                ("Benchmark history (every run; red: slower than the run before, by compare.py's rule)",
                 history(records))]
    body = "\n".join(f"<h2>{esc(title)}</h2>\n{content}" for title, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Kit report</title><style>{STYLE}</style>"
            f"</head><body><h1>Kit report</h1><p>{len(records)} records from {esc(source)}; latest run of each "
            f"configuration shown, the benchmarks' history over every run at the end.</p>\n{body}</body></html>\n")


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("results", help="results file (JSON Lines)")
    parser.add_argument("-o", "--output", default="report.html")
    args = parser.parse_args(argv)
    if not Path(args.results).is_file():
        raise UsageError(f"{args.results}: no such results file; run a nox session first (e.g. nox -s bench-cpu)")
    records = store.read_records(args.results)
    write_text_atomic(args.output, build(records, args.results))
    print(f"wrote {args.output} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
