"""One Qwen3-MoE layer's attention or sparse MoE block, loaded strictly, and the module engines.

Module engine protocol (`--engine` of attention_test.py and moe_test.py; documented here only):
    build_attention(config, weights, device, dtype, attn) -> module
        module(hidden_states [B, S, H], (cos, sin), attention_mask, cache) -> [B, S, H] or (out, ...)
        cos/sin come from HF's rotary embedding; attention_mask is [B, 1, S, past + S], bool (True =
        attend) for sdpa-style attention and additive float for `eager`; cache is a transformers
        DynamicCache holding the past K/V of layer 0, which the module appends to.
    build_moe(config, weights, device, dtype, experts) -> module
        module(hidden_states [B, S, H]) -> [B, S, H] or (out, router_logits); an optional `.gate` router,
        gate(x [T, H]) -> logits [T, E] or a tuple starting with them (HF 5.x: logits, weights, indices),
        enables the router check.
    `config` is the checkpoint's transformers config (num_hidden_layers forced to 1: the module is
    layer 0 of a one-layer model); `weights` are the layer's tensors as on disk, prefix stripped
    (`q_proj.weight`, `experts.3.gate_proj.weight` ...). The built-in `hf` engine is `HFModules`;
    plugins subclass it (see test/kit/faulty_engines.py). A module that launches its work on streams
    of its own sets `own_streams = True`: the timer then synchronises the whole device around each call
    instead of recording events on the current stream, which would miss that work.
"""

import copy

import torch

from . import roofline
from .engines import causal_mask, resolve_class
from .errors import UsageError


def load_config(checkpoint, layer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint.path), trust_remote_code=False)
    layers = config.num_hidden_layers
    if not 0 <= layer < layers:
        raise UsageError(f"--layer {layer}: the model has {layers} layers (0..{layers - 1})")
    config.num_hidden_layers = 1
    return config


def layer_weights(checkpoint, layer, part):
    """The tensors of `model.layers.<layer>.<part>.` from every shard, prefix stripped."""
    prefix = f"model.layers.{layer}.{part}."
    names = [n for n in checkpoint.tensors if n.startswith(prefix)]
    if not names:
        raise UsageError(f"{checkpoint.path}: no weights under {prefix}; is --layer right?")
    return {n[len(prefix):]: t for n, t in checkpoint.load_tensors(names).items()}


def moe_weights(checkpoint, layer):
    weights = layer_weights(checkpoint, layer, "mlp")
    if "gate.weight" not in weights:
        raise UsageError(f"{checkpoint.path}: layer {layer} has no sparse MoE block (a dense MLP layer: "
                         "mlp_only_layers or decoder_sparse_step); choose another --layer")
    return weights


def _fuse_experts(weights, num_experts):
    """Per-expert tensors (as on disk) -> transformers 5.x fused layout: gate_up_proj [E, 2I, H] (gate
    first, then up) and down_proj [E, H, I]."""
    fused = {k: v for k, v in weights.items() if not k.startswith("experts.")}
    gate_up, down = [], []
    for e in range(num_experts):
        try:
            gate_up.append(torch.cat([weights[f"experts.{e}.gate_proj.weight"], weights[f"experts.{e}.up_proj.weight"]]))
            down.append(weights[f"experts.{e}.down_proj.weight"])
        except KeyError as exc:
            raise UsageError(f"checkpoint lacks weight mlp.{exc.args[0]} of expert {e}") from None
    known = {f"experts.{e}.{p}.weight" for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    extra = sorted(k for k in weights if k.startswith("experts.") and k not in known)
    if extra:
        raise UsageError(f"checkpoint has unexpected weight mlp.{extra[0]} (the config has {num_experts} experts)")
    fused["experts.gate_up_proj"] = torch.stack(gate_up)
    fused["experts.down_proj"] = torch.stack(down)
    return fused


def load_strict(module, weights, what, prefix):
    """load_state_dict(strict=True), with the first missing or unexpected weight (`prefix` + name) named."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    if missing:
        raise UsageError(f"{what}: checkpoint lacks weight {prefix}{missing[0]}"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise UsageError(f"{what}: checkpoint has unexpected weight {prefix}{unexpected[0]}"
                         + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in weights.items():
        if tuple(v.shape) != tuple(module.state_dict()[k].shape):
            raise UsageError(f"{what}: weight {prefix}{k} has shape {list(v.shape)}, the config expects "
                             f"{list(module.state_dict()[k].shape)}")
    module.load_state_dict(weights, strict=True)
    return module


class HFModules:
    """HuggingFace Transformers' Qwen3MoeAttention and Qwen3MoeSparseMoeBlock."""

    name = "hf"

    def build_attention(self, config, weights, device, dtype, attn):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

        config = copy.deepcopy(config)  # each module keeps its own implementation choice
        config._attn_implementation = attn
        module = Qwen3MoeAttention(config, layer_idx=0)
        return load_strict(module, weights, "attention", "self_attn.").to(device.torch_device, dtype).eval()

    def build_moe(self, config, weights, device, dtype, experts):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = copy.deepcopy(config)
        config._experts_implementation = experts
        module = Qwen3MoeSparseMoeBlock(config)
        if "experts.gate_up_proj" in module.state_dict():  # transformers 5.x keeps experts fused
            weights = _fuse_experts(weights, config.num_experts)
        elif experts != "eager":  # 4.57 has only its loop over experts: never label it as another one
            import transformers

            raise UsageError(f"--experts {experts}: transformers {transformers.__version__} has only the eager "
                             "experts loop; use --experts eager (or transformers >= 5)")
        return load_strict(module, weights, "MoE block", "mlp.").to(device.torch_device, dtype).eval()


class CompiledModules(HFModules):
    """The HF modules through torch.compile (dynamic shapes)."""

    name = "compile"

    def build_attention(self, config, weights, device, dtype, attn):
        return _compiled(super().build_attention(config, weights, device, dtype, attn))

    def build_moe(self, config, weights, device, dtype, experts):
        return _compiled(super().build_moe(config, weights, device, dtype, experts))


def _compiled(module):
    return torch.compile(module, dynamic=True)  # attributes such as .gate still reach the module


BUILTIN_MODULES = {"hf": HFModules, "compile": CompiledModules}


def module_engine(spec, required):
    return resolve_class(spec, BUILTIN_MODULES, required, "tools/kitcore/qwen3_moe.py")()


def attention_mask(batch_valid, q_len, dtype, attn, device):
    """[B, 1, q, kv] mask: causal with the past offset, and `batch_valid` [B, kv] (False = left padding)."""
    kv_len = batch_valid.shape[1]
    allowed = causal_mask(q_len, kv_len, dtype, additive=False, device=device) & batch_valid[:, None, None, :].to(device)
    if attn != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def moe_with_experts(weights, config, x, expert_sets):
    """The sparse MoE block in float64 on the CPU, with each token's experts given: x [T, H], expert_sets
    [T, k]. Router weights are the softmax over every expert's logit, taken at the given set and
    renormalised over it when config.norm_topk_prob (as Qwen3-MoE does). Used to recompute the
    reference for a near-tie token under each expert set the rounding may legitimately choose."""
    x = x.to(torch.float64)
    w = {k: v.to(torch.float64) for k, v in weights.items()}
    probs = (x @ w["gate.weight"].T).softmax(-1)
    chosen = probs.gather(-1, expert_sets)
    if getattr(config, "norm_topk_prob", True):
        chosen = chosen / chosen.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for slot in range(expert_sets.shape[1]):
        for e in expert_sets[:, slot].unique().tolist():
            rows = expert_sets[:, slot] == e
            h = x[rows]
            gate, up = h @ w[f"experts.{e}.gate_proj.weight"].T, h @ w[f"experts.{e}.up_proj.weight"].T
            act = torch.nn.functional.silu(gate) * up
            out[rows] += chosen[rows, slot:slot + 1] * (act @ w[f"experts.{e}.down_proj.weight"].T)
    return out


def admissible_sets(ref_logits, top_k, margin, max_boundary=6):
    """For each token, the expert sets a correct engine may choose: experts whose router logit lies
    within 2 x margin of the k-th/(k+1)-th boundary may swap places. Returns a list (one per token) of
    [n_sets, k] tensors, the reference's own set first; decisive tokens have one set."""
    import itertools

    order = ref_logits.sort(-1, descending=True)
    out = []
    for t in range(ref_logits.shape[0]):
        values, experts = order.values[t], order.indices[t]
        low, high = values[top_k] - 2 * margin[t], values[top_k - 1] + 2 * margin[t]
        sure = experts[values > high].tolist()
        boundary = [e for v, e in zip(values.tolist(), experts.tolist()) if low <= v <= high][:max_boundary]
        ref_set = sorted(experts[:top_k].tolist())
        sets = [ref_set]
        near_tie = values[top_k - 1] - values[top_k] <= 2 * margin[t]
        if near_tie and len(sure) < top_k <= len(sure) + len(boundary):
            for extra in itertools.combinations(boundary, top_k - len(sure)):
                candidate = sorted(sure + list(extra))
                if candidate != ref_set:
                    sets.append(candidate)
        out.append(torch.tensor(sets, dtype=torch.long))
    return out


def check_moe_block(out, ref_out, x, weights, config, ref_logits, judge, peer_out=None, peer_logits=None,
                    cand_logits=None):
    """The sparse MoE block's verdict on every token, against the float32 reference.

    A token is a near-tie when the reference's k-th/(k+1)-th router-logit gap is within twice what a
    correct engine's router error may be there (k x the peer's error + one rounding; without a peer, the
    table's): rounding may then route it to another set, so its output must match the reference
    recomputed with one of its admissible expert sets (moe_with_experts). Every other token must match
    the reference itself. The output is judged by `judge` (calibrated by the peer's output, near-ties
    resolved the same way for the peer); with a candidate router (`cand_logits`), its logits too, and
    its expert set must be the reference's on every decisive token and an admissible one on every other.
    Near-ties come from the reference and the peer only, so their share is bounded by the peer's error.
    """
    from .compare import OWN_TOLERANCES, TOLERANCES, compare
    from .judges import DECISIVE_SIGMAS, PEER_K_MAX, calibrate, rounding_floor

    top_k = config.num_experts_per_tok
    tokens = ref_logits.shape[0]
    f = rounding_floor(judge.dtype)
    table = TOLERANCES[judge.dtype]
    calibrated = judge.calibrated and peer_out is not None
    # the router-logit error a correct engine may have on a token: the peer's largest there (calibrated), or
    # DECISIVE_SIGMAS x the RMS error the own-error table allows (the router is one component), plus the floor
    if calibrated:
        margin = PEER_K_MAX * (peer_logits - ref_logits).abs().max(-1).values
    else:
        margin = DECISIVE_SIGMAS * OWN_TOLERANCES[judge.dtype].nmse**0.5 * ref_logits.pow(2).mean(-1).sqrt()
    margin = margin + 2 * f * ref_logits.abs().max(-1).values
    sets = admissible_sets(ref_logits, top_k, margin)
    near = [t for t, s in enumerate(sets) if len(s) > 1]
    ref2d = ref_out.reshape(tokens, -1).double()
    alternatives = {}  # token -> [n_sets, H] reference outputs, the reference's own set first
    if near:
        flat_tokens = torch.tensor([t for t in near for _ in sets[t][1:]])
        flat_sets = torch.cat([sets[t][1:] for t in near])
        recomputed = moe_with_experts(weights, config, x.reshape(tokens, -1)[flat_tokens], flat_sets)
        at = 0
        for t in near:
            n = len(sets[t]) - 1
            alternatives[t] = torch.cat([ref2d[t:t + 1], recomputed[at:at + n]])
            at += n

    def resolve(output):
        """The reference with each near-tie row replaced by its admissible output closest to `output`."""
        out2d = output.reshape(tokens, -1).double()
        adjusted, rerouted = ref2d.clone(), 0
        for t, options in alternatives.items():
            best = int((options - out2d[t]).pow(2).sum(-1).argmin())
            adjusted[t] = options[best]
            rerouted += best != 0
        return out2d, adjusted, rerouted

    cand2d, cand_ref, cand_rerouted = resolve(out)
    output = compare(cand2d, cand_ref, table, "output")
    result = {"near_ties": len(near), "rerouted": cand_rerouted, "peer_rerouted": None, "output": output,
              "router_logits": None, "set_mismatches": None, "match_all": None}
    if calibrated:
        peer2d, peer_ref, result["peer_rerouted"] = resolve(peer_out)
        calibrate(output, compare(peer2d, peer_ref, table, "output"), judge.dtype, judge.k)
    passed = output.passed
    if cand_logits is not None:
        logits = compare(cand_logits, ref_logits, table, "router logits")
        if calibrated:
            calibrate(logits, compare(peer_logits, ref_logits, table, "router logits"), judge.dtype, judge.k)
        chosen = cand_logits.topk(top_k, -1).indices.sort(-1).values
        admissible = [bool((options == chosen[t]).all(-1).any()) for t, options in enumerate(sets)]
        reference_sets = torch.stack([options[0] for options in sets])
        result.update(router_logits=logits, set_mismatches=admissible.count(False),
                      match_all=float((chosen == reference_sets).all(-1).double().mean()))
        passed &= logits.passed and result["set_mismatches"] == 0
    result["passed"] = passed
    return result


def first_output(out):
    """Modules return a tensor, or a tuple whose first element is the output (4.57 MoE, attention)."""
    return out[0] if isinstance(out, tuple) else out


def bench_parser(doc, impl_flag, impl_choices, impl_default):
    """The flags both Qwen3-MoE benchmarks share."""
    from . import cli, devices

    p = cli.ArgumentParser(description=doc)
    p.add_argument("--model_path", help="Qwen3-MoE checkpoint directory (default: the kit's embedded tiny one)")
    devices.add_device_args(p)
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16 (default bfloat16)")
    p.add_argument("--layer", type=int, default=0, help="which layer's weights to benchmark (default 0)")
    p.add_argument("--warmups", type=int, default=10, help="untimed calls before timing (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed calls (default 100)")
    p.add_argument("--engine", default="hf", help="hf | compile | package.module:Class | file.py:Class")
    p.add_argument(impl_flag, default=impl_default, choices=impl_choices,
                   help=f"transformers implementation (default {impl_default})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); recorded")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH (atomically)")
    p.add_argument("--peer", default="hf", choices=["hf", "none"],
                   help="hf (default): verdicts calibrated by HF's eager block in --dtype on the device; none: table")
    p.add_argument("--cold", action="store_true",
                   help="also time every case cold: the caches evicted before each timed call (a write of twice "
                        "the last-level cache, untimed), reported beside the warm figures")
    p.add_argument("--sweep", action="store_true", help="run the script's shape sweep instead of its cases")
    p.epilog = (ROOFLINE_HELP + "\n\n" + (p.epilog or "")).strip()
    return p


ROOFLINE_HELP = """Distance to the limit (kitcore/roofline.py): every row adds roofline_ms = max(bytes / bandwidth,
FLOPs / matmul throughput), with the device's ceilings measured once and cached (tools/device_ceilings.py),
bound=memory|compute (which term is larger) and roofline_fraction = roofline_ms / median."""


def build_peer(args, impl, build_eager, device, what):
    """The correct peer of a Qwen3-MoE benchmark: HF's block with its eager implementation, in the
    candidate dtype on the device (`build_eager()` builds it), or None where there is none: --peer none,
    or the hf engine with `impl` "eager", which is that peer itself. Says which on one line."""
    from .judges import PEER_K

    if args.peer == "none" or (args.engine == "hf" and impl == "eager"):
        print("  peer: " + ("none (--peer none)" if args.peer == "none" else "the candidate is HF's block itself")
              + ": verdicts from the static table")
        return None
    print(f"  peer: HF's block ({what}) in {args.dtype} on {device}: verdicts calibrated by its error (k={PEER_K:g})")
    return build_eager()


def bench_setup(args, script, impl):
    """Device, dtype, checkpoint, config and Results of a Qwen3-MoE benchmark."""
    from . import checkpoints, devices
    from .engines import quiet_transformers
    from .results import Results, environment
    from .timing import check_counts

    check_counts(args.warmups, args.runs)
    quiet_transformers()
    devices.set_threads(args.threads)
    device = devices.resolve_device(args)
    dtype = devices.parse_dtype(args.dtype)
    device.check_dtype(dtype)
    torch.manual_seed(args.seed)
    checkpoint = checkpoints.resolve_checkpoint(args.model_path, "qwen3_moe")
    config = load_config(checkpoint, args.layer)
    results = Results(script, labels={"device": str(device), "dtype": args.dtype, "engine": args.engine,
                                      "impl": impl, "layer": args.layer})
    results.env = environment(device, dtype, args.seed, checkpoint)
    env = results.env
    print(f"{script}: engine={args.engine} impl={impl} device={env['device_name']} dtype={args.dtype} "
          f"layer={args.layer} seed={args.seed} threads={env['threads']}")
    print(f"  checkpoint {checkpoint.path} (hash {env['checkpoint_hash']}); torch {env['torch']}, "
          f"transformers {env['transformers']}; reference: the same module in float32 on the CPU")
    ceilings = roofline.ceilings_for(device, [args.dtype])
    print(f"  {ceilings.describe(args.dtype)}")
    env["ceilings"] = {"bandwidth_bytes_per_s": ceilings.bandwidth_bytes_per_s,
                       "flops_per_s": ceilings.flops_per_s[args.dtype], **ceilings.measured}
    return device, dtype, checkpoint, config, results, ceilings


def report_measurement(results, case, m, tokens, flops, bytes_moved, peak_bytes, ceilings, **labels):
    """A Measurement as metric lines: latency statistics, tok/s, GFLOP/s, GB/s, peak memory, and its
    distance to the device's limit (kitcore.roofline). Returns the roofline Bound."""
    for key, value in m.summary().items():
        unit = "ms" if key.endswith("_ms") else ("bool" if key == "spread_warning" else "count")
        results.add(case, key, value, unit=unit, **labels)
    seconds = m.median_ms / 1e3
    results.add(case, "tokens_per_s", tokens / seconds, unit="tok/s", **labels)
    results.add(case, "gflops", flops / seconds / 1e9, unit="GFLOP/s", **labels)
    results.add(case, "gbytes_per_s", bytes_moved / seconds / 1e9, unit="GB/s", **labels)
    if peak_bytes is not None:
        results.add(case, "peak_memory", peak_bytes, unit="bytes", **labels)
    roof = roofline.bound(flops, bytes_moved, ceilings, results.labels["dtype"], m.median_ms)
    results.add(case, "roofline_ms", roof.ms, unit="ms", bound=roof.kind, **labels)
    results.add(case, "roofline_fraction", roof.fraction, unit="fraction", bound=roof.kind, **labels)
    return roof


def bench_finish(results, device, cases, passed, json_path):
    """The correctness verdict line, the device's cache released, the JSON written; the exit code."""
    results.extra["cases"] = cases
    print(f"\ncorrectness verdict: {'PASS' if passed else 'FAIL'}")
    device.empty_cache()
    return results.finish(passed, json_path)
