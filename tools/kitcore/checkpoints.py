"""Checkpoints: checking a HuggingFace checkpoint directory, its fingerprint, and the default ones.

Checkpoints are only ever read from safetensors (never unpickled), and never with trust_remote_code.
Every problem with a directory raises `UsageError` with one line naming the problem and the fix.
"""

import fcntl
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import UsageError

# Bump when the tiny-checkpoint recipe changes, so that caches are regenerated (3: trained with pinned arithmetic).
RECIPE_VERSION = 3
_FULL_HASH_LIMIT = 64 << 20  # files up to 64 MiB are hashed in full, larger ones by header + samples


def cache_root():
    root = os.environ.get("LLM_KIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm-kit")
    return Path(root)


def _read_safetensors_header(path):
    """The header dict of one .safetensors file; checks that the file holds every byte it declares."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UsageError(f"{path}: truncated safetensors file ({size} bytes); re-download or regenerate it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise UsageError(f"{path}: corrupt safetensors header (declares {n} header bytes in a {size}-byte file); "
                             "re-download or regenerate it")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{path}: corrupt safetensors header (not JSON); re-download or regenerate it") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UsageError(f"{path}: truncated safetensors file ({size} bytes, header declares {8 + n + end}); "
                         "re-download or regenerate it")
    return header


@dataclass
class Checkpoint:
    path: Path
    config: dict
    weight_files: list  # Path of every .safetensors shard
    tensors: dict  # tensor name -> (file Path, shape list, dtype str)

    @property
    def model_type(self):
        return self.config.get("model_type")

    @cached_property
    def fingerprint(self):
        """sha256 over config.json and the weights: full bytes for small files; for larger ones the first MiB (the
        header) and, of every tensor, 4 KiB at its start, middle and end: a tensor scaled, permuted or replaced in
        a copy (a planted fault) changes the fingerprint, and with it every cache keyed by it (GGUFs, references)."""
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        for f in self.weight_files:
            size = f.stat().st_size
            h.update(f.name.encode())
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                if size <= _FULL_HASH_LIMIT:
                    h.update(fh.read())
                else:
                    h.update(fh.read(1 << 20))
                    header = _read_safetensors_header(f)
                    fh.seek(0)
                    base = 8 + struct.unpack("<Q", fh.read(8))[0]  # where the tensors' data begins
                    for name in sorted(k for k in header if k != "__metadata__"):
                        start, end = header[name]["data_offsets"]
                        for offset in sorted({start, max(start, (start + end) // 2 - 2048), max(start, end - 4096)}):
                            fh.seek(base + offset)
                            h.update(fh.read(min(4096, end - offset)))
        return h.hexdigest()[:16]

    @cached_property
    def truncated(self):
        """What tools/truncate_checkpoint.py recorded when it wrote this checkpoint (kit_truncated.json), or None."""
        path = self.path / "kit_truncated.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            raise UsageError(f"{path}: not JSON; the truncated checkpoint is damaged, write it again") from None

    def truncation_note(self):
        """One line on what a verdict on a truncated checkpoint means, or None."""
        t = self.truncated
        if not t:
            return None
        n = t["layers_kept"]
        return (f"truncated: layers 0-{n - 1} of the {t['layers_in_source']} of {t['source']}: a verdict covers "
                f"those layers' errors; the logits are those of a {n}-layer model, not a language model's (judge "
                "tensors and KL, not text or perplexity)")

    def load_tensors(self, names):
        """Load the named tensors from whichever shards hold them (safetensors only)."""
        return dict(self.iter_tensors(names))

    def iter_tensors(self, names):
        """(name, tensor) for the named tensors, read one at a time, each shard opened once."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise UsageError(f"{self.path}: checkpoint lacks weight {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + "; is it the right model and layer?")
        by_file = {}
        for n in names:
            by_file.setdefault(self.tensors[n][0], []).append(n)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for k in keys:
                    yield k, st.get_tensor(k)


def open_checkpoint(path, family=None):
    """Check a checkpoint directory and return a `Checkpoint`; `family`: the model_type(s) accepted."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--model_path {path}: no such directory; pass a HuggingFace checkpoint directory "
                         "(or omit --model_path to use the kit's default checkpoint)")
    if not p.is_dir():
        raise UsageError(f"--model_path {path}: is a file, not a checkpoint directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{path}: no config.json; a HuggingFace checkpoint directory needs config.json "
                         "and *.safetensors")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"{cfg_path}: corrupt config.json (not a JSON object); restore it from the source") from None
    families = (family,) if isinstance(family, str) else family
    if families is not None and config.get("model_type") not in families:
        raise UsageError(f"{path}: model_type is {config.get('model_type')!r}, this script checks "
                         f"{' or '.join(families)} checkpoints; use such a checkpoint or the script for its family")
    index_path = p / "model.safetensors.index.json"
    tensors = {}
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{index_path}: corrupt index (no weight_map); restore it from the source") from None
        files = sorted({p / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise UsageError(f"{path}: shard {f.name} listed in the index is missing; download it")
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" (found {pickles[0]}: pickled weights are never loaded; convert them to safetensors)"
                if pickles else "")
        raise UsageError(f"{path}: no *.safetensors weights{hint}")
    for f in files:
        for name, info in _read_safetensors_header(f).items():
            if name != "__metadata__":
                tensors[name] = (f, info["shape"], info["dtype"])
    if not tensors:
        raise UsageError(f"{path}: the safetensors files hold no tensors; regenerate the checkpoint")
    return Checkpoint(p, config, files, tensors)


def default_checkpoint(family, seed=0, arithmetic="pinned"):
    """The kit's embedded checkpoint for `family`, generated once into the cache and reused. `arithmetic`
    "native" trains it with this process's own kernels instead (kitcore.tiny): another model per kind of CPU,
    for the tests whose margins must hold on more than one model."""
    name = f"{family}-tiny-seed{seed}-r{RECIPE_VERSION}"
    if arithmetic == "native":
        import torch

        name += f"-native-{torch.backends.cpu.get_cpu_capability().lower()}"
    target = cache_root() / "checkpoints" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the finished checkpoint
        if not (target / "config.json").is_file():
            from .tiny import write_checkpoint

            print(f"generating the default {family} checkpoint once into {target} (about a minute)...",
                  file=sys.stderr, flush=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                write_checkpoint(family, tmp, seed=seed, size="tiny", log=lambda message: None, arithmetic=arithmetic)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(model_path, family, seed=0):
    """`--model_path` if given, else the default checkpoint (of the first family); opened and checked."""
    if model_path is None:
        default = family if isinstance(family, str) else family[0]
        return open_checkpoint(default_checkpoint(default, seed), family)
    return open_checkpoint(model_path, family)


def config_view(path, changes):
    """A view of the checkpoint directory `path` in which config.json carries `changes`: a temporary
    directory (the caller keeps the returned TemporaryDirectory alive and cleans it up) with a symlink to
    every other file and a rewritten config.json. For engines that read a setting only from config.json
    (InfiniLM: its compute dtype, a top-level rope_theta): the user's files are never edited."""
    src = Path(path).resolve()
    view = tempfile.TemporaryDirectory(prefix="kit-view-")
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, Path(view.name) / f.name)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (Path(view.name) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return view
