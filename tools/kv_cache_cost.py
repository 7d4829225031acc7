#!/usr/bin/env python3
"""What a quantised KV cache costs a checkpoint by itself, whatever engine holds it.

    python tools/kv_cache_cost.py [--model_path CKPT] [--kv_type q8_0|q4_0] [--decode_steps 256] [--json PATH]

HF Transformers in float32 runs the default prompt and its greedy continuation of --decode_steps tokens
twice: as it is (the reference), and with every attention call's keys and values (after RoPE) rounded to
the GGML block format and back by the `gguf` package's own quantiser (kitcore.formats, the kv-* formats), the queries to q8_0 (llama.cpp's CPU
attention takes a quantised cache's dot products in q8_0). As llama.cpp stores them (`--rotation hadamard`,
the default): llama-cpp-python 0.3.36's llama.cpp multiplies queries and keys, and values, by normalised
Hadamard blocks before a quantised cache where head_dim is a multiple of 64 (`attn_inp_k_rot` and
`attn_inp_v_rot` in its graph) and the attention output back; a Llama GGUF's q/k blocks hold its
interleaved RoPE order.
Intermediate validation of llama.cpp on Qwen2.5 with a q4_0 cache matches this at every capture point to 1%. The KL(reference || rounded) per position,
its first and last quarter and the top-1 agreement are what a correct engine with that cache must be
allowed: the `kv-*` distribution thresholds (kitcore.compare.DISTRIBUTIONS) are set above these figures
on every model measured (tools/measurements.md). A model with outlier keys (Qwen2's key biases) costs
far more than one without. A report, not a gate: exit 0 when it ran.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import cli  # noqa: E402
from kitcore.checkpoints import default_checkpoint, open_checkpoint  # noqa: E402
from kitcore.engines import quiet_transformers  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402
from kitcore.formats import rotation_sizes, rounded_attention  # noqa: E402
from kitcore.inputs import tokenizer  # noqa: E402
from kitcore.results import Results, environment  # noqa: E402
from kitcore.tiny import DEFAULT_PROMPT  # noqa: E402
from kitcore.verdict import Verdict  # noqa: E402

SCRIPT = "kv_cache_cost"
KV_TYPES = ("q8_0", "q4_0")


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", help="a HF checkpoint directory with a tokenizer (default: the kit's tiny Llama)")
    parser.add_argument("--kv_type", choices=KV_TYPES, default="q8_0", help="the cache's block format (default q8_0)")
    parser.add_argument("--decode_steps", type=int, default=256, help="greedy tokens after the prompt (default 256)")
    parser.add_argument("--rotation", choices=("hadamard", "none"), default="hadamard",
                        help="the cache as llama.cpp stores it, rotated where its head_dim is a multiple of 64 "
                             "(default), or the plain format")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH (atomically)")
    args = parser.parse_args(argv)
    if args.decode_steps < 4:
        parser.error("--decode_steps must be at least 4 (the figures have quarters)")
    from transformers import AttentionInterface, AutoModelForCausalLM

    quiet_transformers()
    checkpoint = open_checkpoint(args.model_path or default_checkpoint("llama"))
    head_dim = checkpoint.config.get("head_dim") or checkpoint.config["hidden_size"] // checkpoint.config[
        "num_attention_heads"]
    if head_dim % 32:
        raise UsageError(f"head_dim {head_dim} is not a multiple of 32, GGML's block: no {args.kv_type} cache")
    ids = torch.tensor([list(tokenizer(checkpoint.path)(DEFAULT_PROMPT))])
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), dtype=torch.float32, attn_implementation="sdpa")
    name = f"kit_{args.kv_type}_cache"
    AttentionInterface.register(name, rounded_attention(args.kv_type, args.rotation == "hadamard",
                                                        interleaved_qk=checkpoint.config.get("model_type") == "llama"))
    rotated = args.rotation == "hadamard" and rotation_sizes(head_dim) is not None
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=args.decode_steps, min_new_tokens=args.decode_steps,
                                do_sample=False)
        positions = slice(ids.shape[1] - 1, tokens.shape[1])  # the prompt's last position and every decode step
        reference = model(tokens).logits[0, positions].float().log_softmax(-1)
        model.set_attn_implementation(name)
        rounded = model(tokens).logits[0, positions].float().log_softmax(-1)
    kl = (reference.exp() * (reference - rounded)).sum(-1)
    quarter = len(kl) // 4
    figures = {"kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(), "kl_max": kl.max().item(),
               "top1": (reference.argmax(-1) == rounded.argmax(-1)).float().mean().item(),
               "kl_first_quarter": kl[:quarter].mean().item(), "kl_last_quarter": kl[-quarter:].mean().item()}
    print(f"{SCRIPT}: {checkpoint.path.name} ({checkpoint.fingerprint}), {args.kv_type} keys and values, q8_0 "
          f"queries, {'Hadamard-rotated' if rotated else 'not rotated'}; HF float32 sdpa, the default prompt "
          f"({ids.shape[1]} tokens) + {args.decode_steps} greedy tokens")
    print(f"  KL(reference || rounded) over {len(kl)} positions: mean {figures['kl_mean']:.2e}, p99 "
          f"{figures['kl_p99']:.2e}, max {figures['kl_max']:.2e}; top-1 {figures['top1']:.3f}; first quarter "
          f"{figures['kl_first_quarter']:.2e}, last {figures['kl_last_quarter']:.2e}")
    results = Results(SCRIPT, labels={"kv_type": args.kv_type, "rotation": args.rotation})
    results.env = environment(dtype=torch.float32, checkpoint=checkpoint)
    for metric, value in figures.items():
        results.add("kv_cache", metric, value, unit="-")
    return results.finish(Verdict(), args.json, title=None)  # a report: no verdict of its own


if __name__ == "__main__":
    sys.exit(cli.run(main))
