"""Helpers for the kit's own tests: run a script in-process or as a subprocess, build faulty checkpoints."""

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from kitcore import cli  # noqa: E402

import pytest  # noqa: E402

LLAMA = "test/models/llama"
FAULTY_ENGINES = str(ROOT / "test/kit/faulty_engines.py")
_modules = {}


def __getattr__(name):
    """EXTENDED, the mark of a wider matrix of what `make test` checks once (more seeds, dtypes, engines; a real
    server: `make test-extended`), made when a test module imports it: after conftest.py registered it."""
    if name == "EXTENDED":
        return pytest.mark.extended
    raise AttributeError(name)


def load_script(relpath):
    if relpath not in _modules:
        path = ROOT / relpath
        spec = importlib.util.spec_from_file_location("kit_script_" + path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[relpath] = module
    return _modules[relpath]


class Outcome:
    def __init__(self, code, out, err, json_path=None):
        self.code, self.out, self.err = code, out, err
        self.json = json.loads(Path(json_path).read_text()) if json_path and Path(json_path).exists() else None

    def __repr__(self):
        return f"exit {self.code}\n--- stdout\n{self.out[-4000:]}\n--- stderr\n{self.err[-2000:]}"


def run_script(relpath, *argv, json_path=None):
    """Run a script's main() in this process, as its command line would (exit code, stdout, stderr)."""
    module = load_script(relpath)
    argv = [str(a) for a in argv] + (["--json", str(json_path)] if json_path else [])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.run(module.main, argv)
    return Outcome(code, out.getvalue(), err.getvalue(), json_path)


def run_subprocess(relpath, *argv, cwd="/"):
    """Run a script as a user would, from another working directory."""
    proc = subprocess.run([sys.executable, str(ROOT / relpath), *map(str, argv)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return Path(dst)


def edit_config(ckpt, **changes):
    path = Path(ckpt) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


def edit_weights(ckpt, edit):
    """Apply `edit(state_dict)` to model.safetensors in place."""
    from safetensors.torch import load_file, save_file

    path = Path(ckpt) / "model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def permute_qk_rows(sd, config):
    """q_proj/k_proj rows reordered from half-split to interleaved in every layer: the RoPE layout bug."""
    sys.path.insert(0, str(ROOT / LLAMA))
    import utils

    for name in list(sd):
        if name.endswith("q_proj.weight"):
            sd[name] = utils.half_to_interleaved_rows(sd[name], config["num_attention_heads"]).contiguous()
        elif name.endswith("k_proj.weight"):
            sd[name] = utils.half_to_interleaved_rows(sd[name], config["num_key_value_heads"]).contiguous()


def scale_weight(name, factor):
    def edit(sd):
        sd[name] = (sd[name] * factor).contiguous()

    return edit



def add_outlier_key_bias(ckpt, layer, size, query_gain=1.0):
    """Attention biases (zero) in every layer, and in `layer` a k_proj bias of `size` on each KV head's
    slowest-rotating RoPE channel: the same large offset on every key, as Qwen2.5's k_proj biases have (up to
    211). In exact arithmetic it shifts each query's scores by one amount (its rotation over a prompt is
    ~1e-3 rad), so the model computes what it did; rounded to bfloat16, every key's offset is off by up to
    half a unit in the last place (size / 256), a different amount per key: an ill-conditioned attention by
    construction, whatever the training gave. `query_gain` scales the queries on that channel, and with them
    how much of that rounding reaches the scores."""
    import torch

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    def edit(sd):
        for i in range(cfg["num_hidden_layers"]):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                rows = sd[f"model.layers.{i}.self_attn.{proj}.weight"].shape[0]
                sd[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(rows)
        bias = sd[f"model.layers.{layer}.self_attn.k_proj.bias"].view(cfg["num_key_value_heads"], head_dim)
        bias[:, head_dim // 2 - 1] = size  # rotate_half's slowest pair: channels head_dim/2 - 1 and head_dim - 1
        query = sd[f"model.layers.{layer}.self_attn.q_proj.weight"].view(cfg["num_attention_heads"], head_dim, -1)
        query[:, head_dim // 2 - 1] *= query_gain

    edit_weights(ckpt, edit)
    edit_config(ckpt, attention_bias=True)
