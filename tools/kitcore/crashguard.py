"""A crashing engine never takes the verdict down.

Native engines can die of a signal inside a call (InfiniLM on an op without a kernel, llama.cpp on an
instruction set it was built wrong for): the Python process goes with them, and a pipeline would see no
verdict line and no --json. A script whose engine is native (GUARDED_ENGINES, or any engine with
LLM_KIT_CRASH_GUARD=1) therefore runs as a child process under a thin parent: the parent relays the
child's output as it comes, and when the child dies of a signal it prints the FAIL verdict with the
signal and the phase the child was in (memory.Phases marks each phase it enters: candidate_load,
candidate_forward, a_decode ...), writes the --json record, and exits 1: the engine under test failed.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading

GUARDED_ENGINES = ("llama.cpp", "infinilm")
FORCE = "LLM_KIT_CRASH_GUARD"  # "1": guard any engine (a plugin with native code)
CHILD = "LLM_KIT_GUARDED_CHILD"  # set in the child: it runs the script itself
PHASE_FILE = "LLM_KIT_PHASE_FILE"


def _engine_specs(argv):
    specs = []
    for i, arg in enumerate(argv):
        for flag in ("--engine", "--engines"):
            if arg == flag and i + 1 < len(argv):
                specs += argv[i + 1].split(",")
            elif arg.startswith(flag + "="):
                specs += arg.split("=", 1)[1].split(",")
    return specs


def wanted(argv):
    """Whether this run should go to a guarded child: a native engine is named (or the guard is forced),
    and this process is not that child already."""
    if os.environ.get(CHILD) == "1":
        return False
    return os.environ.get(FORCE) == "1" or any(s in GUARDED_ENGINES for s in _engine_specs(argv))


_phase = None


def current_phase():
    """The phase this process last entered (memory.Phases), or None: named when an engine raises."""
    return _phase


def mark_phase(name):
    """Record the phase this process is in, and in a guarded child for the parent to name if it dies."""
    global _phase
    _phase = name
    path = os.environ.get(PHASE_FILE)
    if path:
        try:
            with open(path, "w") as f:
                f.write(name)
        except OSError:
            pass


def _relay(stream, out):
    for line in iter(stream.readline, ""):
        out.write(line)
        out.flush()
    stream.close()


def run_child(script, argv):
    """Run `script argv` as a guarded child; returns (exit code, signal name or None, last phase or None)."""
    with tempfile.TemporaryDirectory(prefix="kit-guard-") as tmp:
        phase_file = os.path.join(tmp, "phase")
        env = {**os.environ, CHILD: "1", PHASE_FILE: phase_file, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        relays = [threading.Thread(target=_relay, args=(proc.stdout, sys.stdout), daemon=True),
                  threading.Thread(target=_relay, args=(proc.stderr, sys.stderr), daemon=True)]
        for t in relays:
            t.start()
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        for t in relays:
            t.join()
        if code >= 0:
            return code, None, None
        try:
            phase = open(phase_file).read().strip() or None
        except OSError:
            phase = None
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return code, name, phase
