"""Command-line plumbing shared by every script: the argument parser and the main-function wrapper."""

import argparse
import inspect
import os
import sys
import traceback
from pathlib import Path

from .errors import EXIT_CODES_HELP, EXIT_FAIL, EXIT_INTERNAL, EXIT_USAGE, KitError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit 2) and the exit-code table in --help."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs["epilog"] = ((kwargs.get("epilog") or "") + "\n\n" + EXIT_CODES_HELP).strip()
        super().__init__(**kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _json_path(argv):
    for i, arg in enumerate(argv):
        if arg == "--json" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--json="):
            return arg.split("=", 1)[1]
    return None


def _fail_line(message):
    """The human verdict line of a check that ended before its finisher (kitcore.results.Results.finish) ran: an
    engine that crashed or raised, a failure found while setting up."""
    print(f"\nverdict: FAIL: {message}", flush=True)


def _report_error(main, argv, code, message):
    """A run that ends without a verdict still leaves one for pipelines: a KIT verdict line with
    verdict=error, and the --json file (when asked for) with "verdict": "error" and the message."""
    from .results import write_json_atomic

    script = Path(inspect.getsourcefile(main)).stem
    verdict = "fail" if code == EXIT_FAIL else "error"  # a check that failed before its main part ran
    print(f"KIT script={script} case=all metric=verdict value={code} unit=exit_code verdict={verdict}", flush=True)
    path = _json_path(argv)
    if path:
        try:
            write_json_atomic(path, {"script": script, "verdict": verdict, "exit_code": code, "error": message,
                                     "records": []})
        except OSError as exc:
            print(f"note: could not write --json {path}: {exc.strerror}", file=sys.stderr)


def _run_guarded(main, args):
    """The script in a child process (kitcore.crashguard): its exit code, or, when the engine killed it, the
    FAIL verdict with the signal and the phase, and exit 1."""
    from . import crashguard
    from .errors import EXIT_FAIL
    from .results import write_json_atomic

    script = inspect.getsourcefile(main)
    code, signal_name, phase = crashguard.run_child(script, args)
    if signal_name is None:
        return code
    where = f" in phase {phase}" if phase else ""
    message = f"the engine process died of {signal_name}{where}: a crash of the engine under test"
    _fail_line(message)
    name = Path(script).stem
    print(f"KIT script={name} case=all metric=verdict value={EXIT_FAIL} unit=exit_code verdict=fail "
          f"crash={signal_name}" + (f" phase={phase}" if phase else ""), flush=True)
    path = _json_path(args)
    if path:
        try:
            write_json_atomic(path, {"script": name, "verdict": "fail", "exit_code": EXIT_FAIL, "error": message,
                                     "crash": {"signal": signal_name, "phase": phase}, "records": []})
        except OSError as exc:
            print(f"note: could not write --json {path}: {exc.strerror}", file=sys.stderr)
    return EXIT_FAIL


def run(main, argv=None):
    """Call `main(argv)` and turn its outcome into an exit code; KitErrors print one line. A run whose engine
    is native goes to a child process first (kitcore.crashguard), so that a crash still leaves a verdict."""
    from . import crashguard

    prog = os.path.basename(sys.argv[0])
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if crashguard.wanted(args):
        return _run_guarded(main, args)
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
        if code:
            _report_error(main, args, code, "usage error")
        return code
    except KitError as exc:
        if exc.exit_code == EXIT_FAIL:
            _fail_line(exc)
        else:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        _report_error(main, args, exc.exit_code, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in the kit or an engine: keep the traceback, it is what a report needs
        traceback.print_exc()
        from . import crashguard, protocol

        plugin = protocol.raised_by_plugin(exc)
        if plugin is not None:  # the engine under test failed, not the kit: its verdict, exit 1
            phase = crashguard.current_phase()
            message = (f"the engine {plugin[0]} raised {type(exc).__name__}: {exc} (at {plugin[1]}"
                       + (f", in phase {phase})" if phase else ")")
                       + "; to refuse an input cleanly, raise kitcore.errors.UsageError (exit 2) or Unavailable (3)")
            _fail_line(message)
            _report_error(main, args, EXIT_FAIL, message)
            return EXIT_FAIL
        print(f"{prog}: internal error (exit {EXIT_INTERNAL}); please report it with the traceback above",
              file=sys.stderr)
        _report_error(main, args, EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_INTERNAL
