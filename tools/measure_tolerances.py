#!/usr/bin/env python3
"""Measure the error of correct engines: the basis of kitcore.compare's tables and of kitcore.judges.PEER_K.

For each checkpoint (the default tiny Llamas of --seeds, and --model_path ones, e.g. the real SmolLM2
from tools/real_checkpoint.py), each dtype, each correct engine (hf eager, hf sdpa; compile for the
logits), and prompts of several lengths (up to --max_tokens), against the float32 reference:

* table: at every capture point (total error) and for the dual test (own error, one component on the
  reference's input), the atol_rms and nmse a table would need:
      atol_rms needed = max over elements of (|cand - ref| - rtol * |ref|) / rms(ref)
* k: each engine against a correct peer of another implementation on the same inputs (hf eager vs hf
  sdpa, hf sdpa vs hf eager, compile vs hf sdpa), the k that the calibrated bounds of kitcore.judges
  would need: (rmse_cand - f * rms_ref) / rmse_peer, (max_cand - 2f * max|ref|) / max_peer, per tensor
  and per logits position (f: the rounding floor); and, where a correct engine's top-1 flips, how many
  allowed RMS errors the reference's top-1/top-2 gap spans there (decisiveness must stay above it).

    python tools/measure_tolerances.py [--seeds 0,1,2] [--model_path DIR ...] [--real] [--max_tokens 512]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import checkpoints, cli, devices  # noqa: E402
from kitcore.compare import LOGITS_NMSE, OWN_TOLERANCES, TOLERANCES  # noqa: E402
from kitcore.devices import Device  # noqa: E402
from kitcore.engines import CompileEngine, HFEngine  # noqa: E402
from kitcore.judges import DECISIVE_SIGMAS, PEER_K, PEER_K_ELEMENT, PEER_K_MAX, rounding_floor  # noqa: E402
from kitcore.points import component_inputs, point_order  # noqa: E402
from kitcore.tiny import DEFAULT_PROMPT, stdlib_docstrings  # noqa: E402


def prompts(encode, max_tokens):
    """The default prompt, ~128 tokens and max_tokens tokens of stdlib docstrings."""
    text = ""
    docs = iter(stdlib_docstrings())
    long_ids = []
    while len(long_ids) < max_tokens:
        text += next(docs) + "\n\n"
        long_ids = encode(text)
    out = [encode(DEFAULT_PROMPT), long_ids[:min(128, max_tokens)], long_ids[:max_tokens]]
    return [torch.tensor([ids]) for ids in out]


def table_need(cand, ref, rtol):
    c, r = cand.double(), ref.double()
    rms = float(r.pow(2).mean().sqrt())
    atol = float(((c - r).abs() - rtol * r.abs()).max()) / max(rms, 1e-30)
    nmse = float((c - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-300))
    return atol, nmse


def k_need(cand, peer, ref, u):
    """(k for the RMS error, k for the largest error) that the calibrated bound needs here."""
    c, p, r = cand.double(), peer.double(), ref.double()
    rms, big = float(r.pow(2).mean().sqrt()), float(r.abs().max())
    rmse_c, rmse_p = float((c - r).pow(2).mean().sqrt()), float((p - r).pow(2).mean().sqrt())
    max_c, max_p = float((c - r).abs().max()), float((p - r).abs().max())
    k_rms = max(rmse_c - u * rms, 0.0) / rmse_p if rmse_p > 0 else (0.0 if rmse_c <= u * rms else float("inf"))
    k_max = max(max_c - 2 * u * big, 0.0) / max_p if max_p > 0 else (0.0 if max_c <= 2 * u * big else float("inf"))
    return k_rms, k_max


def position_peer_rmse(peer, ref):
    """The peer's RMS error per logits position [S], floored at its 90th percentile, as the judge floors it."""
    rmse = (peer - ref).pow(2).mean(-1).sqrt()
    return rmse.clamp_min(float(rmse.quantile(0.9)))


def position_k_need(cand, peer, ref, u):
    """The k that the per-position RMS bound needs for logits [S, V] (float64)."""
    rms_row = ref.pow(2).mean(-1).sqrt()
    cand_rmse = (cand - ref).pow(2).mean(-1).sqrt()
    return float(((cand_rmse - u * rms_row).clamp_min(0) / position_peer_rmse(peer, ref)).max())


class Worst:
    def __init__(self):
        self.values = {}

    def add(self, key, value, where):
        if value > self.values.get(key, (-1.0, ""))[0]:
            self.values[key] = (value, where)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2", help="default tiny Llama seeds ('' for none)")
    parser.add_argument("--model_path", action="append", default=[], help="more checkpoints (repeatable)")
    parser.add_argument("--real", action="store_true", help="add the real checkpoint (tools/real_checkpoint.py)")
    parser.add_argument("--max_tokens", type=int, default=512)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    from kitcore.real import real_checkpoint
    from transformers import AutoTokenizer

    devices.set_threads(None)
    paths = [checkpoints.default_checkpoint("llama", int(s)) for s in args.seeds.split(",") if s.strip()]
    paths += [Path(p) for p in args.model_path] + ([real_checkpoint()] if args.real else [])
    cpu = Device("cpu", "cpu")
    table, ks = Worst(), Worst()
    for path in paths:
        tok = AutoTokenizer.from_pretrained(str(path))
        ref = HFEngine(str(path), cpu, torch.float32, "eager")
        config = ref.config.to_dict()
        encode = lambda t, tok=tok: tok(t)["input_ids"]  # noqa: E731
        inputs = prompts(encode, min(args.max_tokens, ref.config.max_position_embeddings))
        for dtype in [devices.parse_dtype(d) for d in args.dtypes.split(",")]:
            u = rounding_floor(dtype)
            hf = {a: HFEngine(str(path), cpu, dtype, a) for a in ("eager", "sdpa")}
            pairs = [("hf/eager", hf["eager"], hf["sdpa"]), ("hf/sdpa", hf["sdpa"], hf["eager"])]
            if args.compile:
                pairs.append(("compile/sdpa", CompileEngine(str(path), cpu, dtype, "sdpa"), hf["sdpa"]))
            for ids in inputs:
                pos = torch.arange(ids.shape[1])[None]
                r = ref.capture(ids, pos)
                caps = {a: e.capture(ids, pos) for a, e in hf.items()}
                own = {a: {name: e.run_component(point, layer, component_inputs(r, config, layer, point, ids), pos)
                           for layer, point, name in point_order(config)} for a, e in hf.items()}
                for label, eng, peer in pairs:
                    where = f"{path.name} {label} {ids.shape[1]} tokens"
                    peer_cap = caps[peer.attn]
                    if eng.capture:
                        cand_cap, cand_own = caps[eng.attn], own[eng.attn]
                    else:
                        cand_cap, cand_own = {"logits": eng.forward(ids, pos)}, {}
                    for name, c in cand_cap.items():
                        a, n = table_need(c, r[name], TOLERANCES[dtype].rtol)
                        table.add((dtype, "total", "atol_rms"), a, f"{where} {name}")
                        table.add((dtype, "total", "nmse"), n, f"{where} {name}")
                        kr, km = k_need(c, peer_cap[name], r[name], u)
                        ks.add((dtype, "tensor rms"), kr, f"{where} {name}")
                        ks.add((dtype, "tensor max"), km, f"{where} {name}")
                    for name, c in cand_own.items():
                        a, n = table_need(c, r[name], OWN_TOLERANCES[dtype].rtol)
                        table.add((dtype, "own", "atol_rms"), a, f"{where} {name}")
                        table.add((dtype, "own", "nmse"), n, f"{where} {name}")
                        kr, km = k_need(c, own[peer.attn][name], r[name], u)
                        ks.add((dtype, "own rms"), kr, f"{where} {name}")
                        ks.add((dtype, "own max"), km, f"{where} {name}")
                    logits_c, logits_p, logits_r = (x["logits"][0].double() for x in (cand_cap, peer_cap, r))
                    table.add((dtype, "logits", "nmse"), table_need(logits_c, logits_r, 0)[1], where)
                    rms_row, peer_rmse = logits_r.pow(2).mean(-1).sqrt(), position_peer_rmse(logits_p, logits_r)
                    ks.add((dtype, "position rms"), position_k_need(logits_c, logits_p, logits_r, u), where)
                    # a flip of a correct engine: how many RMS bounds (calibrated, table) its gap spans
                    top2 = logits_r.topk(2, -1).values
                    flipped = logits_c.argmax(-1) != logits_r.argmax(-1)
                    if flipped.any():
                        gap = (top2[:, 0] - top2[:, 1] - 4 * u * top2[:, 0].abs())[flipped]
                        sig_peer = (PEER_K * peer_rmse + u * rms_row)[flipped]
                        sig_table = LOGITS_NMSE[dtype] ** 0.5 * rms_row[flipped]
                        ks.add((dtype, "flip sigmas peer"), float((gap / (2 * sig_peer)).max()), where)
                        ks.add((dtype, "flip sigmas table"), float((gap / (2 * sig_table)).max()), where)
            print(f"done: {path.name} {dtype}", file=sys.stderr, flush=True)
    print(f"{'dtype':<9} {'error':<6} {'figure':<9} {'needed':>10} {'table':>9} {'margin':>7}   worst at")
    for (dtype, kind, fig), (value, where) in sorted(table.values.items(), key=lambda kv: str(kv[0])):
        limit = (LOGITS_NMSE[dtype] if kind == "logits" else
                 getattr((TOLERANCES if kind == "total" else OWN_TOLERANCES)[dtype], fig))
        print(f"{str(dtype)[6:]:<9} {kind:<6} {fig:<9} {value:>10.3e} {limit:>9.1e} "
              f"{limit / max(value, 1e-300):>7.1f}   {where}")
    print(f"\nk needed by the calibrated bounds (kitcore.judges: PEER_K {PEER_K:g} for rms, PEER_K_ELEMENT "
          f"{PEER_K_ELEMENT:g} for a tensor's max, PEER_K_MAX {PEER_K_MAX:g} per position; a correct engine's flips "
          f"must span fewer than DECISIVE_SIGMAS {DECISIVE_SIGMAS:g})")
    for (dtype, fig), (value, where) in sorted(ks.values.items(), key=lambda kv: str(kv[0])):
        print(f"{str(dtype)[6:]:<9} {fig:<13} {value:>7.3f}   {where}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
