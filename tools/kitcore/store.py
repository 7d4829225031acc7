"""The results file: JSON Lines, one record per metric, safe to append from several processes at once.

Each append takes an exclusive lock and writes whole lines in one write() on an O_APPEND descriptor, so
two sessions writing the same file interleave whole records and lose none. A reader skips a line that
is not a JSON object (e.g. half-written by a killed process) and reports it with its line number.
"""

import fcntl
import json
import math
import os
import sys


def _encode(record):
    clean = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, sort_keys=True, default=str)


def append_records(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = "".join(_encode(r) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.lseek(fd, 0, os.SEEK_END) > 0:  # a previous writer died mid-line: start on a fresh line
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)


def read_records(path, warn=None):
    warn = warn or (lambda message: print(message, file=sys.stderr))
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                warn(f"{path}:{lineno}: skipped a line that is not a JSON record (half-written?): {line.strip()[:80]}")
                continue
            if isinstance(record.get("value"), str):
                try:
                    record["value"] = float(record["value"])
                except ValueError:
                    warn(f"{path}:{lineno}: malformed value {record['value']!r}")
                    continue
            records.append(record)
    return records
