"""The runner every check uses: one Session opens what a check compares and finishes with its exit code.

A Llama check (`Session.open`) resolves the device, the dtype, the checkpoints and the inputs, opens
  * the reference: HF Transformers eager on the CPU in float32 (or float64), resident or streamed,
    behind the reference cache;
  * the engines under test (`--engine`, or the two of `--engines`);
  * the peer that calibrates their verdicts: HF Transformers in the candidate dtype on the device,
    reading the reference's checkpoint.
The peer rule is decided here, once (`decide_peer`): `--peer none` means no peer (the static tables
judge); a candidate that *is* HF Transformers on the reference's checkpoint is the peer itself, so it is
judged by the table and says so; any other candidate gets the peer. `Session.peer_for(engine)` answers
"which peer judges this engine" for every script, and `Session.judge(engine)` returns its Judge.

The Qwen3-MoE benchmarks use the same start (`start`: threads, device, dtype, seed, checkpoint, the
results and their environment, the header) and the same peer rule, with module engines.
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import checkpoints, cli, decode, devices, engines, formats, judges, memory, plan, protocol, refcache, roofline
from . import inputs as kitinputs
from .errors import NotWhatWasAsked, Unavailable, UsageError
from .results import Results, environment
from .verdict import Verdict
from .tiny import DEFAULT_PROMPT

FAMILIES = ("llama", "qwen3_moe")  # what the checks of test/models/llama take
BATCH_LENGTHS = (1, 4, 11, 26, 60, 128, 200, 300)  # batch validation: ragged, from one token to a few hundred
REFERENCE = "reference"  # the engine spec that names the reference itself (`--engines hf,reference`)
PLAN_TOKENS = 1000


# ---- the peer rule, for every script -------------------------------------------------------------

NO_PEER, SELF_PEER, OWN_PEER = "none", "self", "peer"


def decide_peer(peer_flag, candidate_is_peer):
    """NO_PEER (`--peer none`), SELF_PEER (the candidate is the peer: judged by the table) or OWN_PEER (build
    the peer and calibrate by it)."""
    if peer_flag == "none":
        return NO_PEER
    return SELF_PEER if candidate_is_peer else OWN_PEER


# ---- flags and inputs -----------------------------------------------------------------------------


def _reference_dtype(name):
    dtype = devices.parse_dtype(name)
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"--reference_dtype {name}: the reference computes in float32 or float64")
    return dtype


def build_parser(doc, decode=False, batch=False):
    """The flags of the four Llama checks."""
    p = cli.ArgumentParser(description=doc)
    p.add_argument("--model_path", help="HF checkpoint directory (default: the kit's embedded tiny Llama)")
    p.add_argument("--reference_path", help="checkpoint of the reference (default: --model_path)")
    p.add_argument("--engine", default="hf", help="hf | compile | llama.cpp | infinilm | vllm | "
                                                  "openai:http://HOST:PORT/v1 | package.module:Class | file.py:Class")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"], help="attention of the hf/compile engine")
    p.add_argument("--dtype", default="bfloat16", type=devices.candidate_dtype,
                   help="candidate dtype: float32 | bfloat16 | float16 (default bf16)")
    p.add_argument("--reference_dtype", default="float32", type=_reference_dtype,
                   help="dtype of the CPU reference: float32 (default) | float64")
    p.add_argument("--reference_mode", default="auto", choices=["auto", "resident", "streamed"],
                   help="auto (default): the reference resident in memory when it fits, else streamed layer by "
                        "layer from the safetensors shards (Llama, Qwen3-MoE; the same logits bit for bit, about one "
                        "layer of memory, the weights read again on every forward)")
    p.add_argument("--no_reference_cache", action="store_true",
                   help="compute the reference every time instead of reusing $LLM_KIT_CACHE/reference (keyed by "
                        "checkpoint, inputs, reference dtype and library versions)")
    p.add_argument("--reference_cache_gb", type=float, default=refcache.DEFAULT_MAX_BYTES / 2**30,
                   help=f"size bound of the reference cache, oldest entries removed first "
                        f"(default {refcache.DEFAULT_MAX_BYTES / 2**30:g})")
    p.add_argument("--against", default="reference", choices=["reference", "format"],
                   help="reference (default): HF float32 on the CPU; format: the candidate's number format's exact value "
                        "(HF float64 with its declared format simulated, kitcore/formats.py) and the peer that format "
                        "in the candidate's precision: faithfulness to the format, layer by layer, without its cost")
    p.add_argument("--peer", default="hf", choices=["hf", "none"],
                   help="hf (default): judge the candidate against a correct peer measured in this run, HF "
                        "Transformers in --dtype on the device (kitcore/judges.py); none: the static table")
    devices.add_device_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompts-file", dest="prompts_file", help="one prompt per line: a padded batch")
    if batch:
        p.add_argument("--lengths", default=",".join(map(str, BATCH_LENGTHS)),
                       help="token lengths of the prompts: windows of real text, or random ids with --inputs random "
                            f"(default {','.join(map(str, BATCH_LENGTHS))})")
    else:
        group.add_argument("--prompt", default=None, help="prompt text (default: an English sentence)")
        group.add_argument("--input_ids", help="comma-separated token ids instead of a prompt, e.g. 1,2,3")
        group.add_argument("--edge", choices=list(kitinputs.EDGE_CASES),
                           help="an edge input instead of the prompt: " + "; ".join(
                               f"{k}: {v}" for k, v in kitinputs.EDGE_CASES.items()))
    p.add_argument("--inputs", default="text", choices=["text", "random"],
                   help="text (default): the prompt(s); random: token ids drawn with --seed (no tokenizer needed)"
                        + ("" if batch else f", {kitinputs.RANDOM_PROMPT_TOKENS} of them"))
    p.add_argument("--seed", type=int, default=0, help="seed for anything random (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); recorded")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH (atomically)")
    p.add_argument("--plan", action="store_true",
                   help="print what this check would need (memory of the reference and the candidate, reference "
                        "cache per 1k tokens, an estimated reference time), from config.json alone, and exit")
    p.add_argument("--engine_args", metavar="JSON",
                   help="settings handed to the engine, a JSON object, e.g. '{\"max_cache_len\": 4096}' "
                        "(the engines that take them name their keys; any other engine refuses them)")
    p.add_argument("--require", action="append", default=[], metavar="KEY=VALUE",
                   help="fail unless the engine under test attests that it ran with KEY=VALUE (what it read back "
                        "after loading, printed as 'ran:'; e.g. attn_implementation=sdpa); repeatable")
    if decode:
        p.add_argument("--decode_steps", type=int, default=8, help="teacher-forced decode steps (default 8)")
    for title, flags in engines.flag_groups():
        group = p.add_argument_group(title)
        for name, settings in flags:
            group.add_argument(name, **settings)
    return p


def add_controls_arg(parser):
    parser.add_argument("--controls", action="store_true",
                        help="also run the negative controls (kitcore/controls.py): one more copy of the peer with one "
                             "planted bug at a time, judged like the candidate; a table of what this check catches "
                             "here and a sensitivity line (costs one more model and one more call per control)")


def blind_spot(judge, controls, also_float32):
    """The line under an end-to-end PASS in reduced precision when --controls did not measure what it sees:
    what the controls measured for that judge (README, "What a PASS cannot see")."""
    if controls or judge.distribution or judge.dtype == torch.float32:
        return None
    name = devices.dtype_name(judge.dtype)
    if judge.calibrated:
        seen = (f"note: a {name} end-to-end PASS, calibrated by the peer: on SmolLM2 in bfloat16 this check caught "
                "no single-layer weight error up to 10% and of the bug shapes only swapped KV heads")
    else:
        seen = (f"note: judged by the static {name} table, which on the tiny Llama caught none of the planted bugs "
                "of --controls: this PASS does not rule out swapped KV heads, a RoPE layout mix-up or a 10% weight "
                "error in one layer")
    float32 = "every control from 0.3% on the tiny Llama and SmolLM2"
    further = (f"the float32 check above passed too, and in float32 this check caught {float32}: the model's logic "
               f"is right to that size, what it cannot see is a bug only in the {name} kernels" if also_float32
               else f"--also_float32 adds a float32 check, which caught {float32}")
    return f"{seen}; --controls measures what it sees here; {further}; intermediate validation locates " \
           "single-layer faults"


def add_tokenization_arg(parser):
    parser.add_argument("--tokenization", action="store_true",
                        help="also check the engine's own input path (kitcore/tokenization.py): the ids it computes "
                             "from the prompt as text and as a chat message, and its stop tokens, against the "
                             "checkpoint's tokenizer and generation_config.json")


def check_tokenization_args(args):
    """--tokenization needs a text prompt: refused before anything loads when the inputs are ids."""
    if args.tokenization and (args.input_ids or args.edge or args.prompts_file or args.inputs == "random"):
        raise UsageError("--tokenization checks how the engine tokenises text: give --prompt TEXT (or the default "
                         "prompt), not --input_ids / --edge / --prompts-file / --inputs random")


def add_repeat_arg(parser, what):
    parser.add_argument("--repeat", type=int, default=0, metavar="N",
                        help=f"after the check, run the candidate's {what} N more times and report how its live "
                             "memory grows per call (device allocator, or RSS on the CPU); growth above "
                             f"{memory.LEAK_BYTES_PER_ITERATION // 1024} KiB per call fails as a leak (0: off)")


def _lengths(text):
    try:
        lengths = [int(n) for n in text.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--lengths {text!r}: expected positive comma-separated integers, e.g. 1,4,11")
    return lengths


def _prompts(prompts_file, prompt):
    if not prompts_file:
        return [DEFAULT_PROMPT if prompt is None else prompt]
    try:
        prompts = [ln.rstrip("\n") for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise UsageError(f"--prompts-file {prompts_file}: {exc.strerror}") from None
    if not prompts:
        raise UsageError(f"--prompts-file {prompts_file}: no prompts (one per line)")
    return prompts


def build_inputs(args, checkpoint, extra_positions=0):
    """Token ids from --input_ids, --prompts-file, --edge, --inputs random or --prompt, left-padded into a
    batch and checked against the checkpoint's vocabulary and context."""
    cfg = checkpoint.config
    prompt, input_ids, edge = (getattr(args, name, None) for name in ("prompt", "input_ids", "edge"))
    if args.inputs == "random" and (prompt is not None or args.prompts_file or edge):
        raise UsageError("--inputs random replaces the prompt; drop --prompt / --prompts-file / --edge")
    lengths = _lengths(args.lengths) if getattr(args, "lengths", None) and not args.prompts_file else None
    if input_ids is not None:
        try:
            rows = [[int(t) for t in input_ids.split(",") if t.strip()]]
        except ValueError:
            raise UsageError(f"--input_ids {input_ids!r}: expected comma-separated integers, e.g. 1,2,3") from None
    elif edge:
        rows = [kitinputs.edge_row(edge, cfg, checkpoint.path, extra_positions)]
    elif args.inputs == "random":
        rows = kitinputs.random_rows(lengths or [kitinputs.RANDOM_PROMPT_TOKENS], cfg["vocab_size"], args.seed)
    elif lengths:
        rows = kitinputs.text_rows(kitinputs.tokenizer(checkpoint.path), lengths)
    else:
        prompts = _prompts(args.prompts_file, prompt)
        if any(not p.strip() for p in prompts):
            raise UsageError("empty prompt; give some text with --prompt")
        encode = kitinputs.tokenizer(checkpoint.path)
        rows = [encode(p) for p in prompts]
    kitinputs.check_rows(rows, cfg, extra_positions)
    return kitinputs.pad(rows)


# ---- --plan -------------------------------------------------------------------------------------


def print_plan(args, script):
    """--plan: the figures of kitcore.plan for --model_path's config.json (no weights needed)."""
    if args.model_path is None:
        raise UsageError("--plan needs --model_path: a directory with the model's config.json")
    path = Path(args.model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"--plan: cannot read {path}; give a directory holding the model's config.json") from None
    if cfg.get("model_type") not in FAMILIES:
        raise UsageError(f"--plan: model_type {cfg.get('model_type')!r} is not one of {', '.join(FAMILIES)}")
    cpu = devices.Device("cpu", "cpu")
    ceilings = roofline.ceilings_for(cpu, ["float32"])
    p = plan.make_plan(cfg, devices.dtype_name(args.dtype), PLAN_TOKENS, ceilings)
    gib = 2**30
    print(f"{script} --plan: {path} ({p.model_type}, {p.parameters / 1e9:.2f}B parameters, "
          f"{p.active_parameters_per_token / 1e9:.2f}B active per token, {p.layers} layers)")
    print(f"  reference (float32): resident {p.reference_bytes_resident / gib:.1f} GiB; per layer "
          f"{p.reference_bytes_per_layer / gib:.2f} GiB; streamed (one layer + embedding + LM head) "
          f"{p.reference_bytes_streamed / gib:.2f} GiB")
    print(f"  candidate ({devices.dtype_name(args.dtype)}): {p.candidate_bytes / gib:.1f} GiB")
    ranks = getattr(args, "tensor_parallel_size", 1) or 1
    if ranks > 1:  # the decoder layers' matrices split over the ranks, the embeddings, LM head and norms on each
        per_rank = p.candidate_bytes * (p.layers * p.parameters_per_layer / ranks + p.parameters - p.layers
                                        * p.parameters_per_layer) / p.parameters
        print(f"  over {ranks} ranks: about {per_rank / gib:.2f} GiB each, {ranks * per_rank / gib:.1f} GiB together")
    print(f"  reference cache per 1k tokens: logits {p.reference_cache_bytes_per_1k_tokens / 2**20:.0f} MiB, "
          f"every capture point {p.capture_cache_bytes_per_1k_tokens / gib:.2f} GiB")
    print(f"  estimated reference forward of {p.tokens} tokens on this CPU: {p.estimated_reference_seconds:.0f} s "
          f"(from {ceilings.describe('float32')})")
    available = plan.available_memory_bytes()
    if available:
        print(f"  this machine: {available / gib:.1f} GiB available; resident reference "
              + ("fits" if p.reference_bytes_resident + p.candidate_bytes < plan.RESIDENT_MEMORY_SHARE * available
                 else "does NOT fit"))
    if args.json:
        from .results import write_json_atomic

        write_json_atomic(args.json, {"script": script, "plan": p.as_dict(), "available_memory_bytes": available,
                                      "ceilings": ceilings.fingerprint})
    return 0


# ---- the common start -----------------------------------------------------------------------------


def start(args, script, labels, checkpoint_path, families, default_seed=0):
    """What every check does first: CPU threads, device, dtype (checked against the device), the seed, the
    checkpoint, and the Results with the environment recorded. Returns (device, dtype, checkpoint, results)."""
    devices.set_threads(args.threads)
    device = devices.resolve_device(args)
    dtype = args.dtype
    device.check_dtype(dtype)
    torch.manual_seed(args.seed)
    checkpoint = checkpoints.resolve_checkpoint(checkpoint_path, families, default_seed)
    results = Results(script, labels=labels)
    results.env = environment(device, dtype, args.seed, checkpoint)
    return device, dtype, checkpoint, results


@dataclass
class FreeRunCheck:
    """A free-running decode judged against another free run of the same prompt and the reference
    (Session.judge_free_run)."""

    invariance: judges.Invariance
    vs_ref: judges.LogitsCheck
    agree: int  # steps (the prefill's last position included) whose tokens agree with the other run's
    follows: int  # steps compared with the reference
    first_difference: int  # the first step (0: the prefill's last position) where the two runs differ at all

    @property
    def passed(self):
        return self.invariance.passed and self.vs_ref.passed


@dataclass
class Session:
    """One Llama check's reference, engines under test and peer, and how each is judged."""

    args: object
    results: Results
    device: devices.Device
    dtype: torch.dtype
    checkpoint: checkpoints.Checkpoint
    reference_checkpoint: checkpoints.Checkpoint
    inputs: kitinputs.Inputs
    reference: engines.HFEngine
    engines: dict  # spec -> engine, for every engine under test
    peer: object  # the correct peer (HF in the candidate dtype on the device), or None: table verdicts
    phases: memory.Phases  # wall time and peak memory of each phase
    options: dict  # what engines.load_engine was given for the engines under test

    @property
    def candidate(self):
        return next(iter(self.engines.values()))

    @property
    def reference_components(self):
        """The reference engine, where it can run single components (the dual test's input-rounding floor,
        kitcore.judges.judge_own); None for a streamed reference, which holds no weights between forwards."""
        engine = self.reference.engine if isinstance(self.reference, refcache.CachedReference) else self.reference
        return engine if "run_component" in protocol.capabilities(engine) else None

    def peer_for(self, engine):
        """The peer that calibrates `engine`'s verdict: None when there is none, or when it is the peer (a format's
        simulation calibrates only an engine of that format)."""
        if self.peer is None or engine is self.peer or engine is self.reference:
            return None
        if isinstance(self.peer, formats.FormatEngine) and protocol.declared(engine, "format") != self.peer.format:
            return None
        return self.peer

    def judge(self, engine):
        """How `engine` is judged: calibrated by the peer, unless it is the peer itself or there is none, or
        the engine computes in a precision below the peer's (llama.cpp's f16 cache beside f32 weights: the
        peer rounds less than it and cannot calibrate it; its precision's table judges)."""
        if engine is self.reference:
            return judges.Judge(engine.dtype, judges.TOLERANCES[engine.dtype])
        peer = self.peer_for(engine)
        judged = protocol.declared(engine, "judged_dtype") or engine.dtype
        return judges.judge_for(engine, self.checkpoint.model_type,
                                calibrated=peer is not None and judged == peer.dtype,
                                by_format=isinstance(peer, formats.FormatEngine))

    def baseline(self, spec):
        """Engine `spec` in its safest mode (engines protocol: baseline()), loaded, described and attested like
        the engines under test: (its label, the engine), or None when the engine has none or already runs so."""
        engine = self.engines[spec]
        if "baseline" not in protocol.capabilities(engine):
            return None
        with self.phases("baseline_load"):
            plain = engine.baseline()
        if plain is None:
            return None
        label = f"{spec} baseline"
        print(f"  {label}: {protocol.declared(plain, 'description') or type(plain).__name__}")
        self.results.env.setdefault("engines", {})[label] = protocol.declared(plain, "description") or type(plain).__name__
        attest(self.results, label, plain)
        return label, plain

    def run_all(self, what, call):
        """`call(engine)` on the reference, the candidate and its peer (when it has one), each in a phase of
        its own (`reference_<what>` ...): (reference output, candidate output, peer output or None)."""
        with self.phases(f"reference_{what}"):
            reference = call(self.reference)
        with self.phases(f"candidate_{what}"):
            candidate = call(self.candidate)
        peer = self.peer_for(self.candidate)
        if peer is not None:
            with self.phases(f"peer_{what}"):
                peer = call(peer)
        return reference, candidate, peer

    def reference_greedy(self, inp, steps):
        """The reference's teacher tokens, no-cache logits and cached logits (kitcore.decode.greedy_reference),
        from the reference cache when this prompt was decoded before."""
        names = ("teacher", "logits", "cached")
        compute = lambda: dict(zip(names, decode.greedy_reference(self.reference, inp, steps)))  # noqa: E731
        memo = getattr(self.reference, "memo", None)
        out = memo(f"greedy{steps}-cached", (inp.input_ids, inp.position_ids, inp.attention_mask), compute) \
            if memo else compute()
        return tuple(out[n] for n in names)

    def judge_free_run(self, engine, ids, run, other, judge):
        """One prompt `ids` decoded greedily by `engine` by itself (generate(): `run` = (tokens [steps],
        logprobs [steps + 1, V])) against another free run of the same prompt on the same engine (`other`:
        alone, or cold) and against the reference. Invariance for the steps whose tokens agree with the
        other run's; the reference (calibrated by the peer, teacher-forced on the reference's greedy tokens)
        for the steps whose tokens follow the reference's, the step where they part included (a flip at a
        decisive position fails)."""
        (tokens, got), (other_tokens, other_got) = run, other
        steps, space = len(tokens), judges.output_space(engine)
        agree = 1 + int((tokens == other_tokens).long().cumprod(0).sum())
        row = kitinputs.pad([ids])
        teacher, reference, _ = self.reference_greedy(row, steps)
        follows = min(1 + int((tokens == teacher[0]).long().cumprod(0).sum()), steps + 1)
        peer = self.peer_for(engine)
        peer_steps = None if peer is None else decode.no_cache_steps(peer, row, teacher)[:, :follows]
        differs = ((got[:agree] != other_got[:agree]) & ~(got[:agree].isnan() & other_got[:agree].isnan())).any(-1)
        return FreeRunCheck(
            invariance=judges.judge_invariance(got[:agree], other_got[:agree], None, judge, space),
            vs_ref=judges.check_logits(got[None, :follows], reference[:, :follows], torch.ones(1, follows), judge,
                                       peer_steps, aggregate=False, space=space),
            agree=agree, follows=follows,
            first_difference=int(differs.nonzero()[0]) if bool(differs.any()) else agree)

    def check_growth(self, call, what):
        """`--repeat N`: run `call` N times, report live memory per call; False when it grows like a leak."""
        repeat = self.args.repeat
        if repeat < 3:
            raise UsageError(f"--repeat {repeat}: at least 3 calls are needed to tell growth from warm-up")
        growth = memory.repeat_growth(call, self.device, repeat)
        leaking = growth.leaking
        print(f"\nmemory over --repeat {repeat} candidate {what} calls: {growth.describe()} -> "
              + ("FAIL: it grows with every call (a leak: caches, outputs or buffers kept)" if leaking else "ok"))
        kind, results = self.device.memory_kind, self.results
        results.add("repeat", "memory_growth_per_call", growth.per_iteration, unit="bytes", memory=kind)
        results.add("repeat", "memory_first_call", growth.samples[0], unit="bytes", memory=kind)
        results.add("repeat", "memory_last_call", growth.samples[-1], unit="bytes", memory=kind)
        results.add("repeat", "passed", not leaking, unit="bool")
        results.extra["repeat"] = {"calls": repeat, "samples_bytes": growth.samples,
                                   "growth_per_call_bytes": growth.per_iteration, "leaking": leaking, "memory": kind}
        return not leaking

    def check_tokenization(self):
        """The engine's own input path (kitcore.tokenization) for the prompt: printed, recorded; passed."""
        from . import tokenization

        engine = self.candidate
        if "tokenize" not in protocol.capabilities(engine):
            raise Unavailable(f"--tokenization: engine {self.args.engine} does not tokenise text itself (no "
                              "tokenize(); see the engine protocol in tools/kitcore/protocol.py)")
        prompt = DEFAULT_PROMPT if self.args.prompt is None else self.args.prompt
        checks, skipped = tokenization.check_engine(engine, self.reference_checkpoint.path, prompt)
        print("\nthe engine's own input path (text in, the ids it used):")
        for c in checks:
            print(f"  {'ok  ' if c.passed else 'FAIL'} {c.message}")
            self.results.add("tokenization", c.kind.replace(" ", "_"), c.passed, unit="bool")
        for line in skipped:
            print(f"  skipped {line}")
        self.results.extra["tokenization"] = {"checks": [vars(c) for c in checks], "skipped": skipped}
        return all(c.passed for c in checks)

    def in_dtype(self, dtype):
        """This session with its engines under test and its peer loaded again in `dtype` (`--also_float32`):
        the same reference, inputs, results and phases; the peer rule as before (the candidate that was the
        peer is the peer again). In `dtype` throughout: llama.cpp's weights and KV cache too (--gguf_type and
        --kv_type do not carry over)."""
        name = devices.dtype_name(dtype)
        options = dict(self.options, gguf_type=None, kv_type="f32")
        with self.phases(f"{name}_load"):
            loaded = {spec: engine if engine is self.reference else engines.load_engine(
                spec, self.checkpoint.path, self.device, dtype, self.args.attn, options)
                for spec, engine in self.engines.items()}
            self_peer = [spec for spec, engine in self.engines.items() if engine is self.peer]
            peer = (None if self.peer is None else loaded[self_peer[0]] if self_peer
                    else _build_peer(self.args, self.reference_checkpoint, self.device, dtype, self.candidate,
                                     every_format=self.args.against == "format")[0])
        self.results.env.setdefault("engines", {}).update(
            {f"{spec} {name}": engine.description for spec, engine in loaded.items()
             if protocol.declared(engine, "description")})
        for spec, engine in loaded.items():
            if engine is not self.reference:
                attest(self.results, f"{spec} {name}", engine)
        labels = {"dtype": name, "gguf_type": None, "kv_type": None}  # what the records of this dtype ran with
        return replace(self, dtype=dtype, engines=loaded, peer=peer, results=self.results.labelled(**labels))

    def controls(self, call, judge_output, case="controls"):
        """The negative controls (kitcore.controls) on a copy of the peer: the table, the sensitivity line and
        their records (under `case`). Never part of the verdict: a control that is not caught is what this
        check cannot see."""
        from . import controls

        with self.phases("controls_load"):
            engine = engines.HFEngine(str(self.reference_checkpoint.path), self.device, self.dtype, self.args.attn,
                                      self.args.device_map)
        with self.phases("controls"):
            found = controls.run_controls(engine, call, judge_output)
        del engine
        print(f"\nnegative controls (the peer in {devices.dtype_name(self.dtype)} with one planted bug each, judged "
              "like the candidate):")
        for r in found:
            print(f"  {r.name:<50} {'caught' if r.caught else 'NOT caught':<11} {r.figure}")
            self.results.add(case, "caught", r.caught, unit="bool", control=r.name)
        line = controls.sensitivity(found)
        self.results.extra[case] = {"table": [vars(r) for r in found], "sensitivity": line}
        return line

    def finish(self, verdict, notes=()):
        """The verdict (a kitcore.verdict.Verdict): the reference cache's figures into the environment, the
        verdict line with `notes` under it, the exit code."""
        read = getattr(self.reference, "bytes_read", None)
        if read is not None:  # a streamed reference: what it read from the shards, every forward together
            self.results.env["reference_bytes_read"] = read
        cache = getattr(self.reference, "cache", None)
        if cache is not None and cache.hits + cache.misses:
            self.results.env["reference_cache"] = cache.summary()
            if cache.hits and not cache.misses and self.results.env.get("reference_source"):
                self.results.env["reference_source"] = "cache"
            print(f"reference cache: {cache.hits} hit(s), {cache.misses} miss(es)"
                  + (f", {cache.rejected} entry(ies) rejected and recomputed" if cache.rejected else "")
                  + f" ({cache.root})")
        return self.results.finish(verdict, self.args.json, notes)

    # ---- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, args, script, extra_positions=0, families=FAMILIES, specs=None):
        """Set-up of a Llama check: device, dtype, checkpoints, inputs, the reference, the engines under test
        (`specs`, default [--engine]) and the peer that calibrates their verdicts."""
        specs = specs or [args.engine]
        dtype_name, reference_dtype_name = devices.dtype_name(args.dtype), devices.dtype_name(args.reference_dtype)
        labels = {"device": None, "dtype": dtype_name, "engine": ",".join(specs), "attn": args.attn}
        if args.gguf_type:
            labels["gguf_type"] = args.gguf_type
        if args.kv_type != "f32":
            labels["kv_type"] = args.kv_type
        if args.engine_args:  # the engine's own settings change its figures: records pair on them too
            labels["engine_args"] = json.dumps(engine_args(args.engine_args), sort_keys=True, separators=(",", ":"))
        device, dtype, checkpoint, results = start(args, script, labels, args.model_path, families,
                                                   args.seed if args.model_path is None else 0)
        results.labels["device"] = str(device)
        reference_checkpoint = (checkpoints.open_checkpoint(args.reference_path, families) if args.reference_path
                                else checkpoint)
        inputs = build_inputs(args, reference_checkpoint, extra_positions)
        results.env["reference"] = {"checkpoint": str(reference_checkpoint.path),
                                    "checkpoint_hash": reference_checkpoint.fingerprint,
                                    "device": "cpu", "dtype": reference_dtype_name, "attn": "eager"}
        env = results.env
        print(f"{script}: engine={','.join(specs)} attn={args.attn} device={env['device_name']} dtype={dtype_name} "
              f"seed={args.seed} threads={env['threads']}")
        print(f"  checkpoint {checkpoint.path} (hash {env['checkpoint_hash']}); reference: HF eager "
              f"{reference_dtype_name} on cpu from {reference_checkpoint.path}")
        print(f"  torch {env['torch']}, transformers {env['transformers']}; input: {tuple(inputs.input_ids.shape)} "
              f"tokens (batch x length)")
        if reference_checkpoint.truncation_note():
            print(f"  {reference_checkpoint.truncation_note()}")
        same_checkpoint = checkpoint.path.resolve() == reference_checkpoint.path.resolve()
        under_test = [s for s in specs if s != REFERENCE]
        # plain `--engine hf` on the reference's checkpoint *is* the peer
        self_peer_spec = "hf" if "hf" in under_test and same_checkpoint and args.tensor_parallel_size == 1 else None
        peer_kind = decide_peer(args.peer, bool(under_test) and all(s == self_peer_spec for s in under_test))
        phases = memory.Phases(device)
        if args.against == "reference":
            source, why = plan.choose_reference(reference_checkpoint.config, dtype_name,
                                                _models_in_memory(under_test, device, peer_kind, self_peer_spec),
                                                reference_dtype_name, args.reference_mode)
            print(f"  reference source: {source} ({why})")
            results.env["reference_source"] = source
            with phases("reference_load"):
                reference_class = engines.StreamedHFEngine if source == "streamed" else engines.HFEngine
                reference = reference_class(str(reference_checkpoint.path), devices.Device("cpu", "cpu"),
                                            args.reference_dtype, "eager")
            if not args.no_reference_cache:
                cache = refcache.ReferenceCache(reference_checkpoint, reference_dtype_name,
                                                int(args.reference_cache_gb * 2**30))
                reference = refcache.CachedReference(reference, cache)
        # n_ctx: the positions this check uses, for engines that allocate their context up front
        options = {**engines.flag_options(args), "engine_args": engine_args(args.engine_args),
                   "reference_path": str(reference_checkpoint.path),
                   "n_ctx": inputs.input_ids.shape[1] + extra_positions}
        with phases("candidate_load"):
            loaded = {spec: engines.load_engine(spec, checkpoint.path, device, dtype, args.attn, options)
                      for spec in under_test}
        if args.against == "format":
            with phases("reference_load"):
                reference = _format_reference(reference_checkpoint, loaded[under_test[0]], specs[0], results)
        loaded = {spec: reference if spec == REFERENCE else loaded[spec] for spec in specs}
        for spec, engine in loaded.items():
            if protocol.declared(engine, "description"):
                print(f"  {spec}: {engine.description}")
                results.env.setdefault("engines", {})[spec] = engine.description
        results.env["attested"] = {}
        attested = {spec: attest(results, spec, engine) for spec, engine in loaded.items() if spec != REFERENCE}
        check_requirements(args.require, attested)
        if peer_kind == NO_PEER:
            peer, note = None, "none (--peer none): verdicts from the static table"
        elif peer_kind == SELF_PEER:
            peer, note = loaded[self_peer_spec], ("the candidate is HF Transformers itself, the peer: judged by the "
                                                  "static table (measured on the tiny and the real checkpoint)")
        elif self_peer_spec:
            peer, note = loaded[self_peer_spec], _peer_note(dtype_name, args.attn, device)
        else:
            with phases("peer_load"):
                peer, note = _build_peer(args, reference_checkpoint, device, dtype, loaded[under_test[0]],
                                         every_format=args.against == "format")
        print(f"  peer: {note}")
        results.env["peer"] = note
        return cls(args, results, device, dtype, checkpoint, reference_checkpoint, inputs, reference, loaded, peer,
                   phases, options)


def _peer_note(dtype_name, attn, device):
    return (f"HF Transformers {dtype_name} {attn} on {device} from the reference checkpoint: verdicts calibrated "
            f"by its error (k={judges.PEER_K:g})")


def _format_reference(checkpoint, candidate, spec, results):
    """`--against format`: the reference is the candidate's format's exact value, HF float64 eager on the CPU with
    that format simulated (kitcore.formats): what is checked is faithfulness to the format, not its cost."""
    fmt = protocol.declared(candidate, "format")
    if not fmt:
        raise UsageError(f"--against format: engine {spec} declares no format (kitcore/formats.py); check it "
                         "--against reference")
    simulated, why = formats.simulated(fmt, checkpoint.config)
    if not simulated:
        raise Unavailable(f"--against format: {fmt} is not simulated here ({why})")
    print(f"  reference: the format's exact value, HF float64 eager on cpu with {fmt} simulated "
          f"({formats.describe(fmt)})")
    results.env["reference"].update(dtype="float64", format=fmt)
    results.env["reference_source"] = "format"
    return formats.FormatEngine(str(checkpoint.path), devices.Device("cpu", "cpu"), torch.float64, "eager", format=fmt)


def _build_peer(args, reference_checkpoint, device, dtype, candidate, every_format=False):
    """The peer of `candidate` and the line that says what it is: HF Transformers in `dtype` on the device, with
    the candidate's weight format simulated where it declares one the kit simulates (kitcore.formats); with
    `every_format` (--against format) any format it declares."""
    declared = protocol.declared(candidate, "format")
    fmt = (declared if every_format else formats.peer_format(declared, reference_checkpoint.config))
    if fmt:
        judged = protocol.declared(candidate, "judged_dtype") or dtype
        peer = formats.FormatEngine(str(reference_checkpoint.path), device, judged, args.attn, format=fmt)
        return peer, (f"HF Transformers {devices.dtype_name(judged)} {args.attn} on {device} with the engine's format "
                      f"simulated ({fmt}: {formats.describe(fmt)}): KL limits k^2 x its (k={judges.PEER_K:g})")
    engine = engines.HFEngine(str(reference_checkpoint.path), device, dtype, args.attn, args.device_map)
    note = _peer_note(devices.dtype_name(dtype), args.attn, device)
    ranks = protocol.declared(candidate, "ranks")
    if ranks:
        from .parallel import sum_as_ranks

        sum_as_ranks(engine.model, ranks)
        note += (f"; in one process, adding its {'experts and ' if ranks['expert_parallel'] else ''}row-parallel "
                 f"sums over {ranks['tensor_parallel_size']} ranks in {devices.dtype_name(dtype)} as the all-reduce does")
    simulated, why = formats.simulated(declared, reference_checkpoint.config) if declared else (True, "")
    if not simulated:
        note += f"; format {declared} not simulated here ({why})"
    return engine, note


def attest(results, label, engine):
    """What `engine` says it ran (protocol.attested): printed as `label ran: ...`, recorded in env.attested."""
    ran = protocol.attested(engine)
    if ran:
        print(f"  {label} ran: {', '.join(f'{k}={v}' for k, v in ran.items())}")
    results.env["attested"][label] = ran
    return ran


def check_requirements(requirements, attested):
    """--require KEY=VALUE against what every engine under test attests (protocol.attested): a different
    value fails the check (NotWhatWasAsked, exit 1), a key it does not attest cannot be verified (exit 3)."""
    for requirement in requirements:
        key, sep, want = requirement.partition("=")
        if not sep or not key:
            raise UsageError(f"--require {requirement!r}: expected KEY=VALUE, e.g. attn_implementation=sdpa")
        for spec, ran in attested.items():
            if key not in ran:
                raise Unavailable(f"--require {requirement}: engine {spec} does not attest {key!r} (it attests: "
                                  f"{', '.join(ran) or 'nothing'}); the requirement cannot be verified")
            if ran[key].lower() != want.lower():
                raise NotWhatWasAsked(f"--require {requirement}: engine {spec} ran {key}={ran[key]}, not {want}: "
                                      "it did not run what was asked")


def engine_args(text):
    """--engine_args JSON -> a dict (None without the flag)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--engine_args {text!r}: not JSON ({exc.msg}); give an object, e.g. "
                         "'{\"max_cache_len\": 4096}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"--engine_args {text!r}: expected a JSON object of settings, e.g. '{{\"key\": 1}}'")
    return value


def _models_in_memory(under_test, device, peer_kind, self_peer_spec):
    """How many copies of the model in the candidate dtype this process holds in CPU memory besides the
    reference: each candidate on the CPU (a server holds its own elsewhere), and the peer unless a candidate
    is the peer or there is none. Candidates on an accelerator load straight onto it."""
    if device.type != "cpu":
        return 0
    held = sum(1 for s in under_test if not s.startswith("openai:"))
    return held + int(peer_kind == OWN_PEER and self_peer_spec is None)


# ---- the logits check's lines ---------------------------------------------------------------------


def record_logits_check(results, case, check, **labels):
    for metric in ("max_abs", "mean_abs", "nmse", "cosine"):
        results.add(case, metric, getattr(check.comparison, metric), **labels)
    results.add(case, "top1_agreement", check.top1_agreement, unit="fraction", **labels)
    results.add(case, "top5_containment", check.top5_containment, unit="fraction", **labels)
    results.add(case, "decisive_top1_disagreements", check.decisive_disagreements, unit="count", **labels)
    for metric in ("kl_mean", "kl_p99", "kl_max"):
        results.add(case, metric, getattr(check, metric), unit="nats", **labels)
    if check.peer:
        for metric, value in check.peer.items():
            results.add(case, f"peer_{metric}", value, unit="nats" if metric.startswith("kl") else "-", **labels)
    results.add(case, "passed", check.passed, unit="bool", **labels)


def print_logits_check(check, vocab):
    """The human paragraph of one logits check."""
    c = check.comparison
    what = {"logits": "logits", "logprobs": "log-probabilities (the reference's and the peer's log-softmaxed)",
            "topk": "top-k log-probabilities (only the tokens the engine returned)"}[check.space]
    print(f"\n{what} at {check.positions} positions (vocab {vocab}), judged by {check.judge.describe()}:")
    if check.skipped_positions:
        print(f"  {check.skipped_positions} position(s) the engine returned nothing for: left out")
    if check.distribution:
        print(f"  max abs {c.max_abs:.3e}, mean abs {c.mean_abs:.3e}, nmse {c.nmse:.3e}, cosine {c.cosine:.9f}")
    else:
        print("  " + c.message().replace("\n", "\n  "))
    if check.position_failures:
        print(f"  {check.position_failures} position(s) above the peer's bound; worst at position {check.worst_position}")
    print(f"  top-1 agreement {check.top1_agreement:.4f}; decisive positions {check.decisive_positions}, "
          f"decisive disagreements {check.decisive_disagreements}; top-5 containment {check.top5_containment:.4f}")
    kl = ("KL lower bound (over the tokens it returned)" if check.space == "topk"
          else "KL(reference || candidate)")
    print(f"  {kl} per position: mean {check.kl_mean:.3e}, p99 {check.kl_p99:.3e}, max {check.kl_max:.3e}")
    if check.peer:
        p = check.peer
        print(f"  peer vs reference: max abs {p['max_abs']:.3e}, nmse {p['nmse']:.3e}, "
              f"KL mean {p['kl_mean']:.3e}, max {p['kl_max']:.3e}")


def print_timings(phases, started):
    """The check's own cost: its wall time (after imports) over the loads and forwards it timed. Returns it."""
    work = sum(phases.seconds.values())
    wall = time.perf_counter() - started
    print("  timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.seconds.items())
          + f"; check wall {wall:.3f}, wall / (loads + forwards) = {wall / work:.2f}")
    print("  " + phases.summary())
    return wall


# ---- the Qwen3-MoE benchmarks: one block of one layer, module engines ------------------------------

ROOFLINE_HELP = """Distance to the limit (kitcore/roofline.py): every row adds roofline_ms = max(bytes / bandwidth,
FLOPs / matmul throughput), with the device's ceilings measured once and cached (tools/device_ceilings.py),
bound=memory|compute (which term is larger) and roofline_fraction = roofline_ms / median."""


def bench_parser(doc, impl_flag, impl_choices, impl_default):
    """The flags both Qwen3-MoE benchmarks share."""
    p = cli.ArgumentParser(description=doc)
    p.add_argument("--model_path", help="Qwen3-MoE checkpoint directory (default: the kit's embedded tiny one)")
    devices.add_device_args(p)
    p.add_argument("--dtype", default="bfloat16", type=devices.candidate_dtype,
                   help="float32 | bfloat16 | float16 (default bfloat16)")
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


@dataclass
class Bench:
    """One Qwen3-MoE benchmark: device, dtype, checkpoint, its one-layer config, the results and the
    device's ceilings; the peer rule and the metric lines of every timed case."""

    args: object
    device: devices.Device
    dtype: torch.dtype
    checkpoint: checkpoints.Checkpoint
    config: object
    results: Results
    ceilings: object
    cases: dict
    verdict: Verdict = field(default_factory=Verdict)  # every judged case's outcome

    @classmethod
    def open(cls, args, script, impl):
        from .qwen3_moe import load_config
        from .timing import check_counts

        check_counts(args.warmups, args.runs)
        engines.quiet_transformers()
        dtype_name = devices.dtype_name(args.dtype)
        labels = {"device": None, "dtype": dtype_name, "engine": args.engine, "impl": impl, "layer": args.layer}
        device, dtype, checkpoint, results = start(args, script, labels, args.model_path, "qwen3_moe")
        results.labels["device"] = str(device)
        config = load_config(checkpoint, args.layer)
        env = results.env
        print(f"{script}: engine={args.engine} impl={impl} device={env['device_name']} dtype={dtype_name} "
              f"layer={args.layer} seed={args.seed} threads={env['threads']}")
        print(f"  checkpoint {checkpoint.path} (hash {env['checkpoint_hash']}); torch {env['torch']}, "
              f"transformers {env['transformers']}; reference: the same module in float32 on the CPU")
        ceilings = roofline.ceilings_for(device, [dtype_name])
        print(f"  {ceilings.describe(dtype_name)}")
        env["ceilings"] = {"bandwidth_bytes_per_s": ceilings.bandwidth_bytes_per_s,
                           "flops_per_s": ceilings.flops_per_s[dtype_name], **ceilings.measured}
        return cls(args, device, dtype, checkpoint, config, results, ceilings, {})

    def peer(self, impl, build_eager, what):
        """The correct peer: HF's block with its eager implementation in the candidate dtype on the device
        (`build_eager()` builds it), or None: --peer none, or the hf engine with `impl` "eager", which is that
        peer itself. Says which on one line."""
        kind = decide_peer(self.args.peer, self.args.engine == "hf" and impl == "eager")
        if kind != OWN_PEER:
            print("  peer: " + ("none (--peer none)" if kind == NO_PEER else "the candidate is HF's block itself")
                  + ": verdicts from the static table")
            return None
        print(f"  peer: HF's block ({what}) in {devices.dtype_name(self.dtype)} on {self.device}: verdicts calibrated by its error "
              f"(k={judges.PEER_K:g})")
        return build_eager()

    def report(self, case, m, tokens, flops, bytes_moved, peak_bytes, **labels):
        """A Measurement as metric lines: latency statistics, tok/s, GFLOP/s, GB/s, peak memory, and its
        distance to the device's limit (kitcore.roofline). Returns the roofline Bound."""
        results = self.results
        for key, value in m.summary().items():
            unit = "ms" if key.endswith("_ms") else ("bool" if key == "spread_warning" else "count")
            results.add(case, key, value, unit=unit, **labels)
        seconds = m.median_ms / 1e3
        results.add(case, "tokens_per_s", tokens / seconds, unit="tok/s", **labels)
        results.add(case, "gflops", flops / seconds / 1e9, unit="GFLOP/s", **labels)
        results.add(case, "gbytes_per_s", bytes_moved / seconds / 1e9, unit="GB/s", **labels)
        if peak_bytes is not None:
            results.add(case, "peak_memory", peak_bytes, unit="bytes", **labels)
        roof = roofline.bound(flops, bytes_moved, self.ceilings, results.labels["dtype"], m.median_ms)
        results.add(case, "roofline_ms", roof.ms, unit="ms", bound=roof.kind, **labels)
        results.add(case, "roofline_fraction", roof.fraction, unit="fraction", bound=roof.kind, **labels)
        return roof

    def finish(self):
        """The correctness verdict line (every case's outcome), the device's cache released, the JSON written;
        the exit code."""
        self.results.extra["cases"] = self.cases
        self.device.empty_cache()
        return self.results.finish(self.verdict, self.args.json, title="correctness verdict")
