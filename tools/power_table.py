#!/usr/bin/env python3
"""What each check catches and what it false-alarms on: the kit's end-to-end judges beside the anchors' own
rules, all computed on the same logits.

For each checkpoint (the default tiny Llamas of --seeds, --model_path ones, --real: SmolLM2) and dtype:
  reference   HF Transformers eager in float32 on the CPU (the kit's reference)
  peer        HF sdpa in the dtype at the default thread count: the kit's calibrating peer, and the side the
              anchors compare against (they compare an engine with HF in the same dtype)
  candidates  correct engines (hf eager; hf sdpa at 1 thread; compile and llama.cpp with --compile and
              --llamacpp) and the negative controls (kitcore.controls: the peer with one planted bug each)
Each candidate runs --prompts disjoint windows of real text of --tokens tokens each, and is judged per prompt by:
  kit, calibrated   kitcore.judges.check_logits calibrated by the peer (the end-to-end script's default)
  kit, table        the same, by the dtype's static table (`--peer none`; `make validate-llama`'s plain hf)
  vLLM top-5        tests/models/utils.py check_logprobs_close: 32 greedy tokens each with their top-5
                    logprobs; at the first step where the tokens differ, each must be in the other's top 5
  SGLang rel        its dump comparator: 1 - 2 sum(c p) / sum(c^2 + p^2) <= 1e-3 on the logits
  llama.cpp NMSE    test-llama-archs: sum((c - p)^2) / sum(p^2) <= 1e-4
  InfiniLM close    allclose(c, p, rtol=1e-3, atol=1e-3); InfiniLM fwd: allclose(rtol=1e-2, atol=1.0)
A correct engine flagged by a rule is a false alarm; a control it passes is a miss. Cells read "flagged on n of
N prompts". The margin table: over every correct run, the largest factor the kit's calibrated bounds needed
(tensor RMS against PEER_K, a tensor's largest element against PEER_K_ELEMENT, one position's RMS against
PEER_K_MAX): the room left before a correct engine would fail.

    python tools/power_table.py [--seeds 0,1,2] [--real] [--model_path DIR ...] [--dtypes bfloat16]
                                [--prompts 8] [--tokens 128] [--compile] [--llamacpp] [--json FILE]
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import checkpoints, cli, controls, decode, devices, engines, inputs, judges  # noqa: E402
from kitcore.devices import Device  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402
from measure_tolerances import k_need, position_k_need  # noqa: E402

GREEDY_TOKENS, TOP = 32, 5


def vllm_top5(cand_greedy, peer_greedy):
    """check_logprobs_close on one prompt: True when it would fail."""
    (c_tokens, c_logits), (p_tokens, p_logits) = cand_greedy, peer_greedy
    for step in range(GREEDY_TOKENS):
        c, p = int(c_tokens[step]), int(p_tokens[step])
        if c != p:
            c_top, p_top = c_logits[step].topk(TOP).indices.tolist(), p_logits[step].topk(TOP).indices.tolist()
            return c not in p_top or p not in c_top
    return False


def sglang_rel(c, p):
    return float(1 - 2 * (c * p).sum() / (c * c + p * p).sum())


def llamacpp_nmse(c, p):
    return float((c - p).pow(2).sum() / p.pow(2).sum())


# rule -> flagged?, from the candidate's and the peer's float64 logits [S, V]
ANCHORS = {
    "SGLang rel": lambda c, p: sglang_rel(c, p) > 1e-3,
    "llama.cpp NMSE": lambda c, p: llamacpp_nmse(c, p) > 1e-4,
    "InfiniLM close": lambda c, p: not torch.allclose(c, p, rtol=1e-3, atol=1e-3),
    "InfiniLM fwd": lambda c, p: not torch.allclose(c, p, rtol=1e-2, atol=1.0),
}
RULES = ["kit, calibrated", "kit, table", "vLLM top-5", *ANCHORS]


def greedy(engine, row):
    """32 greedy tokens through the engine's own cache, and the logits each was chosen from [32, V]."""
    _, logits = decode.greedy(engine, row, GREEDY_TOKENS - 1)  # the last step's logits choose token 32
    return logits[0].argmax(-1), logits[0].double()


def prompt_rows(path, prompts, tokens, vocab, seed):
    if inputs.has_tokenizer(path):
        return inputs.text_rows(inputs.tokenizer(path), [tokens] * prompts)
    return inputs.random_rows([tokens] * prompts, vocab, seed)


def correct_engines(path, dtype, args, cpu):
    """(label, engine, threads) of the correct engines that run here."""
    out = [("hf eager", engines.HFEngine(str(path), cpu, dtype, "eager"), None)]
    if torch.get_num_threads() > 1:
        out.append(("hf sdpa, 1 thread", engines.HFEngine(str(path), cpu, dtype, "sdpa"), 1))
    if args.compile:
        out.append(("compile", engines.CompileEngine(str(path), cpu, dtype, "sdpa"), None))
    if args.llamacpp:
        out.append(("llama.cpp", engines.load_engine("llama.cpp", path, cpu, dtype, "sdpa"), None))
    return out


class Tally:
    """Per (checkpoint, dtype, candidate, rule): how many prompts flagged it."""

    def __init__(self):
        self.flagged, self.runs = defaultdict(int), defaultdict(int)
        self.margins = defaultdict(lambda: (0.0, ""))

    def add(self, key, flagged):
        self.runs[key] += 1
        self.flagged[key] += bool(flagged)

    def need(self, key, value, where):
        if value > self.margins[key][0]:
            self.margins[key] = (value, where)


def judge_all(tally, key, cand, cand_greedy, peer_greedy, ref, peer, row, kit_judges):
    c, p = cand[0].double(), peer[0].double()
    for rule, judge in kit_judges.items():
        tally.add(key + (rule,), not judges.check_logits(cand, ref, row.attention_mask, judge, peer).passed)
    tally.add(key + ("vLLM top-5",), vllm_top5(cand_greedy, peer_greedy))
    for rule, flagged in ANCHORS.items():
        tally.add(key + (rule,), flagged(c, p))


def with_threads(threads, call):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return call()
    finally:
        torch.set_num_threads(before)


def measure(path, dtype, args, tally, cpu):
    checkpoint = checkpoints.open_checkpoint(path)
    name = path.name
    reference = engines.HFEngine(str(path), cpu, torch.float32, "eager")
    peer = engines.HFEngine(str(path), cpu, dtype, "sdpa")
    rows = prompt_rows(path, args.prompts, args.tokens, checkpoint.config["vocab_size"], args.seed)
    model_type, u = checkpoint.model_type, judges.rounding_floor(dtype)
    candidates = correct_engines(path, dtype, args, cpu)
    control_engine = engines.HFEngine(str(path), cpu, dtype, "sdpa")
    for i, ids in enumerate(rows):
        row = inputs.pad([ids])

        def forward(engine):
            return engine.forward(row.input_ids, row.position_ids)

        ref, peer_logits, peer_greedy = forward(reference), forward(peer), greedy(peer, row)
        for label, engine, threads in candidates:
            judged = getattr(engine, "judged_dtype", None) or engine.dtype
            kit = {"kit, calibrated": judges.judge_for(engine, model_type, calibrated=judged == dtype),
                   "kit, table": judges.judge_for(engine, model_type, calibrated=False)}
            cand = with_threads(threads, lambda: forward(engine))
            cand_greedy = with_threads(threads, lambda: greedy(engine, row))
            judge_all(tally, (name, devices.dtype_name(dtype), label), cand, cand_greedy, peer_greedy, ref,
                      peer_logits, row, kit)
            c, p, r = cand[0].double(), peer_logits[0].double(), ref[0].double()
            k_rms, k_max = k_need(c, p, r, u)
            where = f"{name} {label} prompt {i}"
            tally.need((devices.dtype_name(dtype), "tensor rms", judges.PEER_K), k_rms, where)
            tally.need((devices.dtype_name(dtype), "tensor max", judges.PEER_K_ELEMENT), k_max, where)
            tally.need((devices.dtype_name(dtype), "position rms", judges.PEER_K_MAX),
                       position_k_need(c, p, r, u), where)
        kit = {"kit, calibrated": judges.judge_for(control_engine, model_type, calibrated=True),
               "kit, table": judges.judge_for(control_engine, model_type, calibrated=False)}
        with torch.no_grad():
            busiest = controls.busiest_expert(control_engine, forward)
            for label, _, _ in controls.each_control(control_engine.model, busiest):
                judge_all(tally, (name, devices.dtype_name(dtype), label), forward(control_engine),
                          greedy(control_engine, row), peer_greedy, ref, peer_logits, row, kit)
        print(f"done: {name} {devices.dtype_name(dtype)} prompt {i + 1} of {len(rows)}", file=sys.stderr, flush=True)


def print_tables(tally, labels):
    print(f"{'checkpoint':<24} {'dtype':<9} {'candidate':<50} " + " ".join(f"{r:>15}" for r in RULES))
    for (name, dtype, label) in labels:
        key = (name, dtype, label)
        cells = [f"{tally.flagged[key + (r,)]}/{tally.runs[key + (r,)]}" for r in RULES]
        print(f"{name:<24} {dtype:<9} {label:<50} " + " ".join(f"{c:>15}" for c in cells))
    print("\nthe kit's calibrated bounds on correct engines: the factor needed, the factor used, the margin")
    for (dtype, figure, k), (need, where) in sorted(tally.margins.items()):
        print(f"{dtype:<9} {figure:<13} needed {need:>6.2f} of k {k:>4g}: margin {k / max(need, 1e-9):>5.1f}x   "
              f"(worst: {where})")


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2", help="default tiny Llama seeds ('' for none)")
    parser.add_argument("--model_path", action="append", default=[], help="more checkpoints (repeatable)")
    parser.add_argument("--real", action="store_true", help="add the real checkpoint (tools/real_checkpoint.py)")
    parser.add_argument("--dtypes", default="bfloat16", help="candidate dtypes (default bfloat16)")
    parser.add_argument("--prompts", type=int, default=8, help="disjoint prompts of real text per checkpoint")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--seed", type=int, default=0, help="for random prompts where a checkpoint has no tokenizer")
    parser.add_argument("--compile", action="store_true", help="also torch.compile as a correct engine")
    parser.add_argument("--llamacpp", action="store_true", help="also llama.cpp (make setup-llamacpp)")
    parser.add_argument("--json", help="write the tallies here")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.tokens < 2:
        raise UsageError(f"--prompts {args.prompts} --tokens {args.tokens}: at least one prompt of 2 tokens")
    from kitcore.real import real_checkpoint

    threads = devices.set_threads(None)
    print(f"power_table: threads {threads}, torch {torch.__version__}, {args.prompts} prompts of {args.tokens} "
          f"tokens, {GREEDY_TOKENS} greedy tokens for the vLLM rule", flush=True)
    paths = [checkpoints.default_checkpoint("llama", int(s)) for s in args.seeds.split(",") if s.strip()]
    paths += [Path(p) for p in args.model_path] + ([real_checkpoint()] if args.real else [])
    cpu, tally, labels = Device("cpu", "cpu"), Tally(), []
    for path in paths:
        for dtype in [devices.candidate_dtype(d) for d in args.dtypes.split(",")]:
            before = set(tally.runs)
            measure(Path(path), dtype, args, tally, cpu)
            labels += list(dict.fromkeys(k[:3] for k in tally.runs if k not in before))
            print_tables(tally, labels)  # so far: a long run shows what it has
    print("\nall checkpoints:")
    print_tables(tally, labels)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "flagged": [{"checkpoint": k[0], "dtype": k[1], "candidate": k[2], "rule": k[3], "flagged": n,
                         "prompts": tally.runs[k]} for k, n in tally.flagged.items()],
            "margins": [{"dtype": k[0], "figure": k[1], "k": k[2], "needed": v, "worst": w}
                        for k, (v, w) in tally.margins.items()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
