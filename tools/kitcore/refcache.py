"""The reference cache: float32 reference outputs on disk, reused by later runs, other engines and dtypes.

An entry is keyed by everything its value depends on: the checkpoint's fingerprint, the reference dtype,
the transformers and torch versions, what was computed (`kind`, e.g. "logits" or "greedy8") and the exact
inputs (token ids, positions, mask). It is a safetensors file under `$LLM_KIT_CACHE/reference/` whose
metadata repeats the key's fields; an entry that cannot be read, or whose metadata does not match, is
deleted and computed again, never trusted. After every write the oldest entries are removed until the
cache is within its size bound. Hits, misses and rejected entries are counted and reported.
"""

import hashlib
import json
import os
import tempfile

import torch

from . import checkpoints
from .plan import size_text
from .points import POINTS_VERSION

DEFAULT_MAX_BYTES = 2 * 2**30


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ReferenceCache:
    def __init__(self, checkpoint, reference_dtype, max_bytes=DEFAULT_MAX_BYTES, root=None):
        import transformers

        self.root = root or checkpoints.cache_root() / "reference"
        self.max_bytes = max_bytes
        # the fingerprint samples large files; their sizes and modification times catch an edit in place
        files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in checkpoint.weight_files]
        self.identity = {"checkpoint": checkpoint.fingerprint, "files": files, "reference_dtype": str(reference_dtype),
                         "transformers": transformers.__version__, "torch": torch.__version__}
        self.hits = self.misses = self.rejected = 0

    def _key(self, kind, inputs):
        h = hashlib.sha256(json.dumps({**self.identity, "kind": kind}, sort_keys=True).encode())
        for t in inputs:
            t = torch.as_tensor(t).contiguous().to("cpu", torch.int64)
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:32]

    def _path(self, key):
        return self.root / f"{key}.safetensors"

    def _read(self, key, kind):
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or json.loads(meta.get("identity", "{}")) != self.identity \
                        or meta.get("kind") != kind:
                    raise ValueError("metadata does not match")
                out = {name: f.get_tensor(name) for name in f.keys()}
            os.utime(path)  # recently used: evicted last
            return out
        except Exception:  # a truncated or foreign file: recomputed, never trusted
            self.rejected += 1
            path.unlink(missing_ok=True)
            return None

    def _write(self, key, kind, tensors):
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                      metadata={"key": key, "kind": kind, "identity": json.dumps(self.identity, sort_keys=True)})
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._evict()

    def _evict(self):
        entries = sorted(self.root.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.max_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)

    def lookup(self, kind, inputs):
        """The tensors stored for these inputs (a hit), or None."""
        found = self._read(self._key(kind, inputs), kind)
        self.hits += found is not None
        return found

    def store(self, kind, inputs, tensors, keep=True):
        """Keep what was just computed (a miss), unless it alone exceeds the bound (it would evict itself)
        or the caller says it would not fit with the rest of its kind (`keep=False`)."""
        self.misses += 1
        if keep and nbytes(tensors) <= self.max_bytes:
            self._write(self._key(kind, inputs), kind, tensors)

    def get_or_compute(self, kind, inputs, compute):
        """The tensors {name: tensor} that `compute()` returns for these inputs, from the cache when there."""
        found = self.lookup(kind, inputs)
        if found is None:
            found = compute()
            self.store(kind, inputs, found)
        return found

    def summary(self):
        return {"hits": self.hits, "misses": self.misses, "rejected": self.rejected, "root": str(self.root),
                "max_bytes": self.max_bytes}


class CachedReference:
    """The reference engine behind the cache: no-cache forwards and captures come from disk when they were
    computed before; forwards through a KV cache run (they are part of a computation cached as a whole:
    `memo`)."""

    capabilities = frozenset({"new_cache", "capture_layers"})

    def __init__(self, engine, cache):
        self.engine, self.cache = engine, cache

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def new_cache(self):
        return self.engine.new_cache()

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if cache is not None:
            return self.engine.forward(input_ids, position_ids, attention_mask, cache)
        inputs = (input_ids, position_ids) + (() if attention_mask is None else (attention_mask,))
        return self.cache.get_or_compute("logits", inputs, lambda: {
            "logits": self.engine.forward(input_ids, position_ids, attention_mask).cpu()})["logits"]

    def capture_layers(self, input_ids, position_ids):
        """Intermediate validation's captures, a layer at a time (an entry per layer): from disk while they
        are there; from the first layer that is not, one forward of the engine, which skips the layers
        already read and stores the rest."""
        inputs = (input_ids, position_ids)
        layers = self.engine.config.num_hidden_layers
        computing, keep = None, True
        try:
            for i in range(layers):
                kind = f"capture{POINTS_VERSION}.layer{i}"
                found = None if computing else self.cache.lookup(kind, inputs)
                if found is None:
                    if computing is None:
                        computing = self.engine.capture_layers(input_ids, position_ids)
                        for _ in range(i):
                            next(computing)
                    found = next(computing, {})
                    if keep and nbytes(found) * layers > self.cache.max_bytes:
                        # storing them would evict the first layers before the last were written: every
                        # later run would miss at layer 0 and write them all again
                        keep = False
                        print(f"note: the captures (~{size_text(nbytes(found) * layers)}) exceed the reference "
                              f"cache's bound ({size_text(self.cache.max_bytes)}, --reference_cache_gb): not cached")
                    self.cache.store(kind, inputs, found, keep)
                yield found
        finally:
            if computing is not None:
                computing.close()

    def memo(self, kind, inputs, compute):
        return self.cache.get_or_compute(kind, inputs, compute)
