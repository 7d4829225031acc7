"""Batch validation; its shell, with the description --help prints: test/models/llama/test_batch_validation.py.

Batches: does every prompt get the same logits alone and inside a batch, and the reference's logits,
"""


import torch

from . import inputs, judges, protocol, session
from .decode import ragged_decode
from .errors import Unavailable, UsageError
from .verdict import Verdict

SCRIPT = "test_batch_validation"
SHARED_PREFIX, CONTINUATIONS = 40, (12, 20)  # tokens of the shared-prefix batch


def interleaved(lengths):
    """Row order that puts the shortest prompt first and pairs short with long rows in every batch (a
    batch of equal lengths has no padding to get wrong; a long row 0 would hide position mistakes)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = []
    while order:
        out.append(order.pop(0))
        if order:
            out.append(order.pop())
    return out


class Rows:
    """The engines' logits for each prompt alone: reference, candidate and peer (or None), and the rounding
    error a correct engine has on each (`noise`), which bounds what a batch may change."""

    def __init__(self, run, peer, prompts):
        self.prompts, self.reference, self.candidate, self.peer = prompts, [], [], []
        for ids in prompts:
            row = inputs.pad([ids])
            self.reference.append(run.reference.forward(row.input_ids, row.position_ids)[0].cpu())
            self.candidate.append(run.candidate.forward(row.input_ids, row.position_ids)[0].cpu())
            self.peer.append(peer.forward(row.input_ids, row.position_ids)[0].cpu() if peer else None)
        # the correct engine: the peer, or the candidate itself when it is the peer (plain hf); none: tables
        correct = self.peer if peer else self.candidate if run.candidate is run.peer else None
        self.noise = None if correct is None else judges.rounding_noise(correct, self.reference)


def check_batch(run, peer, alone, rows, side, label, judge, results, verdict):
    """One padded batch of the prompts `rows` (indices): every row against itself alone and the reference
    (the gates of each row; the rates and KL mean/p99, which need many positions, over all rows together),
    each an outcome of `verdict`."""
    batch = inputs.pad([alone.prompts[i] for i in rows], side)
    cand = run.candidate.forward(batch.input_ids, batch.position_ids, batch.attention_mask).cpu()
    peer_out = peer.forward(batch.input_ids, batch.position_ids, batch.attention_mask).cpu() if peer else None
    space = judges.output_space(run.candidate)
    for j, i in enumerate(rows):
        got = batch.real(j, cand)
        same = judges.judge_invariance(got, alone.candidate[i], None if alone.noise is None else alone.noise[i], judge,
                                       space)
        vs_ref = judges.check_logits(got[None], alone.reference[i][None], torch.ones(1, len(got)), judge,
                                     None if peer_out is None else batch.real(j, peer_out)[None], aggregate=False,
                                     space=space)
        where = f"{label} row {j} (prompt {i}, {len(got)} tokens)"
        why = ([] if same.passed else [f"{same.kind} its run alone (max abs {same.max_abs:.3e})"]) + (
            [] if vs_ref.passed else [f"vs reference: {vs_ref.reasons()}"])
        ok = verdict.add(where, not why, f"{where}: {'; '.join(why)}")
        print(f"  {where:<46} {same.kind:<16} {same.max_abs:>10.3e} | vs reference "
              + ("ok" if vs_ref.passed else f"FAIL: {vs_ref.reasons()}"))
        case = f"{label.replace(' ', '_')}_row{j}"
        results.add(case, "invariant_max_abs", same.max_abs, invariance=same.kind.replace(" ", "_"))
        results.add(case, "max_abs", vs_ref.comparison.max_abs)
        results.add(case, "kl_max", vs_ref.kl_max, unit="nats")
        results.add(case, "passed", ok, unit="bool")
    together = judges.check_logits(cand, _aligned(batch, rows, alone.reference), batch.attention_mask, judge,
                                   peer_out, space=space)
    if not verdict.add(f"{label} all rows", together.passed, f"{label}, all rows together: {together.reasons()}"):
        print(f"  {label} all rows together: FAIL: {together.reasons()}")
    results.add(label.replace(" ", "_"), "kl_mean", together.kl_mean, unit="nats")
    results.add(label.replace(" ", "_"), "passed", together.passed, unit="bool")


def _aligned(batch, rows, per_prompt):
    """Per-prompt logits [S_i, V] placed at their rows' real positions of the batch [B, W, V]."""
    out = torch.zeros(*batch.input_ids.shape, per_prompt[rows[0]].shape[-1], dtype=per_prompt[rows[0]].dtype)
    for j, i in enumerate(rows):
        out[j][batch.attention_mask[j].bool()] = per_prompt[i].to(out.dtype)
    return out


def check_decode(run, peer, alone, rows, steps, judge, results, verdict):
    """Batched prefill + ragged teacher-forced decode of the prompts `rows`; every row's every step
    against the reference of that prompt alone."""
    batch = inputs.pad([alone.prompts[i] for i in rows])
    teachers, references = [], []
    for j, i in enumerate(rows):
        row = inputs.pad([alone.prompts[i]])
        teacher, logits, _ = run.reference_greedy(row, max(1, steps - j % 3))
        teachers.append(teacher[0])
        references.append(logits[0])
    got = ragged_decode(run.candidate, batch, teachers)
    peer_got = ragged_decode(peer, batch, teachers) if peer else [None] * len(rows)
    for j, i in enumerate(rows):
        failures = []
        for step in range(len(teachers[j]) + 1):
            check = judges.check_logits(got[j][step][None, None], references[j][step][None, None],
                                        torch.ones(1, 1), judge,
                                        None if peer_got[j] is None else peer_got[j][step][None, None],
                                        aggregate=False)
            results.add(f"decode_row{j}", "max_abs", check.comparison.max_abs, kind=f"step{step}")
            results.add(f"decode_row{j}", "passed", check.passed, unit="bool", kind=f"step{step}")
            if not check.passed:
                failures.append((step, check))
        where = f"decode row {j} (prompt {i}, {len(alone.prompts[i])} tokens + {len(teachers[j])} steps)"
        if failures:
            step, check = failures[0]
            kind = "prefill" if step == 0 else f"decode step {step}"
            verdict.add(f"decode row {j}", False, f"{where}: from {kind} on ({len(failures)} step(s)): "
                                                   f"{check.reasons()}")
            print(f"  {where:<56} FAIL from {kind} on ({len(failures)} step(s)): {check.reasons()}")
        else:
            verdict.add(f"decode row {j}", True)
            print(f"  {where:<56} every step ok")
    # every step of every row together: the statistics a single position cannot carry
    flat = [torch.cat(x)[None] if x[0] is not None else None for x in (got, references, peer_got)]
    together = judges.check_logits(flat[0], flat[1], torch.ones(flat[0].shape[:2]), judge, flat[2])
    if not verdict.add("decode, all rows", together.passed,
                       f"every decode step of every row together: {together.reasons()}"):
        print(f"  every step of every row together: FAIL: {together.reasons()}")
    results.add("decode_all", "kl_mean", together.kl_mean, unit="nats")
    results.add("decode_all", "passed", together.passed, unit="bool")


def check_concurrent_decode(run, alone, rows, steps, judge, results, verdict):
    """For an engine that decodes by itself: the prompts `rows` decoded greedily at the same time (one
    generate() call: concurrent requests) and each alone; each row judged against itself alone and the
    reference (Session.judge_free_run)."""
    batch = inputs.pad([alone.prompts[i] for i in rows])
    tokens, got = run.candidate.generate(batch.input_ids, batch.position_ids, batch.attention_mask, steps)
    for j, i in enumerate(rows):
        row = inputs.pad([alone.prompts[i]])
        alone_tokens, alone_got = run.candidate.generate(row.input_ids, row.position_ids, None, steps)
        check = run.judge_free_run(run.candidate, alone.prompts[i], (tokens[j], got[j]),
                                   (alone_tokens[0], alone_got[0]), judge)
        where = f"concurrent row {j} (prompt {i}, {len(alone.prompts[i])} tokens + {steps} steps)"
        verdict.add(where, check.passed, f"{where}: {check.invariance.kind} its run alone; vs reference "
                    f"{check.vs_ref.reasons() or 'ok'}")
        parted = "" if check.agree > steps else f"; its tokens leave the row alone's at step {check.agree}"
        print(f"  {where:<56} {check.invariance.kind:<16} {check.invariance.max_abs:>10.3e}{parted} | vs reference "
              f"({check.follows} steps) " + ("ok" if check.vs_ref.passed else f"FAIL: {check.vs_ref.reasons()}"))
        results.add(f"concurrent_row{j}", "invariant_max_abs", check.invariance.max_abs,
                    invariance=check.invariance.kind.replace(" ", "_"))
        results.add(f"concurrent_row{j}", "passed", check.passed, unit="bool")


def parse_args(argv, doc):
    parser = session.build_parser(doc, decode=True, batch=True)
    parser.set_defaults(decode_steps=4)
    parser.add_argument("--batch_sizes", default="2,4,8", help="batch sizes (default 2,4,8)")
    args = parser.parse_args(argv)
    if args.plan:
        return args, None
    try:
        sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 2:
        raise UsageError(f"--batch_sizes {args.batch_sizes!r}: expected sizes of at least 2, e.g. 2,4,8")
    if args.decode_steps < 1:
        raise UsageError(f"--decode_steps must be at least 1, got {args.decode_steps}")
    return args, sizes


def padding_sides(run, spec):
    """The padded batches the candidate takes; batch validation needs left padding, and a cache (the ragged
    decode) or generate() (the concurrent decode)."""
    declared = protocol.declared(run.candidate, "padding_sides")
    if "left" not in declared:
        raise Unavailable(f"engine {spec!r} takes one prompt at a time (padding_sides {declared!r}): batch "
                          "validation needs left padding")
    if "generate" not in protocol.capabilities(run.candidate):
        protocol.require(run.candidate, "new_cache", spec, "batch validation's ragged teacher-forced decode")
    return [s for s in ("left", "right") if s in declared]


def check_shared_prefix(run, peer, prompts, judge, results, verdict):
    """One prompt, and that prompt continued two ways, in one batch; skipped without a long enough prompt."""
    prefix = max(prompts, key=len)[:SHARED_PREFIX]
    if len(prefix) < SHARED_PREFIX:
        print(f"\nnote: no prompt of {SHARED_PREFIX} tokens: the shared-prefix batch is skipped")
        return
    tails = inputs.random_rows(CONTINUATIONS, run.checkpoint.config["vocab_size"], run.args.seed)
    shared = [prefix + tails[0], prefix + tails[1], prefix]
    print(f"\nshared-prefix batch ({SHARED_PREFIX} shared tokens, then {CONTINUATIONS} more or none):")
    with run.phases("shared_prefix"):
        check_batch(run, peer, Rows(run, peer, shared), [0, 1, 2], "left", "shared prefix", judge, results, verdict)


def main(argv=None, doc=None):
    args, sizes = parse_args(argv, doc)
    if args.plan:
        return session.print_plan(args, SCRIPT)
    run = session.Session.open(args, SCRIPT, extra_positions=args.decode_steps)
    sides = padding_sides(run, args.engine)
    prompts = [run.inputs.row(i).input_ids[0].tolist() for i in range(run.inputs.input_ids.shape[0])]
    if max(sizes) > len(prompts):
        raise UsageError(f"--batch_sizes {args.batch_sizes}: batches of {max(sizes)} need at least {max(sizes)} "
                         f"prompts, there are {len(prompts)}; add --lengths or prompts")
    results, judge, peer = run.results, run.judge(run.candidate), run.peer_for(run.candidate)
    order = interleaved([len(p) for p in prompts])
    print(f"prompts: {len(prompts)} of {', '.join(str(len(p)) for p in prompts)} tokens; padding sides: "
          f"{', '.join(sides)}; against the reference: {judge.describe()}")
    rounding = ("the peer's" if peer else "the candidate's own, as the peer," if run.peer is run.candidate else None)
    print("within rounding: " + (f"at most k={judges.PEER_K:g} (per position {judges.PEER_K_MAX:g}) x {rounding} "
                                 "rounding error against the reference (at least its p90 over all prompts)"
                                 if rounding else "the dtype's table (no peer)"))

    with run.phases("alone"):
        alone = Rows(run, peer, prompts)
    verdict = Verdict()
    print("\neach row in a batch against the same prompt alone (invariance, max abs diff) and the reference:")
    with run.phases("batches"):
        for size in sizes:
            for side in sides:
                for start in range(0, len(order) - size + 1, size):
                    label = f"batch {size} {side} #{start // size}"
                    check_batch(run, peer, alone, order[start:start + size], side, label, judge, results, verdict)

    if "new_cache" in protocol.capabilities(run.candidate):
        print(f"\nbatched prefill + ragged greedy decode ({args.decode_steps} steps, rows finish early):")
        with run.phases("decode"):
            check_decode(run, peer, alone, order[:max(sizes)], args.decode_steps, judge, results, verdict)
    else:
        print(f"\n{max(sizes)} requests decoded at the same time ({args.decode_steps} steps each) against each alone "
              "(invariance) and the reference:")
        with run.phases("decode"):
            check_concurrent_decode(run, alone, order[:max(sizes)], args.decode_steps, judge, results, verdict)
    check_shared_prefix(run, peer, prompts, judge, results, verdict)

    print("\n" + run.phases.summary())
    run.phases.report(results)
    return run.finish(verdict)


