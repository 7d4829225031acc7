"""The Qwen3-MoE attention benchmark; its shell, with the description --help prints: test/models/qwen3_moe/attention_test.py.

Qwen3-MoE attention of one layer: prefill TTFT and decode throughput, checked against a float32 reference.
"""

from dataclasses import dataclass

import torch

from . import judges, session
from .compare import OWN_TOLERANCES
from .devices import Device
from .errors import UsageError
from .qwen3_moe import (HFModules, attention_mask, first_output, layer_weights, module_engine,
                              text_hidden_states)
from .roofline import CacheFlush
from .timing import benchmark, time_requests, timer_note

SCRIPT = "attention_test"
PREFILL_CASES = "64:512,128:0,256:0,256:256"
SWEEP_LENGTHS = (16, 64, 256, 1024, 4096)
SWEEP_BATCH = (1, 2, 4, 8, 16)
DECODE_CASES = ",".join(f"1:{p}" for p in [50] * 4 + [100] * 4 + [200] * 4 + [400] * 4)


def parse_cases(text, flag, max_pos, decode=False):
    cases = []
    for item in text.split(","):
        try:
            seq, past = (int(x) for x in item.split(":"))
        except ValueError:
            raise UsageError(f"{flag} {text!r}: expected seqlen:pastlen pairs, e.g. 64:512,128:0") from None
        if seq < 1 or past < 0 or (decode and seq != 1):
            raise UsageError(f"{flag}: bad case {item!r} (seqlen >= 1{', = 1 for decode' if decode else ''}, pastlen >= 0)")
        if seq + past > max_pos:
            raise UsageError(f"{flag}: case {item} needs {seq + past} positions, above max_position_embeddings="
                             f"{max_pos}; use shorter cases")
        cases.append((seq, past))
    return cases


@dataclass
class TextInputs:
    """Real text's hidden states at the attention's input ([1, N, H], float32, CPU) and the reference module
    that writes a window's past K/V."""

    states: torch.Tensor
    reference: object
    rotary: object  # on the CPU

    def past_kv(self, hidden):
        from transformers import DynamicCache

        past = hidden.shape[1]
        cache = DynamicCache(config=self.reference.config)
        if past:
            cos, sin = self.rotary(hidden, torch.arange(past)[None])
            mask = attention_mask(torch.ones(1, past, dtype=torch.bool), past, torch.float32, "eager", CPU.torch_device)
            with torch.no_grad():
                self.reference(hidden, (cos, sin), mask, cache)
            return cache.layers[0].keys, cache.layers[0].values
        kv, hd = self.reference.config.num_key_value_heads, self.reference.config.head_dim
        return torch.zeros(1, kv, 0, hd), torch.zeros(1, kv, 0, hd)


class Request:
    """One request: hidden states and past K/V, a cache that is reset to exactly that past. From `text`
    (TextInputs): a window of real text's hidden states at this layer, its past K/V what the float32 reference
    writes for the window's first `past` positions; else uniform random."""

    def __init__(self, config, seq, past, g, text=None):
        from transformers import DynamicCache

        self.seq, self.past, self.config = seq, past, config
        kv, hd = config.num_key_value_heads, config.head_dim
        self.position_ids = torch.arange(past, past + seq)[None]
        self.new_cache = lambda: DynamicCache(config=config)
        if text is None:
            self.hidden = torch.rand(1, seq, config.hidden_size, generator=g)
            self.past_k = torch.rand(1, kv, past, hd, generator=g)
            self.past_v = torch.rand(1, kv, past, hd, generator=g)
            return
        start = int(torch.randint(0, text.states.shape[1] - past - seq + 1, (1,), generator=g))
        window = text.states[:, start:start + past + seq]
        self.hidden = window[:, past:]
        self.past_k, self.past_v = text.past_kv(window[:, :past])

    def prepare(self, module, rotary, device, dtype, attn):
        """Inputs on the device, and a call that runs the module on them."""
        dev = device.torch_device
        hidden = self.hidden.to(dev, dtype)
        cos, sin = rotary(hidden, self.position_ids.to(dev))
        mask = attention_mask(torch.ones(1, self.past + self.seq, dtype=torch.bool), self.seq, dtype, attn, dev)
        cache = self.new_cache()
        if self.past:
            cache.update(self.past_k.to(dev, dtype), self.past_v.to(dev, dtype), 0)

        def call():
            with torch.no_grad():
                return first_output(module(hidden, (cos, sin), mask, cache))

        def reset():
            extra = cache.get_seq_length(0) - self.past
            if extra > 0:
                cache.crop(-extra)  # negative: drop the newest positions (transformers 4.57 and 5.x)

        return call, reset, cache


def batch_flops_and_bytes(config, pasts, dtype):
    """One decode token for each of len(pasts) requests in one batch: the weights are read once."""
    flops = sum(flops_and_bytes(config, 1, p, dtype)[0] for p in pasts)
    moved = sum(flops_and_bytes(config, 1, p, dtype)[1] for p in pasts) - (len(pasts) - 1) * weight_bytes(config, dtype)
    return flops, moved


def weight_bytes(config, dtype):
    h, hd = config.hidden_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    return (h * (nq + 2 * nkv) * hd + nq * hd * h + 2 * hd) * torch.tensor([], dtype=dtype).element_size()


def flops_and_bytes(config, seq, past, dtype):
    """FLOPs and bytes moved of one attention call (projections, causal attention, KV cache)."""
    h, hd = config.hidden_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    proj = 2 * seq * h * (nq * hd + 2 * nkv * hd) + 2 * seq * nq * hd * h
    visible = seq * past + seq * (seq + 1) // 2  # key positions each query sees, summed
    attention = 2 * 2 * nq * visible * hd
    size = torch.tensor([], dtype=dtype).element_size()
    weights = weight_bytes(config, dtype)
    activations = 2 * seq * h * size
    kv = 2 * nkv * hd * (past + seq) * size + 2 * nkv * hd * seq * size
    return proj + attention, weights + activations + kv


def batched_decode(requests, module, rotary, device, dtype, attn):
    """The decode requests as one batch, pasts left-padded to the longest; returns call, reset, outputs."""
    from transformers import DynamicCache

    dev = device.torch_device
    longest = max(r.past for r in requests)
    cfg = requests[0].config
    kv, hd, b = cfg.num_key_value_heads, cfg.head_dim, len(requests)
    keys = torch.zeros(b, kv, longest, hd)
    values = torch.zeros(b, kv, longest, hd)
    valid = torch.zeros(b, longest + 1, dtype=torch.bool)
    for i, r in enumerate(requests):
        keys[i, :, longest - r.past:] = r.past_k[0]
        values[i, :, longest - r.past:] = r.past_v[0]
        valid[i, longest - r.past:] = True
    hidden = torch.cat([r.hidden for r in requests]).to(dev, dtype)
    positions = torch.tensor([[r.past] for r in requests], device=dev)
    cos, sin = rotary(hidden, positions)
    mask = attention_mask(valid, 1, dtype, attn, dev)
    cache = DynamicCache(config=cfg)
    cache.update(keys.to(dev, dtype), values.to(dev, dtype), 0)

    def call():
        with torch.no_grad():
            return first_output(module(hidden, (cos, sin), mask, cache))

    def reset():
        if cache.get_seq_length(0) > longest:
            cache.crop(-(cache.get_seq_length(0) - longest))

    return call, reset


def sweep_points(max_pos):
    """The shape families of --sweep, within the context: prefill length (no past), decode context length
    (one token on a past), and decode batch (requests of one token at a past of 256, one after another)."""
    fit = [n for n in SWEEP_LENGTHS if n < max_pos] + [max_pos - 1]
    return {"prefill_length": [(n, 0) for n in fit],
            "context_length": [(1, n) for n in fit],
            "batch": [(b, min(256, max_pos - 1)) for b in SWEEP_BATCH]}


CPU = Device("cpu", "cpu")


@dataclass
class Modules:
    """The candidate's attention, the float32 CPU reference and the peer (or None); what every case needs."""

    bench: session.Bench
    module: object
    reference: object
    peer: object
    judge: judges.Judge
    rotary: object  # on the device
    ref_rotary: object  # on the CPU
    own_streams: bool
    flush: object  # a CacheFlush with --cold, else None
    generator: torch.Generator
    text: TextInputs  # None with --inputs random

    @classmethod
    def open(cls, bench, text_tokens):
        """The modules, and `text_tokens` of real text's hidden states at the layer (None: random inputs)."""
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

        args, config, device, dtype = bench.args, bench.config, bench.device, bench.dtype
        weights = layer_weights(bench.checkpoint, args.layer, "self_attn")
        module = module_engine(args.engine, ("build_attention",)).build_attention(config, weights, device, dtype,
                                                                                  args.attn)
        reference = HFModules().build_attention(config, weights, CPU, torch.float32, "eager")
        peer = bench.peer(args.attn, lambda: HFModules().build_attention(config, weights, device, dtype, "eager"),
                          "eager attention")
        judge = judges.Judge(dtype, OWN_TOLERANCES[dtype], calibrated=peer is not None)
        own_streams = bool(getattr(module, "own_streams", False))
        bench.results.env["timer"] = timer_note(device, own_streams)
        print(f"  {bench.results.env['timer']}")
        ref_rotary = Qwen3MoeRotaryEmbedding(config)
        text = None
        if text_tokens:
            states = text_hidden_states(bench.checkpoint, args.layer, text_tokens, "self_attn")
            text = TextInputs(states, reference, ref_rotary)
        bench.results.env["inputs"] = (f"text: layer {args.layer}'s attention inputs on {text_tokens} tokens of "
                                       "real text, past K/V from the float32 reference" if text else "uniform random")
        print(f"  inputs: {bench.results.env['inputs']}")
        return cls(bench, module, reference, peer, judge, Qwen3MoeRotaryEmbedding(config).to(device.torch_device),
                   ref_rotary, own_streams, CacheFlush(device) if args.cold else None,
                   torch.Generator().manual_seed(args.seed), text)

    def reference_output(self, r):
        ref_call, _, _ = r.prepare(self.reference, self.ref_rotary, CPU, torch.float32, "eager")
        return ref_call()


def first_outputs(m, requests, prepared):
    """Each request's first output (the first call may compile: not the one measured), its peak memory,
    and the reference's and the peer's outputs."""
    device, outputs, peaks = m.bench.device, [], []
    for r, (call, reset, _) in zip(requests, prepared):
        outputs.append(call().detach().cpu())
        reset()
        device.reset_peak_memory()
        call()
        peaks.append(device.peak_memory_bytes())
        reset()
        r.reference = m.reference_output(r)
        if m.peer is not None:
            peer_call, _, _ = r.prepare(m.peer, m.rotary, device, m.bench.dtype, "eager")
            r.peer = peer_call().detach().cpu()
    return outputs, peaks


def run_phase(m, phase, cases, labels=None):
    """Time and check the requests `cases` [(seq, past)]; `labels(i, request)` adds a sweep's labels.
    Each case an outcome of the bench's verdict. Returns the requests, their Measurements and the batch-relative
    latencies."""
    bench, args = m.bench, m.bench.args
    device, dtype, config = bench.device, bench.dtype, bench.config
    requests = [Request(config, s, p, m.generator, m.text) for s, p in cases]
    prepared = [r.prepare(m.module, m.rotary, device, dtype, args.attn) for r in requests]
    outputs, peaks = first_outputs(m, requests, prepared)
    latencies, batch_relative = time_requests([c for c, _, _ in prepared], device, args.warmups, args.runs,
                                              lambda: [reset() for _, reset, _ in prepared], phase, m.own_streams)
    for i, (r, out, timed, peak) in enumerate(zip(requests, outputs, latencies, peaks)):
        case = f"{phase}{i}_seq{r.seq}_past{r.past}"
        extra = labels(i, r) if labels else {}
        c = judges.judge_tensor(out, r.reference, m.judge, r.peer if m.peer is not None else None, case)
        bench.verdict.add(case, c.passed, f"{case}: {c.reason}")
        flops, moved = flops_and_bytes(config, r.seq, r.past, dtype)
        roof = bench.report(case, timed, r.seq, flops, moved, peak, phase=phase, **extra)
        bench.results.add_comparison(case, c, phase=phase, **extra)
        cold = None
        if m.flush is not None:
            call, reset, _ = prepared[i]
            cold = benchmark(call, device, args.warmups, args.runs, f"{case} cold",
                             setup=lambda reset=reset: (reset(), m.flush()), own_streams=m.own_streams)
            bench.report(case, cold, r.seq, flops, moved, None, phase=phase, cache="cold", **extra)
        bench.cases.setdefault(phase, []).append(
            {"case": case, "seqlen": r.seq, "pastlen": r.past, **timed.summary(), "roofline_ms": roof.ms,
             "roofline_fraction": roof.fraction, "bound": roof.kind, "comparison": c.as_dict(),
             **({"cold": cold.summary()} if cold else {}), **extra})
        print(f"  {case:<26} median {timed.median_ms:8.3f} ms  IQR {timed.iqr_ms:7.3f}  "
              f"{r.seq / timed.median_ms * 1e3:10.1f} tok/s  {flops / timed.median_ms / 1e6:8.2f} GFLOP/s  "
              f"{moved / timed.median_ms / 1e6:7.2f} GB/s  {roof.fraction:6.1%} of {roof.kind} roofline"
              + (f"  cold {cold.median_ms:.3f} ms" if cold else "")
              + f" | max abs {c.max_abs:.2e} cos {c.cosine:.6f} nmse {c.nmse:.2e} {'ok' if c.passed else 'FAIL'}"
              + ("  [spread warning]" if timed.spread_warning else ""))
        if not c.passed:
            print(f"    {c.reason}")
    return requests, latencies, batch_relative


def run_batched(m, requests, case, labels):
    """The decode requests as one left-padded batch, as a serving engine runs them: timed and checked."""
    bench, args = m.bench, m.bench.args
    device, dtype = bench.device, bench.dtype
    call, reset = batched_decode(requests, m.module, m.rotary, device, dtype, args.attn)
    out = call().detach().cpu()  # the first call may compile: not the one measured
    reset()
    peer_out = None
    if m.peer is not None:
        peer_call, peer_reset = batched_decode(requests, m.peer, m.rotary, device, dtype, "eager")
        peer_out = peer_call().detach().cpu()
        peer_reset()
    c = judges.judge_tensor(out, torch.cat([r.reference for r in requests]), m.judge, peer_out, case)
    bench.verdict.add(case, c.passed, f"{case}: {c.reason}")
    device.reset_peak_memory()
    (timed,), _ = time_requests([call], device, args.warmups, args.runs, reset, case, m.own_streams)
    flops, moved = batch_flops_and_bytes(bench.config, [r.past for r in requests], dtype)
    roof = bench.report(case, timed, len(requests), flops, moved, device.peak_memory_bytes(), phase="decode", **labels)
    bench.results.add_comparison(case, c, phase="decode", **labels)
    bench.cases.setdefault("decode_batched", []).append(
        {"case": case, "requests": len(requests), **timed.summary(), "roofline_ms": roof.ms,
         "roofline_fraction": roof.fraction, "bound": roof.kind, "comparison": c.as_dict(), **labels})
    print(f"  {case}: {len(requests)} requests, left-padded to past {max(r.past for r in requests)}: "
          f"median {timed.median_ms:.3f} ms, {len(requests) / timed.median_ms * 1e3:.1f} tok/s, {roof.fraction:.1%} "
          f"of {roof.kind} roofline | max abs {c.max_abs:.2e} nmse {c.nmse:.2e} "
          f"{'ok' if c.passed else 'FAIL: ' + c.reason}")


def sweep(m):
    """--sweep: every point timed and checked like a case, labelled sweep=<family> size=<n>."""
    g, config = torch.Generator().manual_seed(m.bench.args.seed + 1), m.bench.config
    for family, points in sweep_points(config.max_position_embeddings).items():
        print(f"\nsweep {family}: " + ", ".join(f"{s}:{p}" for s, p in points))
        if family == "batch":  # b decode requests of one token at the same past, as one batch
            for b, past in points:
                requests = [Request(config, 1, past, g, m.text) for _ in range(b)]
                for r in requests:
                    r.reference = m.reference_output(r)
                run_batched(m, requests, f"batch{b}_past{past}", {"sweep": "batch", "size": b})
        else:
            run_phase(m, family, points, lambda i, r, family=family: {
                "sweep": family, "size": r.seq if family == "prefill_length" else r.past})


def prefill_phase(m, cases):
    """The prefill cases, with the originals' TTFT line beside the per-request median."""
    args, results = m.bench.args, m.bench.results
    print("\n" + "*" * 130)
    print("Test Qwen3attention ")
    print("*" * 130)
    print(f"Test Case PREFILL_TESTCASES : {{'seqlens': {[s for s, _ in cases]}, 'pastlens': {[p for _, p in cases]}}}")
    _, latencies, batch_relative = run_phase(m, "prefill", cases)
    original_ttft = sum(sum(r) for r in batch_relative) / (args.runs * len(cases))
    per_request = sum(t.median_ms for t in latencies) / len(latencies)
    results.add("prefill", "ttft_per_request_median_ms", per_request, unit="ms")
    results.add("prefill", "ttft_batch_relative_mean_ms", original_ttft, unit="ms")
    print(f"  TTFT per request (median, averaged over requests): {per_request:.3f} ms")
    print(f"  TTFT as the originals measured it (mean time from the batch start to each request's end): "
          f"{original_ttft:.3f} ms")
    print(f"\t WARMUPS={args.warmups} RUNS={args.runs}, Attention Torch, average TTFT: {round(original_ttft, 2)} ms\n")


def decode_phase(m, cases):
    """The decode requests one at a time (tok/s per past and overall, with the originals' formula), then
    with --batched as one padded batch."""
    args, results = m.bench.args, m.bench.results
    print("\n")
    print("-" * 130)
    print(f"\nTest DECODE_TESTCASES: {{'seqlens': {[s for s, _ in cases]}, 'pastlens': {[p for _, p in cases]}}}")
    requests, latencies, _ = run_phase(m, "decode", cases)
    groups = {}
    for r, t in zip(requests, latencies):
        groups.setdefault(r.past, []).append(t.median_ms)
    for past, medians in groups.items():
        tps = len(medians) / (sum(medians) / 1e3)
        results.add(f"decode_past{past}", "tokens_per_s", tps, unit="tok/s", phase="decode")
        print(f"  past {past:>5}: {tps:10.1f} tok/s (bs=1, one token per step, median step latency "
              f"{sum(medians) / len(medians):.3f} ms)")
    overall = len(latencies) / (sum(t.median_ms for t in latencies) / 1e3)
    original_tps = args.runs * len(latencies) / (sum(sum(t.samples_ms) for t in latencies) / 1e3)
    results.add("decode", "tokens_per_s_median", overall, unit="tok/s", phase="decode")
    results.add("decode", "tokens_per_s_original_formula", original_tps, unit="tok/s", phase="decode")
    print(f"  overall: {overall:.1f} tok/s from median step latencies; originals' formula (tokens / total time): "
          f"{original_tps:.1f} tok/s")
    print(f"\t WARMUPS={args.warmups} RUNS={args.runs}, Attention Torch, average throughput: "
          f"{round(original_tps, 2)} tok/s \n")
    if args.batched:
        run_batched(m, requests, "decode_batched", {})


def main(argv=None, doc=None):
    parser = session.bench_parser(doc, "--attn", ["eager", "sdpa"], "sdpa")
    parser.add_argument("--prefill_cases", default=PREFILL_CASES, help=f"seqlen:pastlen,... (default {PREFILL_CASES})")
    parser.add_argument("--decode_cases", default=None, help="1:pastlen,... (default 16 requests, pasts 50x4 ... 400x4)")
    parser.add_argument("--batched", action="store_true", help="also run the decode requests as one padded batch")
    parser.add_argument("--inputs", default="text", choices=["text", "random"],
                        help="hidden states and past K/V (default text)")
    args = parser.parse_args(argv)
    bench = session.Bench.open(args, SCRIPT, args.attn)
    max_pos = bench.config.max_position_embeddings
    prefill = parse_cases(args.prefill_cases, "--prefill_cases", max_pos)
    decode = parse_cases(args.decode_cases or DECODE_CASES, "--decode_cases", max_pos, decode=True)
    # the sweep reaches the whole context, beyond what a float32 reference prefill of real text affords
    text_tokens = max(s + p for s, p in prefill + decode) if args.inputs == "text" and not args.sweep else None
    m = Modules.open(bench, text_tokens)
    if args.sweep:
        sweep(m)
    else:
        prefill_phase(m, prefill)
        decode_phase(m, decode)
    return bench.finish()


