"""Embedded checkpoints, generated locally: nothing is downloaded.

Recipe:
  * corpus: docstrings of the Python standard library, read with `ast` (no imports);
  * tokenizer: byte-level BPE, 2048 tokens, trained on that corpus with `tokenizers`;
  * Llama "tiny": 2 layers, hidden 128, 4 heads / 2 KV heads, head_dim 32, trained for a fixed number
    of steps (not a time budget) so that its next-token distributions are peaked like a real model's;
  * Qwen3-MoE "tiny": 2 layers, hidden 128, 4 heads / 2 KV heads, q_norm/k_norm, 8 experts, top-2,
    trained the same way (with its load-balancing loss) so that the router is peaked like a real one
    (a random router is near-uniform and flips experts on rounding noise); saved with per-expert
    weights like real Qwen3 checkpoints;
  * larger `size`s are random init, for scale and speed measurements; "8b" (Llama only) is written one
    decoder layer per safetensors shard, generated and freed in turn (STREAMED_SIZES).

Determinism: the trained checkpoints are byte-identical across x86-64 CPUs and core counts (measured: AVX-512
with AMX and AVX2 kernels, MKL held to AVX2, 1 or 2 cores; AMD rests on MKL's documented COMPATIBLE branch,
not measured). Training runs in a child process whose arithmetic does not depend on the machine
(TRAINING_ARITHMETIC: torch's AVX2 kernels, oneDNN capped at AVX2, MKL's strict conditional-numerical-
reproducibility mode on the one branch it honours on every vendor's CPU) on a fixed 2 threads; those
settings are read when torch loads, hence the child. Left to the machine, an AVX-512 CPU trains another
model than an AVX2 one, and the suite's fault tests held on one of them only. Another Python version
reads another standard library, so another corpus; the kit always computes its reference from the
checkpoint under test, so a different default checkpoint is never wrong, only another model.
"""

import ast
import functools
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from .devices import dtype_name

GENERATION_THREADS = 2
TRAIN_STEPS = {"llama": 600, "qwen3_moe": 400}
TRAIN_BATCH, TRAIN_WINDOW, TRAIN_LR = 8, 128, 2e-3
VOCAB = 2048
EOT = "<|endoftext|>"
# Pinned for training (module docstring). MKL honours a CNR branch other than COMPATIBLE on Intel CPUs only
# (on others it silently takes its automatic branch), so COMPATIBLE; STRICT also fixes its reductions.
TRAINING_ARITHMETIC = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE,STRICT",
                       "OMP_NUM_THREADS": str(GENERATION_THREADS)}

# one decoder layer of Qwen3-30B-A3B's shapes (128 experts, top 8; its vocabulary cut to the kit's)
A3B_LAYER = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=1,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                 vocab_size=VOCAB, max_position_embeddings=4096)

# size -> config overrides; "tiny" is the default embedded checkpoint
SIZES = {
    "llama": {
        "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=512),
        "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=2048),
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=4096),
        # Llama-3.1-8B's shapes (its context shortened): written layer by layer, never all in memory
        "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192),
    },
    "qwen3_moe": {
        "tiny": dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                     num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=1024),
        "small": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32,
                      num_experts_per_tok=4, vocab_size=VOCAB, max_position_embeddings=2048),
        "1b": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32,
                   num_experts_per_tok=4, vocab_size=32000, max_position_embeddings=4096),
        "a3b": A3B_LAYER,
        # the same router and attention, its experts narrowed: a real release's routing at a test's cost
        "a3b-router": {**A3B_LAYER, "moe_intermediate_size": 64},
    },
}

DEFAULT_PROMPT = ("Return a new list containing all items from the iterable in ascending order. "
                  "A custom key function can be supplied to customize the sort order.")


@functools.lru_cache(maxsize=1)
def stdlib_docstrings():
    """Docstrings (>= 40 chars) of the standard library, in a fixed order, without importing anything: a
    tuple, parsed once per process (~5 s; every checkpoint generation reads the same corpus)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc and len(doc) >= 40:
                        docs.append(doc)
    return tuple(docs)


def train_tokenizer(docs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def save_tokenizer(tok, out):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT, unk_token=None)
    fast.model_max_length = 1 << 20
    fast.save_pretrained(out)


def _split(docs, tok):
    """Token streams for training and held-out text (every 20th block of 50 docstrings is held out)."""
    eot = tok.token_to_id(EOT)
    train, held = [], []
    for i, enc in enumerate(tok.encode_batch(list(docs))):
        (held if (i // 50) % 20 == 7 else train).extend(enc.ids + [eot])
    return torch.tensor(train), torch.tensor(held)


def _train(model, stream, seed, steps):
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=TRAIN_LR, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - TRAIN_WINDOW - 1, (TRAIN_BATCH,), generator=g)
        x = torch.stack([stream[s:s + TRAIN_WINDOW] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def held_out_stats(model, stream, windows=32, length=128):
    """Median top-1 probability and mean loss on evenly spaced held-out windows."""
    step = max((len(stream) - length - 1) // windows, 1)
    top1, losses = [], []
    for i in range(windows):
        x = stream[i * step:i * step + length + 1][None]
        logits = model(input_ids=x[:, :-1]).logits.float()
        probs = logits.softmax(-1)
        top1.append(probs.max(-1).values.flatten())
        losses.append(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]))
    return {"median_top1_prob": float(torch.cat(top1).median()), "held_out_loss": float(torch.stack(losses).mean())}


def _qwen3_style_config(out):
    """Rewrite config.json in the style of the real Qwen3 / Llama checkpoints (top-level rope_theta,
    num_experts), which transformers 4.57 and 5.x both read."""
    path = Path(out) / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build_model(family, size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = SIZES[family][size]
    common = dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.02,
                  bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(**shape, **common)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    cfg = Qwen3MoeConfig(**shape, **common, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"
    return Qwen3MoeForCausalLM(cfg)


STREAMED_SIZES = ("8b",)


def _write_streamed(family, size, seed, out, dtype, log):
    """A random-init checkpoint too large to build in memory: the model is built without weights (meta
    device) for its names and shapes; each piece (embedding, one decoder layer, final norm + LM head) is drawn
    from its own seeded generator (normal(0, 0.02); norms 1), saved as one shard, and freed."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if family != "llama":
        raise ValueError(f"size {size} exists for the Llama family only")
    cfg = LlamaConfig(**SIZES[family][size], tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0,
                      bos_token_id=None, eos_token_id=0, pad_token_id=0, dtype=dtype_name(dtype))
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(cfg).state_dict().items()}
    pieces = [["model.embed_tokens.weight"]]
    pieces += [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(cfg.num_hidden_layers)]
    pieces += [["model.norm.weight", "lm_head.weight"]]
    weight_map, total = {}, 0
    for k, names in enumerate(pieces):
        shard = f"model-{k + 1:05d}-of-{len(pieces):05d}.safetensors"
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight")
                       else torch.randn(shapes[n], generator=generator).mul_(0.02)).to(dtype) for n in names}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: shard for n in names})
        what = "embedding" if k == 0 else "final norm + LM head" if k == len(pieces) - 1 else f"layer {k - 1}"
        log(f"  {shard}: {what}, {sum(t.numel() for t in tensors.values()) / 1e6:.0f}M parameters")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.to_json_file(str(out / "config.json"))
    saved = json.loads((out / "config.json").read_text())
    saved.pop("dtype", None)
    saved["torch_dtype"] = dtype_name(dtype)  # as real checkpoints say it (every release reads it)
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return sum(math.prod(s) for s in shapes.values())


def arithmetic_is_pinned():
    """Whether this process computes with TRAINING_ARITHMETIC (it started with those settings)."""
    return all(os.environ.get(name) == value for name, value in TRAINING_ARITHMETIC.items())


def _write_in_pinned_child(family, out, seed, dtype, log, train_steps):
    """write_checkpoint in a child process started with TRAINING_ARITHMETIC; its log lines reach `log`."""
    script = Path(__file__).resolve().parents[1] / "tiny_checkpoint.py"
    argv = [sys.executable, str(script), "--family", family, "--out", str(out), "--seed", str(seed),
            "--dtype", dtype_name(dtype)]
    if train_steps:
        argv += ["--train_steps", str(train_steps)]
    child = subprocess.run(argv, env={**os.environ, **TRAINING_ARITHMETIC}, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"training the {family} checkpoint failed (exit {child.returncode}): "
                           + (child.stderr.strip().splitlines() or ["no output"])[-1])
    for line in child.stdout.splitlines():
        log(line)
    return json.loads((Path(out) / "kit_metadata.json").read_text())


def write_checkpoint(family, out, seed=0, size="tiny", dtype=torch.float32, log=print, train_steps=None,
                     arithmetic="pinned"):
    """Write a HuggingFace checkpoint directory for `family` into `out` (created if missing). `train_steps`
    shortens the tiny recipe's training (TRAIN_STEPS): the same code path in a few seconds, for tests of
    its determinism; the default checkpoints always take the full recipe. A trained size is trained with
    TRAINING_ARITHMETIC (in a child process unless this one has it); `arithmetic="native"` trains with
    whatever this process computes with instead: another model per kind of CPU, for tests whose margins
    must not hang on one model."""
    out = Path(out)
    if size == "tiny" and arithmetic == "pinned" and not arithmetic_is_pinned():
        return _write_in_pinned_child(family, out, seed, dtype, log, train_steps)
    out.mkdir(parents=True, exist_ok=True)
    if size in STREAMED_SIZES:
        t0 = time.perf_counter()
        docs = stdlib_docstrings()
        save_tokenizer(train_tokenizer(docs), out)
        meta = {"family": family, "size": size, "seed": seed, "train_steps": 0, "torch": torch.__version__,
                "parameters": _write_streamed(family, size, seed, out, dtype, log)}
        (out / "generation_config.json").write_text(json.dumps(
            {"do_sample": False, "eos_token_id": 0, "pad_token_id": 0}, indent=2) + "\n")
        _qwen3_style_config(out)
        meta["generation_seconds"] = round(time.perf_counter() - t0, 1)
        (out / "kit_metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        log(f"wrote {family} {size} checkpoint (seed {seed}) to {out} in {meta['generation_seconds']} s")
        return meta
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(GENERATION_THREADS)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    try:
        docs = stdlib_docstrings()
        tok = train_tokenizer(docs)
        save_tokenizer(tok, out)
        model = build_model(family, size, seed)
        meta = {"family": family, "size": size, "seed": seed, "threads": GENERATION_THREADS,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                "arithmetic": ("pinned: " + " ".join(f"{k}={v}" for k, v in TRAINING_ARITHMETIC.items())
                               if arithmetic_is_pinned() else "native"),
                "parameters": sum(p.numel() for p in model.parameters()), "docstrings": len(docs)}
        train, held = _split(docs, tok)
        if size == "tiny":
            # the MoE trains with its load-balancing loss, as real ones do, so that routing is peaked but used
            model.config.output_router_logits = family == "qwen3_moe"
            meta["train_steps"] = train_steps or TRAIN_STEPS[family]
            meta["final_train_loss"] = _train(model, train, seed, meta["train_steps"])
            model.config.output_router_logits = False
        else:
            meta["train_steps"] = 0
        if size == "tiny":
            meta.update(held_out_stats(model, held))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.to(dtype).save_pretrained(out, max_shard_size="1GB")
        (out / "generation_config.json").write_text(json.dumps(
            {"do_sample": False, "eos_token_id": 0, "pad_token_id": 0}, indent=2) + "\n")
        _qwen3_style_config(out)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    meta["generation_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "kit_metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# Kit checkpoint: {family} {size}, seed {seed}\n\n"
        f"Generated locally by tools/tiny_checkpoint.py ({meta['parameters']:,} parameters, "
        f"{meta['train_steps']} training steps on Python standard-library docstrings).\n"
        + (f"Held-out median top-1 probability: {meta['median_top1_prob']:.3f}; "
           f"held-out loss {meta['held_out_loss']:.3f} nats/token.\n" if "median_top1_prob" in meta else "")
        + "See kit_metadata.json for the full record.\n")
    log(f"wrote {family} {size} checkpoint (seed {seed}) to {out} in {meta['generation_seconds']} s")
    return meta
