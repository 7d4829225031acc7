"""A Qwen3-MoE with trained activations, built from the trained Qwen2.5-0.5B (kitcore.real): what is
trained and what is constructed.

No package ships a trained Qwen3-MoE, so the kit builds one, deterministically, from the trained dense
weights and real text (the standard-library docstrings of kitcore.inputs). It computes the trained model's
function except where the MoE routes, so it carries the trained model's activations (the residual stream's
massive elements, ~1,500 x 16 here) and its sensitivity to rounding:
  trained, as they are   embeddings, LM head, every RMSNorm, q/k/v/o projections and the q/k/v biases
                         (Qwen3-MoE takes `attention_bias`; o_proj's bias is zero), every dense MLP
  rescaled, exactly      * the residual stream x RESIDUAL_SCALE (16: embeddings, o_proj and down projections)
                           and rms_norm_eps x 16^2: every RMSNorm of the trained model computes what it did
                           (powers of two: exact in every dtype); a larger eps is what lets q_norm/k_norm run
                           in their linear regime in float16 (below)
  constructed            * q_norm / k_norm. Qwen3 normalises each head of q and k before RoPE; Qwen2 does not,
                           and a normalising q/k norm cannot reproduce it (fitted by least squares it moved the
                           next-token distribution by 4 nats). Instead q and k are scaled down (s, in q_proj /
                           k_proj and the input norm) until a head's mean square is at most LINEARITY x eps on
                           every calibration token: the norm then multiplies by a near-constant, its weight a
                           power of two (exact in bfloat16/float16) that undoes s. How close: the largest
                           per-token deviation from linear is printed (at most 2.5% by construction)
                         * sparse layers SPARSE_LAYERS (0, 6, 12, 18), E experts each; the other layers keep
                           their dense MLP (mlp_only_layers). Expert e is the whole trained MLP with its e-th
                           slice of 4,864 / E neurons weighted 1 + EMPHASIS (the rest 1 - EMPHASIS / E): all E
                           with equal weights are the dense MLP exactly; k of them add EMPHASIS x their slices.
                           Routing among disjoint slices (the first construction) made the model chaotic: a
                           near-tie that flips in reduced precision swapped an eighth of an MLP (bf16 vs fp32
                           KL 2.2 nats); here a flip moves EMPHASIS / k of a slice (bf16 vs fp32 KL mean 6.7e-4,
                           the dense model's 4.3e-4; tools/measurements.md)
                         * the router: a least-squares fit, on the calibration text's hidden states, of each
                           slice's log output norm for that token (the slices that contribute most are routed
                           to), scaled to a small spread (ROUTER_SPREAD) so that the chosen experts' weights are
                           nearly equal; top-k routing with renormalised weights (norm_topk_prob), as Qwen3-MoE
The figures of the construction (linearity, the MoE model's agreement with the dense one on held-out text) are
in the checkpoint's kit_metadata.json and printed.
"""

import json
import math
from pathlib import Path

import torch

from .checkpoints import open_checkpoint

EXPERTS, TOP_K = 8, 4
SPARSE_LAYERS = (0, 6, 12, 18)  # layer 0: the benchmarks' default; 12: the middle, where --controls plants its MoE bugs
EMPHASIS = 1.0
RESIDUAL_SCALE = 16  # x the residual stream's largest element here (1,493) stays 2.7x below float16's maximum
LINEARITY = 0.05  # a head's mean square, at most this x eps: q_norm / k_norm deviate from linear by <= 2.5%
CALIBRATION_TOKENS, HELD_OUT_TOKENS, WINDOW = 2048, 512, 512
RIDGE = 1e-3  # of the hidden states' mean square: keeps the router fit well-posed
# the router logits' spread across experts: small, so that the k chosen experts get nearly equal weights
ROUTER_SPREAD = 0.1


def _dense_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True).eval()


@torch.no_grad()
def _capture(model, ids):
    """Per layer: q and k projections [T, heads * head_dim] and the MLP inputs [T, H] on `ids`, run in windows."""
    layers = model.model.layers
    got = {n: [[] for _ in layers] for n in ("q", "k", "mlp_in")}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: got["q"][i].append(o[0])))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: got["k"][i].append(o[0])))
        hooks.append(layer.mlp.register_forward_pre_hook(lambda m, a, i=i: got["mlp_in"][i].append(a[0][0])))
    for start in range(0, len(ids), WINDOW):
        model(input_ids=torch.tensor([ids[start:start + WINDOW]]))
    for h in hooks:
        h.remove()
    return {n: [torch.cat(chunks) for chunks in per_layer] for n, per_layer in got.items()}


def _linear_norm(x, head_dim, eps):
    """The scale s of q (or k) and the norm weight 2^j such that RMSNorm(s q) * 2^j ~ q: every head's mean
    square of s q at most LINEARITY x eps, s 2^j = sqrt(s^2 mean + eps) on average. Returns s, 2^j and the
    largest deviation from linear over the tokens and heads of x."""
    m = x.reshape(-1, head_dim).double().pow(2).mean(-1)  # per token and head
    mean, top = float(m.mean()), float(m.max())
    j = math.ceil(math.log(top / LINEARITY + mean, 4))
    s = math.sqrt(eps / (4.0**j - mean))
    gain = s * 2.0**j / torch.sqrt(s * s * m + eps)  # what the norm multiplies q by, per token and head
    return s, 2.0**j, float((gain - 1).abs().max())


def _slice_outputs(x, gate, up, down, experts):
    """[E, T, H]: each slice of neurons' contribution to the dense MLP's output on x [T, H]."""
    n = gate.shape[0] // experts
    act = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    return torch.stack([act[:, e * n:(e + 1) * n] @ down[:, e * n:(e + 1) * n].T for e in range(experts)])


def _router(x, contributions):
    """[E, H] router rows fitted by ridge least squares: x @ W.T ~ log |contribution| (centred per token),
    standardised to a spread of ROUTER_SPREAD across experts."""
    target = contributions.norm(dim=-1).clamp_min(1e-12).log().T.double()  # [T, E]
    target = target - target.mean(-1, keepdim=True)
    xd = x.double()
    gram = xd.T @ xd
    gram += RIDGE * float(xd.pow(2).mean()) * len(xd) * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xd.T @ target).T  # [E, H]
    spread = float((xd @ w.T).std(-1).mean())
    return (w * (ROUTER_SPREAD / spread)).float()


def _config(source, experts, top_k):
    c = source.config
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": bool(c.get("attention_bias")),
        "attention_dropout": 0.0, "bos_token_id": c.get("bos_token_id"), "eos_token_id": c.get("eos_token_id"),
        "pad_token_id": c.get("pad_token_id"), "decoder_sparse_step": 1, "dtype": "float32",
        "mlp_only_layers": [i for i in range(c["num_hidden_layers"]) if i not in SPARSE_LAYERS],
        "head_dim": c["head_dim"], "hidden_act": "silu", "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"], "moe_intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c["max_position_embeddings"], "norm_topk_prob": True, "num_experts": experts,
        "num_experts_per_tok": top_k, "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"], "num_key_value_heads": c["num_key_value_heads"],
        "output_router_logits": False, "rms_norm_eps": c["rms_norm_eps"] * RESIDUAL_SCALE**2,
        "rope_theta": c["rope_theta"], "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False, "vocab_size": c["vocab_size"]}


@torch.no_grad()
def _agreement(dense, moe_path, ids):
    """Top-1 agreement and mean KL(dense || MoE) of the next-token distributions on held-out `ids`."""
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(str(moe_path), dtype=torch.float32, use_safetensors=True).eval()
    x = torch.tensor([ids])
    p, q = dense(input_ids=x).logits[0].log_softmax(-1), moe(input_ids=x).logits[0].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    return {"top1_agreement": float((p.argmax(-1) == q.argmax(-1)).double().mean()), "kl_mean": float(kl.mean()),
            "held_out_tokens": len(ids)}


@torch.no_grad()
def build(source_path, out, log=print, experts=EXPERTS, top_k=TOP_K):
    """Write the MoE checkpoint into `out` (an empty directory); returns its construction figures."""
    from safetensors.torch import save_file

    from . import inputs
    from .engines import quiet_transformers

    quiet_transformers()

    source = open_checkpoint(source_path, "llama")
    c = source.config
    if c["intermediate_size"] % experts:
        raise ValueError(f"intermediate_size {c['intermediate_size']} does not split into {experts} experts")
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    ids = inputs.text_stream(inputs.tokenizer(source.path), CALIBRATION_TOKENS + HELD_OUT_TOKENS)
    calibration, held_out = ids[:CALIBRATION_TOKENS], ids[CALIBRATION_TOKENS:]
    log(f"running the dense model on {len(calibration)} calibration tokens...")
    dense = _dense_model(source.path)
    captured = _capture(dense, calibration)
    t = source.load_tensors(list(source.tensors))
    a, hd, eps = float(RESIDUAL_SCALE), c["head_dim"], c["rms_norm_eps"] * RESIDUAL_SCALE**2
    state = {"model.embed_tokens.weight": t["model.embed_tokens.weight"] * a,
             "model.norm.weight": t["model.norm.weight"], "lm_head.weight": t["lm_head.weight"]}
    figures = {"q_norm_deviation": [], "k_norm_deviation": []}
    n = c["intermediate_size"] // experts
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        scale = {}
        for which in ("q", "k"):
            s, weight, deviation = _linear_norm(captured[which][i], hd, eps)
            scale[which] = s
            state[f"{p}self_attn.{which}_norm.weight"] = torch.full((hd,), weight)
            figures[f"{which}_norm_deviation"].append(deviation)
        # the scale is shared between the projections' input and their weights, so that neither the
        # weights nor the input norm's output fall into float16's subnormals
        s_in = (scale["q"] * scale["k"]) ** 0.25
        state[p + "input_layernorm.weight"] = t[p + "input_layernorm.weight"] * s_in
        state[p + "post_attention_layernorm.weight"] = t[p + "post_attention_layernorm.weight"]
        factors = {"q_proj": (scale["q"] / s_in, scale["q"]), "k_proj": (scale["k"] / s_in, scale["k"]),
                   "v_proj": (1 / s_in, 1.0), "o_proj": (a, a)}  # (weight, bias)
        for proj, (weight, bias) in factors.items():
            state[f"{p}self_attn.{proj}.weight"] = t[f"{p}self_attn.{proj}.weight"] * weight
            if c.get("attention_bias"):
                state[f"{p}self_attn.{proj}.bias"] = t[f"{p}self_attn.{proj}.bias"] * bias
        gate, up, down = (t[f"{p}mlp.{w}.weight"] for w in ("gate_proj", "up_proj", "down_proj"))
        if i not in SPARSE_LAYERS:
            state.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                          p + "mlp.down_proj.weight": down * a})
            continue
        for e in range(experts):
            weight = torch.full((gate.shape[0],), a * (1 - EMPHASIS / experts))
            weight[e * n:(e + 1) * n] += a * EMPHASIS
            state[f"{p}mlp.experts.{e}.gate_proj.weight"] = gate.clone()  # safetensors stores no shared tensors
            state[f"{p}mlp.experts.{e}.up_proj.weight"] = up.clone()
            state[f"{p}mlp.experts.{e}.down_proj.weight"] = down * weight
        x = captured["mlp_in"][i]
        state[f"{p}mlp.gate.weight"] = _router(x, _slice_outputs(x, gate, up, down, experts))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_config(source, experts, top_k), indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (source.path / name).is_file():
            (out / name).write_bytes((source.path / name).read_bytes())
    log(f"checking the MoE against the dense model on {len(held_out)} held-out tokens...")
    agreement = _agreement(dense, out, held_out)
    torch.set_num_threads(threads)
    summary = {"q_norm_deviation_max": max(figures["q_norm_deviation"]),
               "k_norm_deviation_max": max(figures["k_norm_deviation"]), **agreement}
    return {"experts": experts, "top_k": top_k, "sparse_layers": list(SPARSE_LAYERS), "emphasis": EMPHASIS,
            "residual_scale": RESIDUAL_SCALE, "calibration_tokens": len(calibration), "summary": summary,
            "per_layer": figures}


def describe(summary):
    return (f"q/k norms deviate from linear by at most {summary['q_norm_deviation_max']:.1%} (q), "
            f"{summary['k_norm_deviation_max']:.1%} (k) on the calibration text; the MoE's next token agrees with "
            f"the dense model's on {summary['top1_agreement']:.1%} of {summary['held_out_tokens']} held-out tokens "
            f"(mean KL {summary['kl_mean']:.4f} nats)")
