"""The Qwen3-MoE sparse MoE block benchmark; its shell, with the description --help prints: test/models/qwen3_moe/moe_test.py.

Qwen3-MoE sparse MoE block of one layer: latency and tok/s, routing analysis, checked against float32.
"""

import math
from dataclasses import dataclass

import torch

from . import judges, session
from .devices import Device
from .errors import UsageError
from .qwen3_moe import (HFModules, check_moe_block, first_output, module_engine, moe_weights,
                              text_hidden_states)
from .roofline import CacheFlush
from .timing import benchmark, timer_note

SCRIPT = "moe_test"
SWEEP_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)  # tokens per call


def input_hidden_states(args, checkpoint, config, tokens):
    """[1, tokens, H] inputs of the MoE block: real text's hidden states (beyond the context, its first
    context-length window repeated: the block works per token), or uniform random."""
    if args.inputs == "random":
        return torch.rand(1, tokens, config.hidden_size, generator=torch.Generator().manual_seed(args.seed))
    window = min(tokens, config.max_position_embeddings)
    states = text_hidden_states(checkpoint, args.layer, window, "mlp")
    return states.repeat(1, -(-tokens // window), 1)[:, :tokens]


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


def flops_and_bytes(config, tokens, experts_used, dtype):
    h, inter, k, e = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok, config.num_experts
    size = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * tokens * h * e + 2 * 3 * h * inter * k * tokens
    moved = (e * h + experts_used * 3 * h * inter + 2 * tokens * h) * size
    return flops, moved


@dataclass
class Blocks:
    """The candidate's block, the float32 CPU reference and the peer (or None), with the layer's weights."""

    module: object
    reference: object
    peer: object
    weights: dict
    judge: judges.Judge
    own_streams: bool


def parse_args(argv, doc):
    # transformers 4.57 has only the eager experts loop: the default names what runs
    import transformers

    default_experts = "grouped_mm" if int(transformers.__version__.split(".")[0]) >= 5 else "eager"
    parser = session.bench_parser(doc, "--experts", ["eager", "grouped_mm", "batched_mm"], default_experts)
    parser.add_argument("--inputs", default="text", choices=["text", "random"], help="hidden states (default text)")
    parser.add_argument("--prefill_tokens", type=int, default=704, help="tokens of the prefill call (default 704)")
    parser.add_argument("--decode_tokens", type=int, default=16, help="tokens of the decode call (default 16)")
    args = parser.parse_args(argv)
    if args.prefill_tokens < 1 or args.decode_tokens < 1:
        raise UsageError("--prefill_tokens and --decode_tokens must be at least 1")
    return args


def negative_router(weights, x, dtype):
    """(weights, tokens): the weights with the router's rows shifted by m (W' = W - 1 m^T) so that every
    logit of the chosen tokens is below zero, and those tokens [1, N, H]: m lies along the mean hidden
    state, scaled past the largest logit; the tokens are the half of x with the largest component along
    that mean (a token with little of it would need a shift so large that its rounding, not the kernel,
    would be tested). W' is rounded to `dtype`, the candidate's, and the reference and the peer use those
    values too: the shift is exact in every engine's dtype, so the case judges the kernel, not the shift's
    rounding."""
    w, tokens = weights["gate.weight"].double(), x.reshape(-1, x.shape[-1]).double()
    mean = tokens.mean(0)
    along = tokens @ mean / mean.dot(mean)  # each token's component along the mean
    chosen = along >= along.median()
    if not bool((along[chosen] > 0).all()):
        return None, None
    largest = (tokens[chosen] @ w.T).max(-1).values
    m = float(((largest.clamp_min(0) + 1.0) / along[chosen]).max()) * mean / mean.dot(mean)
    return {**weights, "gate.weight": (w - m[None]).to(dtype).to(weights["gate.weight"].dtype)}, x[:, chosen]


def open_blocks(bench, weights=None):
    args, config, device, dtype = bench.args, bench.config, bench.device, bench.dtype
    weights = weights if weights is not None else moe_weights(bench.checkpoint, args.layer)
    module = module_engine(args.engine, ("build_moe",)).build_moe(config, weights, device, dtype, args.experts)
    reference = HFModules().build_moe(config, weights, Device("cpu", "cpu"), torch.float32, "eager")
    peer = bench.peer(args.experts, lambda: HFModules().build_moe(config, weights, device, dtype, "eager"),
                      "eager experts")
    judge = judges.Judge(dtype, judges.TOLERANCES[dtype], calibrated=peer is not None)
    own_streams = bool(getattr(module, "own_streams", False))
    bench.results.env["timer"] = timer_note(device, own_streams)
    return Blocks(module, reference, peer, weights, judge, own_streams)


def print_case_header(case, tokens, inputs_kind):
    if case == "prefill":
        print(f"Test Case PREFILL_TESTCASES : {{'tokens': {tokens}, 'inputs': {inputs_kind!r}}}")
    elif case == "decode":
        print("\n")
        print("-" * 130)
        print(f"\nTest DECODE_TESTCASES: {{'tokens': {tokens}, 'inputs': {inputs_kind!r}}}")
    else:
        print(f"\nsweep point: {tokens} tokens")


def check_case(bench, blocks, x):
    """The block on x [1, T, H]: its output (the first call, which may compile), peak memory, routing and
    verdict (kitcore.qwen3_moe.check_moe_block)."""
    device, config = bench.device, bench.config
    x_dev = x.to(device.torch_device, bench.dtype)
    with torch.no_grad():
        out = first_output(blocks.module(x_dev)).detach().cpu()
        device.reset_peak_memory()
        blocks.module(x_dev)
    peak = device.peak_memory_bytes()
    with torch.no_grad():
        ref = first_output(blocks.reference(x))
        peer_out = first_output(blocks.peer(x_dev)).detach().cpu() if blocks.peer is not None else None
    routing, ref_logits = routing_analysis(blocks.reference.gate, x, config.num_experts, config.num_experts_per_tok)
    gate = getattr(blocks.module, "gate", None)
    check = check_moe_block(out, ref, x, blocks.weights, config, ref_logits, blocks.judge, peer_out,
                            router_logits(blocks.peer.gate, x_dev) if blocks.peer is not None else None,
                            router_logits(gate, x_dev) if gate is not None else None)
    return x_dev, peak, routing, check


def time_case(bench, blocks, case, tokens, x_dev, peak, routing, flush, **labels):
    """Warm (and with --cold, cold) timings of the block on x_dev, as metric lines."""
    args = bench.args

    def call():
        with torch.no_grad():
            blocks.module(x_dev)

    m = benchmark(call, bench.device, args.warmups, args.runs, f"MoE {case} {tokens} tokens",
                  own_streams=blocks.own_streams)
    used = sum(1 for n in routing["tokens_per_expert"] if n)
    flops, moved = flops_and_bytes(bench.config, tokens, used, bench.dtype)
    roof = bench.report(case, m, tokens, flops, moved, peak, **labels)
    cold = None
    if flush is not None:
        cold = benchmark(call, bench.device, args.warmups, args.runs, f"MoE {case} {tokens} tokens, cold",
                         setup=flush, own_streams=blocks.own_streams)
        bench.report(case, cold, tokens, flops, moved, None, cache="cold", **labels)
    return m, cold, roof, flops, moved


def record_case(bench, case, check, routing, **labels):
    results = bench.results
    results.add_comparison(case, check.output, **labels)
    for key in ("load_imbalance", "unused_fraction", "router_entropy"):
        results.add(case, key, routing[key], **labels)
    for expert, count in enumerate(routing["tokens_per_expert"]):
        results.add(case, "expert_tokens", count, unit="count", expert=expert, **labels)
    results.add(case, "near_tie_tokens", check.near_ties, unit="count", **labels)
    results.add(case, "rerouted_near_tie_tokens", check.rerouted, unit="count", **labels)
    if check.router_logits is not None:
        results.add(case, "router_topk_match", check.match_all, unit="fraction", **labels)
        results.add(case, "router_set_mismatches", check.set_mismatches, unit="count", **labels)
        results.add(case, "router_logits_nmse", check.router_logits.nmse, **labels)
    results.add(case, "passed", check.passed, unit="bool", **labels)


def print_case(bench, tokens, m, cold, roof, flops, moved, routing, check):
    c, k = check.output, bench.config.num_experts_per_tok
    print(f"  {m.describe()}")
    if cold:
        print(f"  {cold.describe()}; cold / warm median {cold.median_ms / m.median_ms:.2f}")
    print(f"  {tokens / m.median_ms * 1e3:.1f} tok/s, {flops / m.median_ms / 1e6:.2f} GFLOP/s, "
          f"{moved / m.median_ms / 1e6:.2f} GB/s at the median; roofline {roof.ms:.3f} ms ({roof.kind}-bound): "
          f"{roof.fraction:.1%} of the device's limit")
    print(f"  routing: tokens per expert {routing['tokens_per_expert']}; imbalance (max/mean) "
          f"{routing['load_imbalance']:.2f}; unused experts {routing['unused_fraction']:.0%}; router entropy "
          f"{routing['router_entropy']:.3f} nats ({routing['router_entropy_normalised']:.0%} of uniform)")
    peer_note = f", the peer {check.peer_rerouted}" if check.peer_rerouted is not None else ""
    print(f"  correctness vs float32 eager, every token ({check.near_ties} near-tie tokens matched against "
          f"their admissible expert sets; {check.rerouted} took another admissible set{peer_note}): "
          f"max abs {c.max_abs:.3e}, cosine {c.cosine:.6f}, nmse {c.nmse:.3e}"
          + (f" (allowed {c.limit_nmse:.2e} from the peer's {c.peer_nmse:.2e})" if c.judge == "calibrated" else "")
          + f" -> {'ok' if c.passed else 'FAIL: ' + c.reason}")
    if check.router_logits is not None:
        r = check.router_logits
        print(f"  router: logits nmse {r.nmse:.2e} {'ok' if r.passed else 'FAIL: ' + r.reason}; top-{k} expert set "
              f"matches the reference on {check.match_all:.1%} of tokens; {check.set_mismatches} token(s) "
              f"with a set that is not admissible{'' if check.set_mismatches == 0 else ' -> FAIL'}")
    else:
        print("  router: the module has no .gate; its routing is judged through the output of every token")
    if not bench.args.sweep:
        print(f"\t WARMUPS={bench.args.warmups} RUNS={bench.args.runs}, MoE Torch average latency: "
              f"{round(m.mean_ms, 2)} ms   throughput: {round(tokens / (m.mean_ms / 1e3), 2)} tok/s")


def main(argv=None, doc=None):
    args = parse_args(argv, doc)
    bench = session.Bench.open(args, SCRIPT, args.experts)
    blocks = open_blocks(bench)
    print(f"  {bench.results.env['timer']}")
    if args.sweep:
        cases = {f"sweep_tokens{n}": (n, {"sweep": "tokens", "size": n}) for n in SWEEP_TOKENS}
    else:
        cases = {"prefill": (args.prefill_tokens, {}), "decode": (args.decode_tokens, {})}
    total = sum(n for n, _ in cases.values()) if not args.sweep else max(SWEEP_TOKENS)
    hidden = input_hidden_states(args, bench.checkpoint, bench.config, total)
    flush = CacheFlush(bench.device) if args.cold else None

    print("*" * 130)
    print("Test Qwen3 MoE" + (f" sweep: tokens per call {', '.join(map(str, SWEEP_TOKENS))}" if args.sweep else ""))
    print("*" * 130)
    start = 0
    for case, (tokens, labels) in cases.items():
        x = hidden[:, :tokens] if args.sweep else hidden[:, start:start + tokens]
        start += tokens
        print_case_header(case, tokens, args.inputs)
        phase = labels.get("sweep", case)
        x_dev, peak, routing, check = check_case(bench, blocks, x)
        bench.verdict.add(case, check.passed, f"{case}: {failure(check)}")
        m, cold, roof, flops, moved = time_case(bench, blocks, case, tokens, x_dev, peak, routing, flush, phase=phase,
                                                **labels)
        record_case(bench, case, check, routing, phase=phase, **labels)
        bench.cases[case] = {"tokens": tokens, **m.summary(), "roofline_ms": roof.ms,
                             "roofline_fraction": roof.fraction, "bound": roof.kind, "routing": routing,
                             "near_tie_tokens": check.near_ties, "rerouted_near_tie_tokens": check.rerouted,
                             "router_topk_match": check.match_all, "router_set_mismatches": check.set_mismatches,
                             "comparison": check.output.as_dict(), **({"cold": cold.summary()} if cold else {}),
                             **labels}
        print_case(bench, tokens, m, cold, roof, flops, moved, routing, check)
    if not args.sweep:
        check_negative_router(bench, blocks, hidden[:, :args.prefill_tokens])
    return bench.finish()


def failure(check):
    """Why a MoEBlockCheck failed, in one line."""
    why = [] if check.output.passed else [f"output {check.output.reason}"]
    if check.router_logits is not None and not check.router_logits.passed:
        why.append(f"router logits {check.router_logits.reason}")
    if check.set_mismatches:
        why.append(f"{check.set_mismatches} token(s) routed to an expert set that is not admissible")
    return "; ".join(why)


def check_negative_router(bench, blocks, x):
    """The `negative_router` case: correctness only (module docstring)."""
    shifted, x = negative_router(blocks.weights, x, bench.dtype)
    if shifted is None:
        print("\nrouter shifted negative: skipped (the hidden states have no common direction to shift along)")
        return
    print(f"\nrouter shifted negative: {x.shape[1]} tokens, every router logit below zero")
    _, _, routing, check = check_case(bench, open_blocks(bench, shifted), x)
    c = check.output
    bench.results.add_comparison("negative_router", c, phase="negative_router")
    bench.results.add("negative_router", "passed", check.passed, unit="bool", phase="negative_router")
    bench.cases["negative_router"] = {"tokens": x.shape[1], "routing": routing, "comparison": c.as_dict(),
                                      "near_tie_tokens": check.near_ties, "router_set_mismatches": check.set_mismatches}
    print(f"  correctness vs float32 eager ({check.near_ties} near-tie tokens): max abs {c.max_abs:.3e}, nmse "
          f"{c.nmse:.3e} -> {'ok' if check.passed else 'FAIL: ' + failure(check)}")
    bench.verdict.add("negative_router", check.passed, f"negative_router (every router logit below zero): "
                                                       f"{failure(check)}")


