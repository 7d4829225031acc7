"""Forward validation; its shell, with the description --help prints: test/models/llama/test_forward_validation.py.

Prefill, then decode with a KV cache: two engines compared step by step, and each against HF.
"""


import torch

from . import prefix_pairs, protocol, session, stepwise
from .devices import dtype_name
from .decode import Decoded, run_engine
from .errors import Unavailable, UsageError
from .verdict import Verdict

SCRIPT = "test_forward_validation"
HEADER = (f"{'step':>5} {'kind':>8} | {'A vs ref':>19} | {'B vs ref':>19} | {'A vs B':>19} | "
          f"{'A cache':>19} | {'B cache':>19} | verdict")


def parse_args(argv, doc):
    parser = session.build_parser(doc, decode=True)
    parser.add_argument("--engines", help="A,B: two engines to compare (default: <--engine>,reference)")
    session.add_repeat_arg(parser, "prefill + decode (engine A)")
    session.add_controls_arg(parser)
    parser.add_argument("--cache_pairs", action="store_true",
                        help="prefix cache, cold then hot (kitcore/prefix_pairs.py), for an engine with its prefix "
                             "cache on, e.g. --engine vllm --engine_args '{\"enable_prefix_caching\": true}'")
    args = parser.parse_args(argv)
    if args.plan:
        return args, None
    if args.decode_steps < 1:
        raise UsageError(f"--decode_steps must be at least 1, got {args.decode_steps}")
    specs = (args.engines or f"{args.engine},{session.REFERENCE}").split(",")
    if len(specs) != 2 or not all(specs):
        raise UsageError(f"--engines {args.engines!r}: expected two engines, e.g. hf,compile or hf,reference")
    return args, specs


def decode_all(run, pair, teacher, ref_steps, ref_cached):
    """Every engine's prefill + decode (the reference's is its greedy decode, not run twice): by id."""
    ones = torch.ones_like(ref_cached[..., 0], dtype=torch.long)
    outputs = {id(run.reference): Decoded(ref_cached, ref_steps, ones, teacher)}
    for label, engine in (("a", pair[0]), ("b", pair[1]), ("peer", run.peer)):
        if engine is not None and id(engine) not in outputs:
            with run.phases(f"{label}_decode"):
                outputs[id(engine)] = run_engine(engine, run.inputs, teacher)
    return outputs


def print_step(results, step, checks):
    """One row of the step table, its FAIL lines and metric lines; returns whether the step is CLOSE."""
    kind = "prefill" if step == 0 else f"decode{step}"
    close = all(c.passed for c in checks.values())
    cells = " | ".join(f"{checks[n].comparison.max_abs:>11.3e} {'ok' if checks[n].passed else 'FAIL':>7}"
                       if n in checks else f"{'--':>19}" for n in stepwise.COLUMNS)
    print(f"{step:>5} {kind:>8} | {cells} | {'CLOSE' if close else 'NOT_CLOSE'}")
    for name, c in checks.items():
        if not c.passed:
            print(f"      {name}: {c.reasons()}")
        results.add(f"step{step}", f"{name}_max_abs", c.comparison.max_abs, kind=kind)
        results.add(f"step{step}", f"{name}_nmse", c.comparison.nmse, kind=kind)
        results.add(f"step{step}", f"{name}_kl", c.kl_mean, unit="nats", kind=kind)
        results.add(f"step{step}", f"{name}_passed", c.passed, unit="bool", kind=kind)
    results.add(f"step{step}", "close", close, unit="bool", kind=kind)
    return {"step": step, "kind": kind, "close": close,
            **{n: {**c.comparison.as_dict(), "passed": c.passed, "kl": c.kl_mean, "top1_agreement": c.top1_agreement,
                   "top5_containment": c.top5_containment} for n, c in checks.items()}}


def print_divergence(results, label, spec, d):
    print(f"{label} = {spec}, row {d.row}: chose token {d.token} at step {d.step} where the teacher has {d.teacher}: "
          + ("at a DECISIVE position: a real failure" if d.decisive else
             "a near-tie (the reference's top-1/top-2 gap is within rounding): a benign divergence")
          + "; its later steps are not compared")
    results.add("divergence", "first_step", d.step, unit="step", engine=label, row=d.row, decisive=d.decisive)


def print_overall(results, name, check):
    """Every step of one comparison together: the statistics a single position cannot carry."""
    peer_note = f"; peer KL mean {check.peer['kl_mean']:.2e}, nmse {check.peer['nmse']:.2e}" if check.peer else ""
    print(f"  {name:<8} KL mean {check.kl_mean:.2e} p99 {check.kl_p99:.2e} max {check.kl_max:.2e}, nmse "
          f"{check.comparison.nmse:.2e}, top-1 {check.top1_agreement:.3f}, top-5 {check.top5_containment:.3f}"
          f"{peer_note} -> {'ok' if check.passed else 'FAIL: ' + check.reasons()}")
    for metric in ("kl_mean", "kl_p99", "kl_max", "top1_agreement", "top5_containment"):
        results.add("all_steps", f"{name}_{metric}", getattr(check, metric),
                    unit="nats" if metric.startswith("kl") else "fraction")
    results.add("all_steps", f"{name}_passed", check.passed, unit="bool")
    return {"passed": check.passed, "kl_mean": check.kl_mean, "kl_p99": check.kl_p99, "kl_max": check.kl_max,
            "top1_agreement": check.top1_agreement, "top5_containment": check.top5_containment,
            "nmse": check.comparison.nmse, "decisive_disagreements": check.decisive_disagreements, "peer": check.peer}


def hits(count):
    return "   ?" if count is None else f"{count:>4}"


def check_cache_pairs(run, spec, steps):
    """--cache_pairs: one row per shared length, the verdict; exit 3 when no hot request hit the cache."""
    engine, results = run.engines[spec], run.results
    protocol.require(engine, "reset_prefix_cache", spec, "--cache_pairs (a prefix cache the kit can empty)")
    block = int(protocol.attested(engine).get("block_size") or 16)
    max_positions = min(run.checkpoint.config.get("max_position_embeddings") or 4096,
                        protocol.declared(engine, "max_model_len") or 1 << 30)
    lengths = prefix_pairs.shared_lengths(block, steps, max_positions)
    if not lengths:
        raise UsageError(f"--cache_pairs: block size {block} leaves no shared length within {max_positions} "
                         f"positions; fewer --decode_steps or a smaller block_size")
    tail = prefix_pairs.tail_length(block)
    prefix, *tails = prefix_pairs.base_text(run.checkpoint, max(lengths), tail, run.args.seed)
    judge = run.judge(engine)
    print(f"\nprefix cache, cold then hot (block size {block}; {steps} decode steps; tails of {tail} tokens): "
          f"{judge.describe()}")
    pairs = []
    with run.phases("cache_pairs"):
        for shared in lengths:
            pair = prefix_pairs.run_pair(run, engine, prefix[:shared], tails, steps, block, judge)
            pairs.append(pair)
            inv, ref = pair.check.invariance, pair.check.vs_ref
            parted = "" if pair.check.agree > steps else f"; hot tokens leave the cold ones at step {pair.check.agree}"
            print(f"  shared {shared:>4} tokens: hits cold {hits(pair.hits_cold)}, hot {hits(pair.hits_hot)} "
                  "(full blocks "
                  f"{pair.expected:>4}) | hot vs cold {inv.kind:<15} {inv.max_abs:.3e}{parted} | vs reference "
                  f"({pair.check.follows} steps) " + ("ok" if ref.passed else f"FAIL: {ref.reasons()}"))
            case = f"shared{shared}"
            if pair.hits_hot is not None:
                results.add(case, "hits_cold", pair.hits_cold, unit="tokens")
                results.add(case, "hits_hot", pair.hits_hot, unit="tokens")
            results.add(case, "invariant_max_abs", inv.max_abs, invariance=inv.kind.replace(" ", "_"))
            results.add(case, "passed", pair.passed, unit="bool")
    results.extra["cache_pairs"] = [{"shared": p.shared, "hits_cold": p.hits_cold, "hits_hot": p.hits_hot,
                                     "full_blocks": p.expected, "invariance": p.check.invariance.kind,
                                     "invariant_max_abs": p.check.invariance.max_abs,
                                     "vs_reference": p.check.vs_ref.passed,
                                     "passed": p.passed} for p in pairs]
    if all(p.hits_hot is None for p in pairs):
        print(f"note: {spec} does not report how many prompt tokens each request took from its cache: the hot runs "
              "are judged against the cold ones, but whether they reused anything is not seen here")
    elif not any(p.hits_hot for p in pairs):
        raise Unavailable(f"--cache_pairs: no hot request hit {spec}'s prefix cache (0 cached tokens at every shared "
                          "length): the check saw no cache; turn it on (vllm: --engine_args "
                          "'{\"enable_prefix_caching\": true}')")
    not_cold = [p.shared for p in pairs if p.hits_cold]  # None: not reported
    if not_cold:
        print(f"note: the cold request hit the cache at shared lengths {not_cold}: the reset did not empty it, "
              "so those pairs compare two hot runs")
    hit = (f"{sum(1 for p in pairs if p.hits_hot)} with prefix-cache hits" if pairs[0].hits_hot is not None
           else "prefix-cache hits not reported")
    verdict = Verdict(f"{len(pairs)} hot requests ({hit}) match their cold runs and the reference")
    for p in pairs:
        why = [w for w, bad in ((f"took {p.hits_hot} tokens from the cache, more than the {p.expected} it shares in "
                                  "full blocks", p.overreach),
                                 ("differs from its cold run beyond rounding", not p.check.invariance.passed),
                                 ("differs from the reference", not p.check.vs_ref.passed)) if bad]
        message = (f"cache pair, shared {p.shared} tokens: the hot request {'; '.join(why)} (first step differing "
                   f"from the cold run: {p.check.first_difference})")
        if not verdict.add(f"shared {p.shared}", p.passed, message):
            print(message)
    print("\n" + run.phases.summary())
    run.phases.report(results)
    return run.finish(verdict)


def main(argv=None, doc=None):
    args, specs = parse_args(argv, doc)
    if args.plan:
        return session.print_plan(args, SCRIPT)
    run = session.Session.open(args, SCRIPT, extra_positions=args.decode_steps, specs=specs)
    if args.cache_pairs:
        return check_cache_pairs(run, specs[0], args.decode_steps)
    pair = [run.engines[s] for s in specs]
    baseline = run.baseline(specs[0]) if args.engines is None else None
    if baseline is not None:
        specs[1], pair[1] = baseline
        run.results.labels["engine"] = ",".join(specs)
    with run.phases("reference_decode"):
        teacher, ref_steps, ref_cached = run.reference_greedy(run.inputs, args.decode_steps)
    outputs = decode_all(run, pair, teacher, ref_steps, ref_cached)
    peer_steps = outputs[id(run.peer)].cached if run.peer is not None else None
    decoded = (outputs[id(pair[0])], outputs[id(pair[1])])
    table = stepwise.comparisons(pair, decoded, ref_steps, peer_steps, run.judge)
    verdict = Verdict("every step CLOSE")
    by_step, steps = judge_steps(run, specs, pair, decoded, teacher, table, verdict)
    overall = judge_all_steps(run, table, by_step, verdict)
    explain(run, specs, pair, steps, overall, baseline is not None)
    sensitivity = run.controls(lambda engine: run_engine(engine, run.inputs, teacher),
                               control_judge(table["a_vs_ref"], ref_steps, peer_steps)) if args.controls else None
    print("\n" + run.phases.summary())
    run.phases.report(run.results)
    if args.repeat:
        del outputs, decoded, table
        verdict.add("memory", run.check_growth(lambda: run_engine(pair[0], run.inputs, teacher), "prefill + decode"),
                    "memory grows with every call")
    return run.finish(verdict, [sensitivity])


def judge_steps(run, specs, pair, decoded, teacher, table, verdict):
    """Each step's table row and outcome, and each engine's departures from the teacher's tokens."""
    results = run.results
    print(f"\nteacher tokens (reference greedy): {teacher.tolist()}")
    for label, spec, engine, column in (("A", specs[0], pair[0], "a_vs_ref"), ("B", specs[1], pair[1], "b_vs_ref")):
        print(f"{label} = {spec} ({dtype_name(engine.dtype)}): {table[column].judge.describe()}")
    for label, spec, d in (("A", specs[0], decoded[0]), ("B", specs[1], decoded[1])):
        if not torch.equal(d.tokens, teacher):
            print(f"{label} = {spec} decodes by itself: its greedy tokens {d.tokens.tolist()}; a step is "
                  "compared with the reference while its tokens so far are the teacher's")
    print("cells: max abs diff / this step's gates (element tolerances, KL max, decisive top-1); "
          "'--': not compared (the engine's tokens left the teacher's)")
    print(HEADER + "\n" + "-" * len(HEADER))
    by_step = [stepwise.step_checks(table, step) for step in range(run.args.decode_steps + 1)]
    steps = [print_step(results, step, checks) for step, checks in enumerate(by_step)]
    for step, checks in enumerate(by_step):
        failing = [f"{name}: {c.reasons()}" for name, c in checks.items() if not c.passed]
        verdict.add(f"step {step}", not failing, f"step {step} is NOT_CLOSE ({failing[0] if failing else ''})")
    for label, spec, d, column in (("A", specs[0], decoded[0], "a_vs_ref"), ("B", specs[1], decoded[1], "b_vs_ref")):
        for divergence in stepwise.divergences(d, teacher, table[column]):
            print_divergence(results, label, spec, divergence)
            verdict.add(f"{label} leaves the teacher", not divergence.decisive,
                        f"engine {label} chose token {divergence.token} at step {divergence.step} (row "
                        f"{divergence.row}) at a decisive position, where the teacher has {divergence.teacher}")
    results.extra["steps"] = steps
    return by_step, steps


def judge_all_steps(run, table, by_step, verdict):
    """Every comparison over all steps together, and the error by decode position where it is gated."""
    results = run.results
    print(f"\nall {len(by_step)} steps together:")
    overall = {name: c.check() for name, c in table.items()}
    results.extra["all_steps"] = {name: print_overall(results, name, check) for name, check in overall.items()}
    for name, check in overall.items():
        verdict.add(f"all steps: {name}", check.passed, f"{name} over all steps together: {check.reasons()}")
    trends = {name: stepwise.trend(by_step, name, check) for name, check in overall.items()}
    trends = {name: t for name, t in trends.items() if t is not None}
    if trends:
        print("\nerror by decode position:")
    for name, t in trends.items():
        print(f"  {name:<8} {t.describe()}" + (f" -> FAIL: {t.reason()}" if not t.passed else
                                              " (last quarter gated)" if t.limit is not None else ""))
        results.add("trend", f"{name}_slope", t.slope, unit="nats/100 steps")
        results.add("trend", f"{name}_kl_first_quarter", t.first_quarter, unit="nats")
        results.add("trend", f"{name}_kl_last_quarter", t.last_quarter, unit="nats")
        results.add("trend", f"{name}_passed", t.passed, unit="bool")
        if t.limit is not None:
            results.add("trend", f"{name}_limit", t.limit, unit="nats")
        verdict.add(f"by decode length: {name}", t.passed, f"the error of {name} by decode step: {t.reason()}")
    results.extra["trends"] = {name: t.as_dict() for name, t in trends.items()}
    return overall


def explain(run, specs, pair, steps, overall, against_baseline):
    """What the failed cache columns and the baseline comparison say (lines only; the outcomes are judged)."""
    for label, spec, column in (("A", specs[0], "a_cache"), ("B", specs[1], "b_cache")):
        if protocol.recomputes_prefix(pair[0 if label == "A" else 1]):
            print(f"note: engine {label} ({spec}) recomputes the whole prefix at every step (it declares "
                  "recomputes_prefix): its cache check had no cache to test")
        bad = stepwise.failed_steps(steps, column)
        if bad:
            print(f"engine {label} ({spec}): its cached logits differ from its own no-cache forward from step "
                  f"{bad[0]} on: a KV-cache bug, not kernel rounding")
    if against_baseline:
        bad = stepwise.failed_steps(steps, "a_vs_b")
        ran = run.results.env["attested"]
        mode = ", ".join(f"{k}={v}" for k, v in ran.get(specs[0], {}).items() if ran[specs[1]].get(k) != v)
        if bad or not overall["a_vs_b"].passed:
            print(f"engine A ({specs[0]}) differs from its baseline, the same engine in its safest mode, "
                  + (f"from step {bad[0]} on" if bad else "over all steps together")
                  + f": its mode ({mode or 'the settings it was given'}) changes the result beyond what A vs B allows")


def control_judge(a_vs_ref, ref_steps, peer_steps):
    """--controls: a control's prefill + decode judged as engine A's was against the reference, every step and
    all steps together -> (passed, the deciding figure)."""
    def judged(decoded, shape):
        c = stepwise.Comparand(decoded.cached, ref_steps, a_vs_ref.judge, peer_steps, decoded.comparable,
                               a_vs_ref.space)
        for step in range(ref_steps.shape[1]):
            at_step = c.check(slice(step, step + 1), aggregate=False)
            if not at_step.passed:
                return False, f"step {step}: {at_step.reasons()}"
        overall = c.check()
        return overall.passed, overall.reasons() or f"within bounds (KL mean {overall.kl_mean:.2e})"
    return judged


