#!/usr/bin/env python3
"""The first layers of a checkpoint as a checkpoint of its own, for checking a model that does not fit.

    python tools/truncate_checkpoint.py SRC --layers N --out DIR
    python tools/truncate_checkpoint.py SRC --plan [--dtype bfloat16]

Streams the tensors of decoder layers 0..N-1, the embeddings, the final norm and the LM head from SRC's
safetensors shards (sharded or not) into DIR, byte for byte: each tensor is copied from its shard in chunks of
CHUNK bytes, never held whole, and the kept bytes are identical to the source's (their sha256 is recorded).
config.json gets num_hidden_layers N and its per-layer settings trimmed (lists of one entry per layer, lists of
layer indices such as mlp_only_layers, max_window_layers); every other file (tokenizer, generation config) is
copied. DIR/kit_truncated.json records where it came from: the source, its fingerprint, the layers kept and the
sha256 of the kept bytes. Every check of the kit runs on DIR.

What a truncated model's verdict means: each kept layer is checked as in the whole model (per-layer errors,
first divergence, the dual test), on inputs that the real model's own first layers produce; the logits are
those of an N-layer model behind the real LM head, not a language model's, so compare tensors and KL against
the reference, not perplexity or generated text. Lost: error build-up with depth, what only later layers do
(dense-first MoE layers past N, sliding windows, pipeline stages), capacity and load effects.

--plan reads SRC's config.json only (no weights): how much memory each check needs for N layers, and how many
layers fit this machine.
"""

import hashlib
import json
import re
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import cli, plan  # noqa: E402
from kitcore.checkpoints import open_checkpoint  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402

CHUNK = 16 << 20  # bytes copied at a time: the tool's memory, whatever the tensor's size
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kept(name, layers):
    match = LAYER.search(name)
    return match is None or int(match.group(1)) < layers


def trimmed_config(config, layers):
    """config with num_hidden_layers = layers and its per-layer settings cut to them."""
    total = config["num_hidden_layers"]
    out = dict(config, num_hidden_layers=layers)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == total and key not in ("architectures",):
            out[key] = value[:layers]  # one entry per layer (layer_types, ...)
    if isinstance(config.get("mlp_only_layers"), list):
        out["mlp_only_layers"] = [i for i in config["mlp_only_layers"] if i < layers]
    if isinstance(config.get("max_window_layers"), int):
        out["max_window_layers"] = min(config["max_window_layers"], layers)
    return out


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _write_shard(source, names, header, data_start, target, digest):
    """The tensors `names` of shard `source` into `target` in the same order and dtype, their bytes streamed."""
    entries, offset = {}, 0
    for name in names:
        start, end = header[name]["data_offsets"]
        entries[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                         "data_offsets": [offset, offset + end - start]}
        offset += end - start
    raw = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(source, "rb") as src, open(target, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            start, end = header[name]["data_offsets"]
            src.seek(data_start + start)
            left = end - start
            while left:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise UsageError(f"{source}: truncated inside tensor {name}; the source checkpoint is damaged")
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)


def truncate(source, layers, out):
    checkpoint = open_checkpoint(source)
    total = checkpoint.config["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise UsageError(f"--layers {layers}: {source} has {total} decoder layers; keep 1 to {total}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: not empty; give a new directory")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = [f for f in checkpoint.weight_files if any(kept(n, layers) for n in _header(f)[0] if n != "__metadata__")]
    digest, weight_map = hashlib.sha256(), {}
    for i, shard in enumerate(shards, 1):
        header, data_start = _header(shard)
        names = sorted((n for n in header if n != "__metadata__" and kept(n, layers)),
                       key=lambda n: header[n]["data_offsets"][0])
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(shard, names, header, data_start, tmp / name, digest)
        weight_map.update({n: name for n in names})
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=1) + "\n")
    for f in checkpoint.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "model.safetensors.index.json", "config.json", "kit_truncated.json"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(trimmed_config(checkpoint.config, layers), indent=2) + "\n")
    provenance = {"source": str(checkpoint.path.resolve()), "source_fingerprint": checkpoint.fingerprint,
                  "layers_kept": layers, "layers_in_source": total, "tensors_kept": len(weight_map),
                  "kept_bytes_sha256": digest.hexdigest(), "tool": "tools/truncate_checkpoint.py",
                  "meaning": "per-layer errors of the kept layers; logits of an N-layer model, not a language model's"}
    (tmp / "kit_truncated.json").write_text(json.dumps(provenance, indent=1) + "\n")  # inside the partial directory
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return provenance


def print_plan(source, dtype):
    """Memory per check for N layers, from config.json alone, and the layers that fit this machine."""
    path = Path(source) / "config.json"
    try:
        config = json.loads(path.read_text())
        total = config["num_hidden_layers"]
        per_layer = plan.layer_parameters(config)[0]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"--plan: cannot read a Llama or Qwen3-MoE config from {path}") from None
    fixed = config["vocab_size"] * config["hidden_size"] * (1 if config.get("tie_word_embeddings") else 2)
    b = BYTES[dtype]
    # (check, bytes per layer, bytes besides the layers): what each check holds in CPU memory at once
    checks = (("end-to-end, forward, batch, intermediate (streamed reference, candidate + peer in the dtype)",
               2 * b * per_layer, 4 * (per_layer + fixed) + 2 * b * fixed),
              ("the same with a resident reference", (4 + 2 * b) * per_layer, (4 + 2 * b) * fixed),
              ("corpus scoring with a format (reference, format in float64, candidate + peer)",
               (4 + 8 + 2 * b) * per_layer, (4 + 8 + 2 * b) * fixed))
    available = plan.available_memory_bytes()
    budget = plan.RESIDENT_MEMORY_SHARE * available if available else None
    print(f"truncate_checkpoint --plan: {path} ({config.get('model_type')}, {total} layers of "
          f"{per_layer / 1e9:.3g}B parameters, embeddings + LM head {fixed / 1e9:.3g}B; candidate {dtype}; "
          + (f"{plan.size_text(available)} available)" if available else "available memory unknown)"))
    for label, each, base in checks:
        fits = "?" if budget is None else max(0, min(total, int((budget - base) // each)))
        print(f"  {label}: {plan.size_text(base)} + {plan.size_text(each)} per layer; layers that fit: {fits}"
              + (f" of {total}" if budget is not None else ""))
    return 0


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="a HF checkpoint directory (safetensors, sharded or not)")
    parser.add_argument("--layers", type=int, help="decoder layers to keep, from layer 0")
    parser.add_argument("--out", help="the new checkpoint's directory (must not exist or be empty)")
    parser.add_argument("--plan", action="store_true", help="memory per check and layers that fit; no weights read")
    parser.add_argument("--dtype", default="bfloat16", choices=list(BYTES), help="--plan: candidate dtype")
    args = parser.parse_args(argv)
    if args.plan:
        return print_plan(args.source, args.dtype)
    if args.layers is None or args.out is None:
        raise UsageError("give --layers N and --out DIR (or --plan)")
    p = truncate(args.source, args.layers, args.out)
    print(f"truncate_checkpoint: {p['tensors_kept']} tensors of layers 0-{args.layers - 1} (of {p['layers_in_source']}),"
          f" embeddings, final norm and LM head -> {args.out}; kept bytes sha256 {p['kept_bytes_sha256'][:16]}")
    print("  a truncated model's verdict: per-layer errors of the kept layers; its logits are those of "
          f"a {args.layers}-layer model, not a language model's (compare tensors and KL, not text)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
