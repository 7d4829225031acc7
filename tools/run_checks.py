#!/usr/bin/env python3
"""Run every registered check of one family (tools/kitcore/registry.py), each as its own process, and fold
their exit codes: what `make validate-llama`, `make validate-real` and `make bench-qwen3-moe` run.

    python tools/run_checks.py llama [--real] -- --device cpu --dtype bfloat16 [--model_path DIR]
    python tools/run_checks.py qwen3_moe -- --device cpu --dtype bfloat16

Everything after `--` goes to every check; a check's own flags for the mode (`--also_float32`; with
`--real`, `--controls --also_float32` too) come from the registry. Exit code: the first failing check's (1 fail, 2 usage, 3 unavailable, 4
internal), 0 when every check passed.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kitcore import cli, registry  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    own, common = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("family", choices=sorted({c.family for c in registry.CHECKS}))
    parser.add_argument("--real", action="store_true", help="a real checkpoint: each check's real_flags")
    args = parser.parse_args(own)
    if not registry.scripts(args.family):
        raise UsageError(f"no checks registered for {args.family}")
    codes = []
    for check in (c for c in registry.CHECKS if c.family == args.family):
        flags = check.real_flags if args.real else check.validate_flags
        codes.append(subprocess.run([sys.executable, str(ROOT / check.script), *common, *flags]).returncode)
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(cli.run(main))
