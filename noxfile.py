"""nox sessions: the kit's scripts as a device x dtype matrix, and its tests.

    .venv/bin/nox -l                       list the sessions
    .venv/bin/nox -s bench-cuda            Qwen3-MoE benchmarks on CUDA, every dtype
    .venv/bin/nox -s "validate-llama-cpu(dtype='float32')"

The script sessions run in the kit's own environment (.venv, built by `make setup`): they are
`python=False` sessions, so nothing is reinstalled per session. `tests-transformers-oldest` builds its
own environment once (reuse it with `nox -r`).

Each session runs the scripts as subprocesses, saves their stdout to logs/<session>/, takes the records
of their --json output (the metric lines of stdout, read with tools/metrics.py, only where a script died
before writing it), appends them with the environment fingerprint and a run id to
results/results.jsonl, and prints a summary table. A device that is absent, or a dtype it lacks,
skips with the reason; a failing script fails the session after the rest has run.
"""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

import metrics  # noqa: E402
from kitcore import registry, store  # noqa: E402

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

DEVICES = {"cpu": "--cpu", "cuda": "--nvidia", "musa": "--moore", "metax": "--metax", "iluvatar": "--iluvatar",
           "mars": "--mars"}
DTYPES = ["float32", "bfloat16", "float16"]
LLAMA, BENCH = registry.scripts("llama"), registry.scripts("qwen3_moe")  # the one list of checks (kitcore)
RESULTS = ROOT / "results" / "results.jsonl"
OLDEST_TRANSFORMERS = "4.57.6"
# the figures each script's summary row shows: (case, metric, label)
HEADLINES = {check.name: check.headline for check in registry.CHECKS}


def unavailable(device, dtype):
    """Why `device`/`dtype` cannot run here, or None."""
    import argparse

    from kitcore import devices
    from kitcore.errors import KitError

    try:
        dev = devices.resolve_device(argparse.Namespace(**{f: f == device_flag(device) for f in devices.VENDOR_FLAGS},
                                                        device=None))
        dev.check_dtype(devices.parse_dtype(dtype))
    except KitError as exc:
        return str(exc)
    return None


def device_flag(device):
    return DEVICES[device].lstrip("-")


def run_scripts(session, scripts, device, dtype, extra=(), tag=""):
    """Run each script; log (under `tag` too, where one script runs in several modes), parse, store.
    Returns [(script, exit code)]."""
    run_id = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    commit = head.stdout.strip() if head.returncode == 0 else ""  # the report's history names it
    log_dir = ROOT / "logs" / session.name.replace("(", "_").replace(")", "").replace("'", "").replace("=", "-")
    log_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for script in scripts:
        name = Path(script).stem
        with tempfile.TemporaryDirectory() as tmp:
            json_path = Path(tmp) / "result.json"
            cmd = [sys.executable, str(ROOT / script), DEVICES[device], "--dtype", dtype, "--json", str(json_path),
                   *extra]
            session.log(" ".join(cmd[1:]))
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            result = json.loads(json_path.read_text()) if json_path.exists() else None
        log = log_dir / f"{name}-{dtype}{'-' + tag if tag else ''}.log"
        log.write_text(proc.stdout + ("\n--- stderr\n" + proc.stderr if proc.stderr else ""))
        if result is not None:  # the script's own records, every label and value as it wrote them
            records, env = result["records"], result["env"]
        else:  # it died before writing its JSON: what its stdout said
            records, env = metrics.parse_lines(proc.stdout.splitlines(), str(log.relative_to(ROOT))), {}
        for r in records:
            r.update(log=str(log.relative_to(ROOT)), run_id=run_id, commit=commit, session=session.name, env=env)
        store.append_records(RESULTS, records)
        values = {(r["case"], r["metric"]): r["value"] for r in records}
        headline = ", ".join(f"{label} {values[(case, metric)]:.4g}" for case, metric, label in HEADLINES.get(name, [])
                             if (case, metric) in values)
        outcomes.append((name, dtype, proc.returncode, log, headline))
        if proc.returncode not in (0, 1):
            session.warn(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}")
    return outcomes


def summarise(session, outcomes):
    words = {0: "pass", 1: "FAIL", 2: "usage error", 3: "unavailable", 4: "internal error"}
    session.log(f"{'script':<30} {'dtype':<9} {'verdict':<12} {'figures':<44} log")
    for name, dtype, code, log, headline in outcomes:
        session.log(f"{name:<30} {dtype:<9} {words.get(code, code):<12} {headline:<44} {log.relative_to(ROOT)}")
    session.log(f"records appended to {RESULTS.relative_to(ROOT)}")
    failed = [f"{n} ({d})" for n, d, code, _, _ in outcomes if code != 0]
    if failed:
        session.error(f"{len(failed)} script run(s) failed: {', '.join(failed)}")


def make_device_session(kind, scripts, device, description, extra=()):
    @nox.session(name=f"{kind}-{device}", python=False)
    @nox.parametrize("dtype", DTYPES)
    def session_fn(session, dtype):
        reason = unavailable(device, dtype)
        if reason:
            session.skip(reason)
        summarise(session, run_scripts(session, scripts, device, dtype, extra))

    session_fn.__doc__ = f"{description} on {device}"
    return session_fn


for _device in DEVICES:
    globals()[f"validate_llama_{_device}"] = make_device_session(
        "validate-llama", LLAMA, _device, f"Llama checks against HF Transformers ({len(LLAMA)} scripts)")
    globals()[f"bench_{_device}"] = make_device_session(
        "bench", BENCH, _device, "Qwen3-MoE attention and MoE benchmarks with correctness")
    globals()[f"sweep_{_device}"] = make_device_session(
        "sweep", BENCH, _device, "Qwen3-MoE benchmarks' scaling sweeps (--sweep), for the report's curves", ["--sweep"])


@nox.session(python=False)
def matrix(session):
    """Every script on every device x dtype this machine has"""
    outcomes = []
    for device in DEVICES:
        for dtype in DTYPES:
            reason = unavailable(device, dtype)
            if reason:
                session.log(f"skip {device} {dtype}: {reason}")
                continue
            outcomes += run_scripts(session, LLAMA + BENCH, device, dtype)
    summarise(session, outcomes)


@nox.session(name="kv-decode", python=False)
def kv_decode(session):
    """llama.cpp's quantised KV caches (q8_0, q4_0) over 256 decode steps on a real checkpoint, each against the
    same GGUF with an f32 cache and against HF, for the report's error-by-step curves (after make setup-llamacpp;
    posargs: a model of tools/real_checkpoint.py, default smollm2-135m)"""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        session.skip("llama-cpp-python is not installed: make setup-llamacpp")
    model = session.posargs[0] if session.posargs else "smollm2-135m"
    fetched = subprocess.run([sys.executable, str(ROOT / "tools" / "real_checkpoint.py"), "--model", model],
                             capture_output=True, text=True, cwd=ROOT)
    if fetched.returncode != 0:
        session.skip(f"{model}: {fetched.stderr.strip().splitlines()[-1:] or fetched.returncode}")
    checkpoint = fetched.stdout.strip().splitlines()[-1]
    outcomes = []
    for kv_type in ("q8_0", "q4_0"):
        outcomes += run_scripts(session, ["test/models/llama/test_forward_validation.py"], "cpu", "float32", ["--engine", "llama.cpp", "--model_path",
                                checkpoint, "--kv_type", kv_type, "--decode_steps", "256"], tag=kv_type)
    summarise(session, outcomes)


@nox.session(python=False)
def tests(session):
    """The kit's own test suite in the kit's environment, the extended matrices too (make test leaves them out)"""
    session.run(sys.executable, "-m", "pytest", "-q", *(session.posargs or ["test"]), external=True)


# the tests whose verdicts hang on a trained model's numbers: fault engines and judges
CHECKPOINT_SENSITIVE = ["test/kit/test_llama_suite.py", "test/kit/test_qwen3_moe_suite.py"]
# inductor's cache does not key on ATen's capability: its AVX-512 kernels, reused under AVX2's, segfaulted
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(), "kit-inductor-avx2")}


@nox.session(name="any-machine", python=False)
def any_machine(session):
    """The fault and judge tests on other models of the default recipe and under the other kernel path: seeds 1
    and 2; checkpoints trained with this machine's own kernels and with AVX2's; the default checkpoint judged
    under AVX2's kernels. A margin that holds on one model or one kind of CPU only fails here."""
    import torch

    native = torch.backends.cpu.get_cpu_capability()
    runs = [("seed 1", {"LLM_KIT_TEST_SEED": "1"}), ("seed 2", {"LLM_KIT_TEST_SEED": "2"}),
            (f"trained with this machine's kernels ({native})", {"LLM_KIT_TEST_ARITHMETIC": "native"})]
    if native.startswith("AVX512"):
        runs += [("judged under AVX2 kernels", OTHER_KERNELS),
                 ("trained and judged under AVX2 kernels", {**OTHER_KERNELS, "LLM_KIT_TEST_ARITHMETIC": "native"})]
    else:
        session.log(f"this CPU's kernels are {native}: no wider kernel path to run the tests under")
    failed = []
    for what, env in runs:  # every run, then the verdict: which models or kernel paths a margin failed on
        session.log(f"--- {what}: {' '.join(f'{k}={v}' for k, v in env.items())}")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not extended", *CHECKPOINT_SENSITIVE, *session.posargs]
        if subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}).returncode != 0:
            failed.append(what)
    if failed:
        session.error(f"the fault and judge tests failed {len(failed)} of {len(runs)} runs: {'; '.join(failed)}")


@nox.session(name="tests-transformers-oldest", python="3.11")
def tests_transformers_oldest(session):
    """The test suite against the oldest supported transformers (own venv; reuse with -r)"""
    pins = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    # transformers 4.57 brings its own tokenizers and huggingface_hub ranges
    pins = [p for p in pins if p and not p.startswith(("transformers", "torch", "tokenizers", "huggingface_hub"))]
    session.install("torch==2.13.0")  # first, so nothing pulls a CUDA build
    session.install(f"transformers=={OLDEST_TRANSFORMERS}", *pins)
    # checkpoints generated by this transformers release live apart from the main environment's
    env = {"LLM_KIT_CACHE": os.path.join(session.virtualenv.location, "kit-cache")}
    session.run("python", "-m", "pytest", "-q", *(session.posargs or ["test"]), env=env)


@nox.session(python=False)
def serving(session):
    """The serving engines against real servers: vLLM's OpenAI server and vLLM in-process (from .venv-vllm, make
    setup-vllm), llama-cpp-python's server (make setup-llamacpp); each started on a loopback port and stopped"""
    session.run(sys.executable, "-m", "pytest", "-q", "-rs", "test/kit/test_serving.py", *session.posargs,
                external=True, env={"KIT_SERVING": "1"})  # KIT_SERVING: also vLLM's server as deployed
