"""Results: human lines, machine metric lines, and the --json file.

Metric line format (stable; tools/metrics.py parses it):

    KIT script=<name> case=<case> metric=<metric> value=<number> unit=<unit> [key=value ...]

One line per measured value, space-separated key=value pairs, no spaces inside values. `value` is a
Python float literal (nan/inf allowed). Extra keys label the record (device, dtype, engine, layer,
point ...). The last line of every run is the verdict:

    KIT script=<name> case=all metric=verdict value=<0|1|2|3|4> unit=exit_code verdict=<pass|fail|error>

The --json file holds the same results as one object:
    {"script", "verdict": "pass"|"fail"|"error", "exit_code", "env": {...}, "records": [...], ...extra}
It is written atomically (temporary file in the same folder, then rename).
"""

import copy
import json
import math
import os
import platform
import sys
import tempfile

import torch

from .devices import dtype_name
from .errors import EXIT_FAIL, EXIT_PASS

_SAFE = str.maketrans({" ": "_", "=": ":", "\t": "_", "\n": "_"})


def _fmt_value(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _clean(v):
    return str(v).translate(_SAFE)


def environment(device=None, dtype=None, seed=None, checkpoint=None):
    """The fingerprint recorded with every result (transformers' version from its metadata: importing it here
    would cost a check about a second before its first model loads)."""
    from importlib.metadata import version

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device is not None:
        env["device"] = str(device)
        env["device_name"] = device.name()
    if dtype is not None:
        env["dtype"] = dtype_name(dtype)
    if seed is not None:
        env["seed"] = seed
    if checkpoint is not None:
        env["checkpoint"] = str(checkpoint.path)
        env["checkpoint_hash"] = checkpoint.fingerprint
        if checkpoint.truncated:
            env["truncated"] = checkpoint.truncated
    return env


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return v


def write_text_atomic(path, text):
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


class Results:
    """Collects metric records, prints them as KIT lines, writes the JSON file."""

    def __init__(self, script, labels=None, stream=None):
        self.script = script
        self.labels = dict(labels or {})
        self.records = []
        self.extra = {}
        self.env = {}
        self.stream = stream or sys.stdout

    def add(self, case, metric, value, unit="", **labels):
        record = {"script": self.script, "case": str(case), "metric": metric, "value": value, "unit": unit}
        record.update({k: v for k, v in {**self.labels, **labels}.items() if v is not None})
        self.records.append(record)
        fields = [f"script={_clean(self.script)}", f"case={_clean(case)}", f"metric={_clean(metric)}",
                  f"value={_fmt_value(value)}", f"unit={_clean(unit) or '-'}"]
        fields += [f"{k}={_clean(v)}" for k, v in record.items()
                   if k not in ("script", "case", "metric", "value", "unit")]
        print("KIT " + " ".join(fields), file=self.stream, flush=True)

    def labelled(self, **labels):
        """A view that adds `labels` (e.g. row=3 of a batch) to every record; it shares the records."""
        view = copy.copy(self)
        view.labels = {**self.labels, **labels}
        return view

    def add_comparison(self, case, comparison, **labels):
        """The standard figures of one `compare` result as metric lines."""
        for metric in ("max_abs", "mean_abs", "nmse", "cosine"):
            self.add(case, metric, getattr(comparison, metric), **labels)
        self.add(case, "passed", comparison.passed, unit="bool", **labels)

    def finish(self, verdict, json_path=None, notes=(), title="verdict"):
        """The one finisher of a check (a kitcore.verdict.Verdict): the human verdict line under `title` (None:
        a report, no line) with its `notes` below, the KIT verdict line, the outcomes into --json; the exit
        code."""
        code = EXIT_PASS if verdict.passed else EXIT_FAIL
        if title:
            print(f"\n{title}: {verdict.line()}" + "".join(f"\n{n}" for n in notes if n), file=self.stream,
                  flush=True)
        word = "pass" if verdict.passed else "fail"
        self.add("all", "verdict", code, unit="exit_code", verdict=word)
        self.extra["outcomes"] = verdict.as_list()
        if json_path:
            self.write_json(json_path, word, code)
        return code

    def write_json(self, json_path, verdict, code):
        obj = {"script": self.script, "verdict": verdict, "exit_code": code, "env": self.env,
               "records": self.records}
        obj.update(self.extra)
        write_json_atomic(json_path, obj)
