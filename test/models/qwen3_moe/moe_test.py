#!/usr/bin/env python3
"""Qwen3-MoE sparse MoE block of one layer: latency and tok/s, routing analysis, checked against float32.

Cases: a prefill of 704 tokens in one call and a decode of 16 tokens in one call (as the originals).
Inputs are `--inputs text` (default: the hidden states that reach this layer's MoE block when the
checkpoint itself reads real text, so the routing is realistic) or `--inputs random` (uniform [0, 1),
the originals' way, which routes unrealistically).

Routing analysis, from the float32 reference router on the inputs used: tokens per expert, load
imbalance (max / mean), fraction of experts unused, mean router entropy. Correctness: the block's
output against the same block in float32 with the eager experts loop on the CPU (cosine, max abs,
NMSE, verdict from the kit's dtype tolerances), and the router: its logits within tolerance and its
top-k choice (fraction of tokens whose expert set matches the reference). Tokens whose top-k choice
is a near-tie (the reference's k-th/(k+1)-th logit gap is within the candidate's own logit error)
are counted and left out of the output comparison; on every other token the expert sets must match. GFLOP/s and GB/s use the FLOPs of the experts actually run and the
bytes of the weights actually read.

The originals' result line is printed word for word, with their formula (mean latency over the runs).
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import cli  # noqa: E402
from kitcore.compare import compare, tolerance_for  # noqa: E402
from kitcore.devices import Device  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402
from kitcore.qwen3_moe import (HFModules, bench_finish, bench_parser, bench_setup, first_output,  # noqa: E402
                               module_engine, moe_weights, report_measurement)
from kitcore.timing import benchmark  # noqa: E402

SCRIPT = "moe_test"


def text_hidden_states(checkpoint, layer, tokens):
    """[1, tokens, H]: the input of layer `layer`'s MoE block when the model reads stdlib docstrings
    (float32, CPU; only the layers up to `layer` are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kitcore.tiny import stdlib_docstrings

    tok = AutoTokenizer.from_pretrained(str(checkpoint.path), local_files_only=True)
    ids, docs = [], iter(stdlib_docstrings())
    while len(ids) < tokens:
        ids += tok(next(docs) + "\n\n")["input_ids"]
    config = AutoConfig.from_pretrained(str(checkpoint.path))
    if tokens > config.max_position_embeddings:
        raise UsageError(f"{tokens} tokens of text exceed max_position_embeddings={config.max_position_embeddings}; "
                         "use fewer tokens or --inputs random")
    config.num_hidden_layers = layer + 1
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), config=config, dtype=torch.float32,
                                                 use_safetensors=True).eval()
    captured = {}
    hook = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:tokens]]))
    hook.remove()
    return captured["x"].detach()


def router_logits(gate, x):
    """[T, E] router logits: transformers 5.x routers return (logits, weights, indices), 4.57's are Linear."""
    with torch.no_grad():
        out = gate(x.reshape(-1, x.shape[-1]))
    return (out[0] if isinstance(out, tuple) else out).detach().cpu().float()


def routing_analysis(gate, x, num_experts, top_k):
    """Statistics of the reference router's choices; also returns its logits [T, E]."""
    logits = router_logits(gate, x)
    chosen = logits.topk(top_k, -1).indices
    counts = torch.bincount(chosen.flatten(), minlength=num_experts).double()
    probs = logits.double().softmax(-1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    return {
        "tokens_per_expert": counts.long().tolist(),
        "load_imbalance": float(counts.max() / counts.mean()),
        "unused_fraction": float((counts == 0).double().mean()),
        "router_entropy": entropy,
        "router_entropy_normalised": entropy / math.log(num_experts),
    }, logits


def check_router(module, x_dev, ref_logits, top_k, dtype):
    """Which tokens' expert choice is decisive, and does the candidate's router agree on those?

    A token is a near-tie when the reference's gap between its k-th and (k+1)-th router logit is within
    twice the candidate's own router-logit error on that token: rounding alone may then pick the other
    expert, which changes the token's output by far more than rounding (the same reason a top-1 flip at
    a near-tie is not a failure). Near-ties are excluded from the output comparison and counted; the
    router logits themselves must pass the dtype's tolerance, so the exclusion stays small.
    Without a `.gate` on the candidate, the margin comes from the dtype's tolerance instead.
    """
    top = ref_logits.sort(-1, descending=True).values
    gap = top[:, top_k - 1] - top[:, top_k]
    ref_choice = ref_logits.topk(top_k, -1).indices.sort(-1).values
    gate = getattr(module, "gate", None)
    if gate is None:
        tol = tolerance_for(dtype)
        margin = 2 * (tol.atol_rms * ref_logits.pow(2).mean().sqrt() + tol.rtol * ref_logits.abs().max(-1).values)
        near_tie = gap <= margin
        return {"decisive": ~near_tie, "near_ties": int(near_tie.sum()), "logits": None, "match_all": None,
                "match_decisive": None, "passed": True}
    cand_logits = router_logits(gate, x_dev)
    logits_check = compare(cand_logits, ref_logits, dtype, "router logits")
    near_tie = gap <= 2 * (cand_logits - ref_logits).abs().max(-1).values
    cand_choice = cand_logits.topk(top_k, -1).indices.sort(-1).values
    same = (cand_choice == ref_choice).all(-1)
    decisive = ~near_tie
    match_decisive = float(same[decisive].double().mean()) if decisive.any() else 1.0
    return {"decisive": decisive, "near_ties": int(near_tie.sum()), "logits": logits_check,
            "match_all": float(same.double().mean()), "match_decisive": match_decisive,
            "passed": logits_check.passed and match_decisive == 1.0}


def flops_and_bytes(config, tokens, experts_used, dtype):
    h, inter, k, e = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok, config.num_experts
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * tokens * h * e + 2 * 3 * h * inter * k * tokens
    moved = (e * h + experts_used * 3 * h * inter + 2 * tokens * h) * size
    return flops, moved


def main(argv=None):
    parser = bench_parser(__doc__, "--experts", ["eager", "grouped_mm", "batched_mm"], "grouped_mm")
    parser.add_argument("--inputs", default="text", choices=["text", "random"], help="hidden states (default text)")
    parser.add_argument("--prefill_tokens", type=int, default=704, help="tokens of the prefill call (default 704)")
    parser.add_argument("--decode_tokens", type=int, default=16, help="tokens of the decode call (default 16)")
    args = parser.parse_args(argv)
    if args.prefill_tokens < 1 or args.decode_tokens < 1:
        raise UsageError("--prefill_tokens and --decode_tokens must be at least 1")
    device, dtype, checkpoint, config, results = bench_setup(args, SCRIPT, args.experts)
    weights = moe_weights(checkpoint, args.layer)
    engine = module_engine(args.engine, ("build_moe",))
    module = engine.build_moe(config, weights, device, dtype, args.experts)
    cpu = Device("cpu", "cpu")
    reference = HFModules().build_moe(config, weights, cpu, torch.float32, "eager")
    total = args.prefill_tokens + args.decode_tokens
    if args.inputs == "text":
        hidden = text_hidden_states(checkpoint, args.layer, total)
    else:
        hidden = torch.rand(1, total, config.hidden_size, generator=torch.Generator().manual_seed(args.seed))
    cases = {"prefill": hidden[:, :args.prefill_tokens], "decode": hidden[:, args.prefill_tokens:]}

    print("*" * 130)
    print("Test Qwen3 MoE")
    print("*" * 130)
    all_passed, summary = True, {}
    for phase, x in cases.items():
        tokens = x.shape[1]
        if phase == "prefill":
            print(f"Test Case PREFILL_TESTCASES : {{'tokens': {tokens}, 'inputs': {args.inputs!r}}}")
        else:
            print("\n")
            print("-" * 130)
            print(f"\nTest DECODE_TESTCASES: {{'tokens': {tokens}, 'inputs': {args.inputs!r}}}")
        x_dev = x.to(device.torch_device, dtype)
        device.reset_peak_memory()  # the first (untimed) call gives the case's peak memory
        with torch.no_grad():
            out = first_output(module(x_dev)).detach().cpu()
        peak = device.peak_memory_bytes()
        with torch.no_grad():
            ref = first_output(reference(x))
        routing, ref_logits = routing_analysis(reference.gate, x, config.num_experts, config.num_experts_per_tok)
        router = check_router(module, x_dev, ref_logits, config.num_experts_per_tok, dtype)
        decisive = router["decisive"]
        c = compare(out.reshape(-1, out.shape[-1])[decisive], ref.reshape(-1, ref.shape[-1])[decisive], dtype, phase)
        passed = c.passed and router["passed"]
        all_passed &= passed

        def call(x_dev=x_dev):
            with torch.no_grad():
                module(x_dev)

        m = benchmark(call, device, args.warmups, args.runs, f"MoE {phase} {tokens} tokens")
        used = sum(1 for n in routing["tokens_per_expert"] if n)
        flops, moved = flops_and_bytes(config, tokens, used, dtype)
        report_measurement(results, phase, m, tokens, flops, moved, peak, phase=phase)
        results.add_comparison(phase, c, phase=phase)
        for key in ("load_imbalance", "unused_fraction", "router_entropy"):
            results.add(phase, key, routing[key], phase=phase)
        for expert, count in enumerate(routing["tokens_per_expert"]):
            results.add(phase, "expert_tokens", count, unit="count", phase=phase, expert=expert)
        results.add(phase, "near_tie_tokens", router["near_ties"], unit="count", phase=phase)
        if router["logits"] is not None:
            results.add(phase, "router_topk_match", router["match_all"], unit="fraction", phase=phase)
            results.add(phase, "router_topk_match_decisive", router["match_decisive"], unit="fraction", phase=phase)
            results.add(phase, "router_logits_nmse", router["logits"].nmse, phase=phase)
        results.add(phase, "passed", passed, unit="bool", phase=phase)
        summary[phase] = {"tokens": tokens, **m.summary(), "routing": routing, "near_tie_tokens": router["near_ties"],
                          "router_topk_match": router["match_all"],
                          "router_topk_match_decisive": router["match_decisive"], "comparison": c.as_dict()}
        print(f"  {m.describe()}")
        print(f"  {tokens / m.median_ms * 1e3:.1f} tok/s, {flops / m.median_ms / 1e6:.2f} GFLOP/s, "
              f"{moved / m.median_ms / 1e6:.2f} GB/s at the median")
        print(f"  routing: tokens per expert {routing['tokens_per_expert']}; imbalance (max/mean) "
              f"{routing['load_imbalance']:.2f}; unused experts {routing['unused_fraction']:.0%}; router entropy "
              f"{routing['router_entropy']:.3f} nats ({routing['router_entropy_normalised']:.0%} of uniform)")
        k = config.num_experts_per_tok
        print(f"  correctness vs float32 eager ({tokens - router['near_ties']} decisive tokens, {router['near_ties']} "
              f"near-tie tokens excluded): max abs {c.max_abs:.3e}, cosine {c.cosine:.6f}, nmse {c.nmse:.3e}"
              f" -> {'ok' if c.passed else 'FAIL: ' + c.reason}")
        if router["logits"] is not None:
            r = router["logits"]
            print(f"  router: logits nmse {r.nmse:.2e} {'ok' if r.passed else 'FAIL: ' + r.reason}; top-{k} expert set "
                  f"matches the reference on {router['match_all']:.1%} of tokens, {router['match_decisive']:.1%} of "
                  f"decisive tokens{'' if router['passed'] else ' -> FAIL'}")
        print(f"\t WARMUPS={args.warmups} RUNS={args.runs}, MoE Torch average latency: {round(m.mean_ms, 2)} ms   "
              f"throughput: {round(tokens / (m.mean_ms / 1e3), 2)} tok/s")
    return bench_finish(results, device, summary, all_passed, args.json)


if __name__ == "__main__":
    sys.exit(cli.run(main))
