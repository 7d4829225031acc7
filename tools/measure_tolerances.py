#!/usr/bin/env python3
"""Measure the error of correct engines against the float32 reference, the basis of kitcore.compare.TOLERANCES.

For each seed's default Llama checkpoint, each candidate dtype and each correct engine (hf eager,
hf sdpa, compile for the logits), on several prompts, it records at every capture point, for the
total error and for the dual test's own error (both judged by TOLERANCES):
    atol_rms needed = max over elements of (|cand - ref| - rtol * |ref|) / rms(ref)
    nmse
and prints the maximum per dtype beside the table's current value and the resulting margin.

    python tools/measure_tolerances.py [--seeds 0,1,2] [--no-compile]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import checkpoints, cli  # noqa: E402
from kitcore.compare import TOLERANCES  # noqa: E402
from kitcore.devices import Device  # noqa: E402
from kitcore.engines import CompileEngine, HFEngine  # noqa: E402
from kitcore.points import component_inputs, point_order  # noqa: E402

PROMPTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Raise ValueError if the argument is not a valid path; otherwise return the absolute file name.",
    "This module provides a simple interface to compress and decompress files, like the GNU programs.",
]


def needed(cand, ref, rtol):
    c, r = cand.double(), ref.double()
    rms = float(r.pow(2).mean().sqrt())
    atol = float(((c - r).abs() - rtol * r.abs()).max()) / rms
    nmse = float((c - r).pow(2).sum() / r.pow(2).sum())
    return atol, nmse


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    cpu = Device("cpu", "cpu")
    worst = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        path = checkpoints.default_checkpoint("llama", seed)
        tok = AutoTokenizer.from_pretrained(str(path))
        ref = HFEngine(str(path), cpu, torch.float32, "eager")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            candidates = [HFEngine(str(path), cpu, dtype, a) for a in ("eager", "sdpa")]
            if args.compile:
                candidates.append(CompileEngine(str(path), cpu, dtype, "sdpa"))
            rtol = TOLERANCES[dtype].rtol
            for prompt in PROMPTS:
                ids = torch.tensor([tok(prompt)["input_ids"]])
                pos = torch.arange(ids.shape[1])[None]
                r = ref.capture(ids, pos)
                n_layers = ref.config.num_hidden_layers
                for eng in candidates:
                    label = f"{eng.name}/{eng.attn}"
                    pairs = ([(n, eng.capture(ids, pos)[n], r[n]) for n in r] if eng.capture
                             else [("logits", eng.forward(ids, pos), r["logits"])])
                    if eng.run_component:  # own error: the component on the reference's input
                        pairs += [("own " + name, eng.run_component(point, layer, component_inputs(
                            r, layer, point, n_layers, ids), pos), r[name])
                            for layer, point, name in point_order(n_layers)]
                    for name, c, rr in pairs:
                        a, n = needed(c, rr, rtol)
                        kind = (dtype, "own") if name.startswith("own ") else (dtype, "total")
                        w = worst.setdefault(kind, {"atol": (0, ""), "nmse": (0, "")})
                        where = f"seed {seed} {label} {name}"
                        if a > w["atol"][0]:
                            w["atol"] = (a, where)
                        if n > w["nmse"][0]:
                            w["nmse"] = (n, where)
    print(f"{'dtype':<10} {'error':<6} {'needed atol_rms':>16} {'table':>9} {'margin':>7}   {'needed nmse':>12} "
          f"{'table':>9} {'margin':>7}   worst at")
    for (dtype, kind), w in sorted(worst.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        tol = TOLERANCES[dtype]
        print(f"{str(dtype)[6:]:<10} {kind:<6} {w['atol'][0]:>16.3e} {tol.atol_rms:>9.1e} "
              f"{tol.atol_rms / w['atol'][0]:>7.1f}   "
              f"{w['nmse'][0]:>12.3e} {tol.nmse:>9.1e} {tol.nmse / max(w['nmse'][0], 1e-300):>7.1f}   "
              f"{w['atol'][1]} | {w['nmse'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
