"""A Qwen3-MoE with trained activations, built from the trained Qwen2.5-0.5B (kitcore.real): what is
trained and what is constructed.

No package ships a trained Qwen3-MoE, so the kit builds one, deterministically, from the trained dense
weights and real text (the standard-library docstrings of kitcore.inputs):
  trained, as they are   embeddings, LM head, every RMSNorm, q/k/v/o projections and the q/k/v biases
                         (Qwen3-MoE takes `attention_bias`; o_proj's bias is zero)
  constructed            * q_norm / k_norm (Qwen3 normalises each head of q and k before RoPE; Qwen2 does
                           not, so this cannot be exact): per head-dimension weights fitted by least squares
                           on the trained model's own q and k over the calibration text, so that
                           q / rms(q) * w is as close to q as a per-dimension scale can make it
                         * experts: each dense MLP (4,864 neurons) split into E experts of 4,864 / E
                           consecutive neurons; their down projections scaled by k (experts per token), so
                           that k experts with equal weights add up to the neurons they hold and all E
                           experts together (router weights 1 / E, rescaled) are exactly the dense MLP
                         * the router: a least-squares fit, on the calibration text's hidden states, of
                           each expert's log output norm for that token (the experts that contribute most
                           are routed to), scaled to a small spread (ROUTER_SPREAD) so that the chosen
                           experts' weights are nearly equal; then top-k routing with renormalised weights
                           (norm_topk_prob), as Qwen3-MoE does
The figures of the construction (the q/k norm fit, the split's exactness, the MoE model's agreement with the
dense one on held-out text) are in the checkpoint's kit_metadata.json and printed.
"""

import json
from pathlib import Path

import torch

from .checkpoints import open_checkpoint

EXPERTS, TOP_K = 8, 4
CALIBRATION_TOKENS, HELD_OUT_TOKENS, WINDOW = 2048, 512, 512
RIDGE = 1e-3  # of the hidden states' mean square: keeps the router fit well-posed
# the router logits' spread across experts: small, so that the k chosen experts get nearly equal weights
# and add up to the neurons they hold (measured: a spread of 1 gives top-1 agreement 0.4%, 0.1 gives 7%)
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


def _norm_weight(x, head_dim, eps):
    """The per-dimension RMSNorm weight w minimising |x - x / rms(x) * w|^2 over tokens and heads."""
    heads = x.reshape(-1, head_dim).double()
    normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps)
    w = (heads * normed).sum(0) / normed.pow(2).sum(0)
    residual = float((heads - normed * w).pow(2).sum() / heads.pow(2).sum())
    return w.float(), residual


def _expert_outputs(x, gate, up, down, experts):
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
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": True,
        "attention_dropout": 0.0, "bos_token_id": c.get("bos_token_id"), "eos_token_id": c.get("eos_token_id"),
        "pad_token_id": c.get("pad_token_id"), "decoder_sparse_step": 1, "mlp_only_layers": [], "dtype": "float32",
        "head_dim": c["head_dim"], "hidden_act": "silu", "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"], "moe_intermediate_size": c["intermediate_size"] // experts,
        "max_position_embeddings": c["max_position_embeddings"], "norm_topk_prob": True, "num_experts": experts,
        "num_experts_per_tok": top_k, "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"], "num_key_value_heads": c["num_key_value_heads"],
        "output_router_logits": False, "rms_norm_eps": c["rms_norm_eps"], "rope_theta": c["rope_theta"],
        "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "use_sliding_window": False, "vocab_size": c["vocab_size"]}


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
    tensors = source.load_tensors(list(source.tensors))
    state, figures = {}, {"q_norm_residual": [], "k_norm_residual": [], "split_max_rel": []}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        state[name] = tensors[name]
    hd, eps = c["head_dim"], c["rms_norm_eps"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            state[p + name] = tensors[p + name]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for kind in ("weight", "bias"):
                state[f"{p}self_attn.{proj}.{kind}"] = tensors[f"{p}self_attn.{proj}.{kind}"]
        for which in ("q", "k"):
            w, residual = _norm_weight(captured[which][i], hd, eps)
            state[f"{p}self_attn.{which}_norm.weight"] = w
            figures[f"{which}_norm_residual"].append(residual)
        gate, up, down = (tensors[f"{p}mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        x = captured["mlp_in"][i]
        contributions = _expert_outputs(x, gate, up, down, experts)
        dense_out = dense.model.layers[i].mlp(x)
        figures["split_max_rel"].append(float((contributions.sum(0) - dense_out).abs().max() / dense_out.abs().max()))
        n = gate.shape[0] // experts
        for e in range(experts):
            rows = slice(e * n, (e + 1) * n)
            state[f"{p}mlp.experts.{e}.gate_proj.weight"] = gate[rows].contiguous()
            state[f"{p}mlp.experts.{e}.up_proj.weight"] = up[rows].contiguous()
            state[f"{p}mlp.experts.{e}.down_proj.weight"] = (down[:, rows] * top_k).contiguous()
        state[f"{p}mlp.gate.weight"] = _router(x, contributions)
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
    summary = {
        "q_norm_residual_max": max(figures["q_norm_residual"]), "k_norm_residual_max": max(figures["k_norm_residual"]),
        "split_max_rel_max": max(figures["split_max_rel"]), **agreement}
    return {"experts": experts, "top_k": top_k, "calibration_tokens": len(calibration), "summary": summary,
            "per_layer": figures}


def describe(summary):
    return (f"q/k norm fit: relative residual at most {summary['q_norm_residual_max']:.3f} (q), "
            f"{summary['k_norm_residual_max']:.3f} (k); the expert split reproduces the dense MLPs to "
            f"{summary['split_max_rel_max']:.1e} (max rel); the MoE's next token agrees with the dense model's on "
            f"{summary['top1_agreement']:.1%} of {summary['held_out_tokens']} held-out tokens (mean KL "
            f"{summary['kl_mean']:.3f} nats)")

