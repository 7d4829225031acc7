#!/usr/bin/env python3
"""Read metric lines out of logs: the kit's `KIT key=value ...` lines and the original InfiniLM scripts'.

    python tools/metrics.py LOG... [--format json|csv|md]

Original formats understood (the InfiniLM test/models scripts this kit descends from):
    \t WARMUPS=10 RUNS=100, Attention Torch, average TTFT: 16.15 ms
    \t WARMUPS=10 RUNS=100, Attention Torch, average throughput: 524.35 tok/s
    \t WARMUPS=10 RUNS=100, MoE Torch average latency: 21.09 ms   throughput: 33387.11 tok/s
    Latency: Torch=1.234ms, Infini=0.987ms          (PR #181 attention; case from the PREFILL/DECODE header)
    Throughput: Torch=123.4 tok/s, Infini=456.7 tok/s
    Cosine Similarity: 0.999123
    Max absolute difference: 1.2e-03 / Mean absolute difference: ... (llama scripts)
Lines it does not know are ignored. A known line with a malformed number is reported on stderr with its
file and line number, and skipped. Exit code 0, or 2 when a log cannot be read.
"""

import csv
import io
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import cli  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402

NUMBER = r"(\S+?)"
ORIGINAL_PATTERNS = [
    (re.compile(rf"WARMUPS=(\d+) RUNS=(\d+), Attention Torch, average TTFT: {NUMBER} ms"),
     "attention_test", "prefill", [("ttft_batch_relative_mean_ms", "ms")]),
    (re.compile(rf"WARMUPS=(\d+) RUNS=(\d+), Attention Torch, average throughput: {NUMBER} tok/s"),
     "attention_test", "decode", [("tokens_per_s_original_formula", "tok/s")]),
    (re.compile(rf"WARMUPS=(\d+) RUNS=(\d+), MoE Torch average latency: {NUMBER} ms\s+throughput: {NUMBER} tok/s"),
     "moe_test", None, [("mean_ms", "ms"), ("tokens_per_s_mean", "tok/s")]),
]
ENGINE_PAIR = re.compile(rf"^(Latency|Throughput): Torch={NUMBER}\s*(ms|tok/s), Infini={NUMBER}\s*(ms|tok/s)\s*$")
SINGLE = [
    (re.compile(rf"^\s*Cosine Similarity: {NUMBER}\s*$"), "cosine", ""),
    (re.compile(rf"^\s*Max absolute difference: {NUMBER}\s*$"), "max_abs", ""),
    (re.compile(rf"^\s*Mean absolute difference: {NUMBER}\s*$"), "mean_abs", ""),
]
SECTION = re.compile(r"=+ (PREFILL|DECODE) =+")
MOE_CASE = re.compile(r"^\s*Test (?:Case PREFILL_TESTCASES|DECODE_TESTCASES)")


class MalformedNumber(ValueError):
    pass


def number(text):
    try:
        value = float(text)
    except ValueError:
        raise MalformedNumber(text) from None
    return value


def parse_kit_line(line):
    """`KIT key=value ...` -> record dict (value as float; the rest as strings)."""
    record = {}
    for field in line.split()[1:]:
        key, sep, value = field.partition("=")
        if not sep:
            raise MalformedNumber(field)
        record[key] = value
    for key in ("script", "case", "metric", "value"):
        if key not in record:
            raise MalformedNumber(f"missing {key}=")
    record["value"] = number(record["value"])
    if record.get("unit") == "-":
        record["unit"] = ""
    return record


def parse_lines(lines, source="-", warn=None):
    """Records from an iterable of lines; `warn(message)` gets one message per malformed line."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    records, section, moe_phase = [], None, "prefill"
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        where = {"source": str(source), "line": lineno}
        try:
            if line.startswith("KIT "):
                records.append({**parse_kit_line(line), "format": "kit", **where})
                continue
            if (m := SECTION.search(line)):
                section = m.group(1).lower()
                continue
            if MOE_CASE.search(line):
                moe_phase = "prefill" if "PREFILL" in line else "decode"
                continue
            for pattern, script, case, metrics in ORIGINAL_PATTERNS:
                if (m := pattern.search(line)):
                    warmups, runs, *values = m.groups()
                    for (metric, unit), text in zip(metrics, values):
                        records.append({"script": script, "case": case or moe_phase, "metric": metric,
                                        "value": number(text), "unit": unit, "engine": "torch",
                                        "warmups": warmups, "runs": runs, "format": "original", **where})
                    break
            else:
                if (m := ENGINE_PAIR.match(line)):
                    kind, torch_v, unit, infini_v, _ = m.groups()
                    metric = "latency_ms" if kind == "Latency" else "tokens_per_s"
                    for engine, text in (("torch", torch_v), ("infini", infini_v)):
                        records.append({"script": "attention_test", "case": section or "all", "metric": metric,
                                        "value": number(text), "unit": unit, "engine": engine, "format": "original",
                                        **where})
                    continue
                for pattern, metric, unit in SINGLE:
                    if (m := pattern.match(line)):
                        records.append({"script": "original", "case": section or "all", "metric": metric,
                                        "value": number(m.group(1)), "unit": unit, "format": "original", **where})
                        break
        except MalformedNumber as exc:
            warn(f"{source}:{lineno}: malformed number {exc.args[0]!r} in: {line.strip()[:120]}")
    return records


def parse_file(path, warn=None):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_lines(f, path, warn)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None


COLUMNS = ["script", "case", "metric", "value", "unit", "device", "dtype", "engine", "source", "line"]


def render(records, fmt):
    if fmt == "json":
        return json.dumps([{k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v)
                            for k, v in r.items()} for r in records], indent=1)
    rows = [[r.get(c, "") for c in COLUMNS] for r in records]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("logs", nargs="+", metavar="LOG")
    parser.add_argument("--format", default="md", choices=["json", "csv", "md"])
    args = parser.parse_args(argv)
    records = [r for path in args.logs for r in parse_file(path)]
    print(render(records, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
