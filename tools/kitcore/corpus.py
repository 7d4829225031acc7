"""Corpus scoring; its shell, with the description --help prints: test/models/llama/test_corpus_score.py.

The pieces, in the order a run uses them:
    manifest      the corpus tokenised once (ids, their sha256, the scored positions, the tokenizer's digest), read
                  back and checked by every later run
    reference     HF Transformers float32 eager on the CPU: its final hidden states at the scored positions, cached
                  (float32: the lm_head gives the exact full-vocabulary distribution back)
    engines       the candidate; the format's exact value (HF with the format simulated in float64) and its correct
                  peer (the same simulation in the candidate's precision); without a format, the reference and HF in
                  the candidate dtype
    figures       per token: KL, change in NLL, same top-1, change in the reference token's probability
    answers       faithful to its format (a judged outcome), cost of the deployment (judged against a margin when
                  one is given, else reported)
"""

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoints, cli, devices, engines, formats, judges, memory, protocol, session, stats
from .errors import Unavailable, UsageError
from .inputs import TOKENIZER_FILES, tokenizer
from .results import Results, environment, write_json_atomic
from .verdict import Verdict

SCRIPT = "test_corpus_score"
MANIFEST_VERSION = 1
DEFAULT_N_CTX, DEFAULT_TOKENS = 512, 4096
ROW_CHUNK = 64  # positions whose float64 log-probabilities exist at once
WORST_SHOWN = 5


# ---- the frozen token manifest --------------------------------------------------------------------------


def corpus_text(path=None):
    """(source, text): a text file, or by default Python's language reference as the standard library ships it
    (pydoc_data.topics: English prose with code, present wherever Python is)."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--text {path}: cannot read it as UTF-8 text ({exc}); give a plain text file") from None
        name = f"file {Path(path).name}"
    else:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        name = f"python {sys.version.split()[0]} pydoc_data.topics (the language reference)"
    return {"name": name, "sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text)}, text


def tokenizer_digest(path):
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


def scored_positions(n_ctx):
    """The positions of a window whose next token is scored: its second half (as llama.cpp's perplexity tool), the
    last position excluded (it has no next token in the window)."""
    return n_ctx // 2, n_ctx - 1


@dataclass
class Manifest:
    source: dict
    tokenizer_sha256: str
    n_ctx: int
    windows: int
    ids: list
    path: Path = None

    @property
    def scored(self):
        return scored_positions(self.n_ctx)

    @property
    def scored_per_window(self):
        return self.scored[1] - self.scored[0]

    @property
    def ids_sha256(self):
        return _digest(self.ids)

    @property
    def scored_sha256(self):
        return _digest({"n_ctx": self.n_ctx, "windows": self.windows, "scored": list(self.scored)})

    def window(self, w):
        return torch.tensor(self.ids[w * self.n_ctx:(w + 1) * self.n_ctx])

    def as_dict(self):
        return {"version": MANIFEST_VERSION, "source": self.source, "tokenizer_sha256": self.tokenizer_sha256,
                "n_ctx": self.n_ctx, "windows": self.windows, "scored": list(self.scored),
                "ids_sha256": self.ids_sha256, "scored_sha256": self.scored_sha256, "ids": self.ids}

    def summary(self):
        return {k: v for k, v in self.as_dict().items() if k != "ids"} | {"path": str(self.path)}


def build_manifest(checkpoint, n_ctx, tokens, text_path=None):
    """The corpus tokenised once by `checkpoint`'s tokenizer into windows of n_ctx tokens, enough of them for `tokens`
    scored tokens."""
    if n_ctx < 8:
        raise UsageError(f"--n_ctx {n_ctx}: a window needs at least 8 tokens (half of it is context)")
    limit = checkpoint.config.get("max_position_embeddings")
    if limit and n_ctx > limit:
        raise UsageError(f"--n_ctx {n_ctx}: the model takes {limit} positions; give --n_ctx {limit} or less")
    if tokens < 1:
        raise UsageError(f"--tokens {tokens}: at least 1")
    source, text = corpus_text(text_path)
    ids = list(tokenizer(checkpoint.path, alternative="corpus scoring needs text")(text))
    per_window = scored_positions(n_ctx)[1] - scored_positions(n_ctx)[0]
    windows = math.ceil(tokens / per_window)
    if len(ids) < windows * n_ctx:
        raise UsageError(f"the corpus ({source['name']}) is {len(ids)} tokens; {windows} windows of {n_ctx} need "
                         f"{windows * n_ctx}: fewer --tokens, a smaller --n_ctx or a longer --text")
    return Manifest(source, tokenizer_digest(checkpoint.path), n_ctx, windows, ids[:windows * n_ctx])


def read_manifest(path, checkpoint):
    """A manifest written before, checked: its own hashes, and that `checkpoint`'s tokenizer made it."""
    try:
        raw = json.loads(Path(path).read_text())
        manifest = Manifest(raw["source"], raw["tokenizer_sha256"], int(raw["n_ctx"]), int(raw["windows"]),
                            list(raw["ids"]), Path(path))
        recorded = raw["ids_sha256"], raw["scored_sha256"], raw["version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--manifest {path}: not a token manifest this kit wrote; give another path (a new one is "
                         "written there)") from None
    if recorded[2] != MANIFEST_VERSION:
        raise UsageError(f"--manifest {path}: version {recorded[2]}, this kit reads {MANIFEST_VERSION}; write a new one")
    if recorded[:2] != (manifest.ids_sha256, manifest.scored_sha256) or len(manifest.ids) != manifest.windows * manifest.n_ctx:
        raise UsageError(f"--manifest {path}: its ids or scored positions do not hash to what it records (edited?); "
                         "write a new one")
    if manifest.tokenizer_sha256 != tokenizer_digest(checkpoint.path):
        raise UsageError(f"--manifest {path} was tokenised by another tokenizer than {checkpoint.path}'s; its tokens "
                         "mean other text to this model: write a manifest for it (another --manifest path)")
    return manifest


def manifest_for(args, checkpoint):
    """The run's manifest: --manifest's, read back and checked (refused where --n_ctx, --tokens or --text ask for
    other tokens), or built and written there (default: the kit cache, keyed by tokenizer and settings)."""
    n_ctx, tokens = args.n_ctx or DEFAULT_N_CTX, args.tokens or DEFAULT_TOKENS
    if args.manifest and Path(args.manifest).exists():
        manifest = read_manifest(args.manifest, checkpoint)
        asked = {"--n_ctx": (args.n_ctx, manifest.n_ctx),
                 "--tokens": (args.tokens and math.ceil(args.tokens / manifest.scored_per_window), manifest.windows)}
        for flag, (want, have) in asked.items():
            if want is not None and want != have:
                raise UsageError(f"{flag} asks for other tokens than --manifest {args.manifest} holds ({have} "
                                 f"{'positions per window' if flag == '--n_ctx' else 'windows'}): drop {flag} or "
                                 "write a new manifest")
        if args.text and corpus_text(args.text)[0]["sha256"] != manifest.source["sha256"]:
            raise UsageError(f"--text {args.text} is not the text --manifest {args.manifest} was made from; drop "
                             "--text or write a new manifest")
        return manifest
    manifest = build_manifest(checkpoint, n_ctx, tokens, args.text)
    key = _digest([manifest.tokenizer_sha256, manifest.source["sha256"], n_ctx, manifest.windows])[:16]
    manifest.path = Path(args.manifest or checkpoints.cache_root() / "corpus" / f"manifest-{key}.json")
    manifest.path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest.path, manifest.as_dict())
    return manifest


# ---- the reference, cached as final hidden states ---------------------------------------------------------


class Reference:
    """The reference's distributions at the scored positions: final hidden states [windows, positions, hidden] in
    float32 (computed once by HF float32 eager on the CPU, cached by checkpoint and manifest) and the lm_head."""

    def __init__(self, checkpoint, manifest, phases):
        from safetensors.torch import load_file, save_file

        self.path = (checkpoints.cache_root() / "corpus" /
                     f"hidden-{checkpoint.fingerprint}-{manifest.ids_sha256[:16]}-{manifest.scored_sha256[:8]}"
                     ".safetensors")
        started = time.perf_counter()
        self.cached = self.path.is_file()
        if self.cached:
            self.hidden = load_file(str(self.path))["hidden"]
        else:
            with phases("reference_corpus"):
                self.hidden = self._compute(checkpoint, manifest)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".partial")
            save_file({"hidden": self.hidden}, str(tmp))
            tmp.replace(self.path)
        self.seconds = time.perf_counter() - started
        head = "lm_head.weight" if "lm_head.weight" in checkpoint.tensors else "model.embed_tokens.weight"
        self.lm_head = checkpoint.load_tensors([head])[head].float()

    @staticmethod
    @torch.no_grad()
    def _compute(checkpoint, manifest):
        model = engines.HFEngine(str(checkpoint.path), devices.Device("cpu", "cpu"), torch.float32, "eager").model
        a, b = manifest.scored
        positions = torch.arange(manifest.n_ctx)[None]
        return torch.stack([model.model(input_ids=manifest.window(w)[None], position_ids=positions)
                            .last_hidden_state[0, a:b].float() for w in range(manifest.windows)])

    def logits(self, w):
        return self.hidden[w] @ self.lm_head.T


# ---- per-token figures -------------------------------------------------------------------------------------


def _log_probs(logits):
    return logits.double().log_softmax(-1)


def per_token(ref_logits, cand_logits, targets):
    """{kl, dnll, same_top1, dp} per scored position: KL(ref || cand), the candidate's NLL of the next token minus
    the reference's, whether their top-1 agree, the candidate's probability of the next token minus the reference's."""
    out = {k: [] for k in ("kl", "dnll", "same_top1", "dp")}
    for start in range(0, ref_logits.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        r, c, t = _log_probs(ref_logits[rows]), _log_probs(cand_logits[rows]), targets[rows, None]
        kl = (r.exp() * (r - c)).sum(-1)
        out["kl"].append(torch.where(torch.isfinite(kl), kl, torch.full_like(kl, float("inf"))))
        rt, ct = r.gather(-1, t)[:, 0], c.gather(-1, t)[:, 0]
        out["dnll"].append(rt - ct)
        out["same_top1"].append((r.argmax(-1) == c.argmax(-1)).double())
        out["dp"].append(ct.exp() - rt.exp())
    return {k: torch.cat(v) for k, v in out.items()}


def kl_only(ref_logits, cand_logits):
    return torch.cat([(lambda r, c: (r.exp() * (r - c)).sum(-1))(_log_probs(ref_logits[i:i + ROW_CHUNK]),
                                                                 _log_probs(cand_logits[i:i + ROW_CHUNK]))
                      for i in range(0, ref_logits.shape[0], ROW_CHUNK)])


# ---- the engines ----------------------------------------------------------------------------------------------


@dataclass
class Lineup:
    """What one run scores: the candidate, the format's exact value and its correct peer (None: the candidate is the
    peer), and the format (None: the model in the candidate's precision)."""

    candidate: object
    exact: object  # None: the reference itself is exact (no format)
    peer: object
    format: str
    judged_dtype: torch.dtype


def _logits(engine, ids, a, b):
    positions = torch.arange(ids.shape[0])[None]
    out = engine.forward(ids[None], positions)
    if protocol.declared(engine, "returns") == "logprobs" and protocol.declared(engine, "top_k"):
        raise Unavailable(f"engine {protocol.declared(engine, 'name')}: returns only its top "
                          f"{protocol.declared(engine, 'top_k')} log-probabilities; corpus scoring needs every token's")
    return out[0, a:b].float().cpu()


def lineup(args, checkpoint, reference_checkpoint, device, dtype, manifest, phases):
    options = {**engines.flag_options(args), "n_ctx": manifest.n_ctx,
               "engine_args": session.engine_args(args.engine_args)}
    with phases("candidate_load"):
        candidate = engines.load_engine(args.engine, checkpoint.path, device, dtype, args.attn, options)
    declared = protocol.declared(candidate, "format")
    if args.format and declared and args.format != declared:
        raise UsageError(f"--format {args.format}: engine {args.engine} declares {declared}; drop --format")
    fmt = args.format or declared
    judged = protocol.declared(candidate, "judged_dtype") or dtype
    if fmt:
        formats.parse(fmt)
        ok, why = formats.simulated(fmt, reference_checkpoint.config)
        if not ok:
            raise Unavailable(f"format {fmt}: not simulated here ({why})")
        with phases("format_load"):
            exact = formats.FormatEngine(str(reference_checkpoint.path), devices.Device("cpu", "cpu"), torch.float64,
                                         "eager", format=fmt)
            peer = formats.FormatEngine(str(reference_checkpoint.path), device, judged, args.attn, format=fmt)
        return Lineup(candidate, exact, peer, fmt, judged)
    is_peer = (args.engine == "hf" and args.tensor_parallel_size == 1 and judged == dtype
               and checkpoint.path.resolve() == reference_checkpoint.path.resolve())
    peer = None
    if not is_peer:
        with phases("peer_load"):
            peer = engines.HFEngine(str(reference_checkpoint.path), device, judged, args.attn)
    return Lineup(candidate, None, peer, None, judged)


# ---- the answers ---------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-token figures of every window: the candidate's cost, the format's own cost, and the faithfulness pair."""

    cost: list  # per window: per_token(reference, candidate)
    format_cost: list  # per window: per_token(reference, exact) (empty without a format)
    faithful: list  # per window: KL(exact || candidate)
    peer: list  # per window: KL(exact || peer) (empty when the candidate is the peer)

    def column(self, part, key):
        return [w[key] for w in getattr(self, part)]


def score(lineup_, reference, manifest, phases, windows=None):
    """Every window through every engine of the lineup, in one phase ("score_corpus": all engines' forwards and the
    figures together; a phase per window would keep only the last window's time)."""
    windows = range(manifest.windows) if windows is None else windows
    a, b = manifest.scored
    scores = Scores([], [], [], [])
    with phases("score_corpus"):
        for w in windows:
            ids = manifest.window(w)
            targets = ids[a + 1:b + 1]
            ref = reference.logits(w)
            cand = _logits(lineup_.candidate, ids, a, b)
            scores.cost.append(per_token(ref, cand, targets))
            exact = ref
            if lineup_.exact is not None:
                exact = _logits(lineup_.exact, ids, a, b)
                scores.format_cost.append(per_token(ref, exact, targets))
            scores.faithful.append(kl_only(exact, cand))
            if lineup_.peer is not None:
                scores.peer.append(kl_only(exact, _logits(lineup_.peer, ids, a, b)))
    return scores


FIGURES = (("kl_mean", "KL mean", "nats"), ("kl_p99", "KL p99", "nats"), ("kl_p999", "KL p99.9", "nats"),
           ("kl_max", "KL max", "nats"), ("log_ppl_ratio", "log-PPL ratio (mean change in NLL)", "nats"),
           ("same_top1", "same top-1", "rate"), ("rms_dp", "RMS change in p(next token)", "-"))


def cost_figures(per_window, confidence, seed):
    """Every cost figure with its block-bootstrap interval over windows."""
    kl = [w["kl"] for w in per_window]
    every = torch.cat(kl)
    return {"kl_mean": stats.mean(kl, confidence, seed=seed),
            "kl_p99": stats.quantile(kl, 0.99, confidence, seed=seed),
            "kl_p999": stats.quantile(kl, 0.999, confidence, seed=seed),
            "kl_max": stats.Estimate(float(every.max()), float(every.max()), float(every.max()), confidence),
            "log_ppl_ratio": stats.mean([w["dnll"] for w in per_window], confidence, seed=seed),
            "same_top1": stats.mean([w["same_top1"] for w in per_window], confidence, seed=seed),
            "rms_dp": stats.rms([w["dp"] for w in per_window], confidence, seed=seed)}


@dataclass
class Faithfulness:
    """The first answer: the candidate's distance from its format's exact value against k^2 x a correct peer's."""

    candidate: stats.Estimate
    peer: stats.Estimate  # None when the candidate is the peer
    limit: float
    passed: bool

    def message(self, fmt):
        what = f"its format ({fmt})" if fmt else "the reference"
        if self.peer is None:
            return f"the candidate is the peer: KL from {what} {self.candidate.describe('.3g')}"
        return (f"KL from {what} {self.candidate.value:.3g} [{self.candidate.low:.3g}, {self.candidate.high:.3g}] "
                f"{'within' if self.passed else 'above'} {self.limit:.3g} (k^2 x a correct peer's "
                f"{self.peer.value:.3g})")


def judge_faithfulness(scores, dtype, confidence, seed):
    """Faithful when the candidate's mean KL from the format's exact value is within k^2 x the correct peer's plus the
    rounding floor squared (kitcore.judges: KL grows with the squared error)."""
    candidate = stats.mean(scores.faithful, confidence, seed=seed)
    if not scores.peer:
        return Faithfulness(candidate, None, float("nan"), True)
    peer = stats.mean(scores.peer, confidence, seed=seed)
    f = judges.rounding_floor(dtype)
    limit = judges.PEER_K**2 * peer.value + f * f
    return Faithfulness(candidate, peer, limit, candidate.value <= limit)


# ---- the report --------------------------------------------------------------------------------------------------


def histogram(values, lo=-12, hi=1):
    """Counts of values per decade from 10^lo to 10^hi (below and above collected at the ends)."""
    logs = values.clamp_min(10.0**lo).log10().floor().clamp(lo, hi - 1)
    return {f"1e{d}": int((logs == d).sum()) for d in range(lo, hi)}


def by_position(per_window, bands=8):
    """The mean KL per band of the scored positions (from the window's middle to its end)."""
    stacked = torch.stack(per_window)
    return [float(x.mean()) for x in stacked.chunk(bands, dim=1)]


def worst_tokens(per_window, manifest, checkpoint, count=WORST_SHOWN):
    decode = _decoder(checkpoint)
    a, _ = manifest.scored
    flat = torch.stack(per_window)
    out = []
    for index in flat.flatten().topk(min(count, flat.numel())).indices.tolist():
        w, p = divmod(index, flat.shape[1])
        ids = manifest.window(w)
        position = a + p
        out.append({"window": w, "position": position, "kl": float(flat[w, p]),
                    "context": decode(ids[max(0, position - 12):position + 1].tolist()),
                    "next": decode([int(ids[position + 1])])})
    return out


def _decoder(checkpoint):
    if (checkpoint.path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(checkpoint.path / "tokenizer.json"))
        return lambda ids: tok.decode(ids)
    return lambda ids: " ".join(map(str, ids))


def print_figures(title, figures):
    print(title)
    for key, label, _ in FIGURES:
        print(f"  {label:<38} {figures[key].describe('.4g')}")


def report(results, case, figures):
    for key, _, unit in FIGURES:
        e = figures[key]
        results.add(case, key, e.value, unit=unit)
        results.add(case, f"{key}_low", e.low, unit=unit)
        results.add(case, f"{key}_high", e.high, unit=unit)


# ---- the check ------------------------------------------------------------------------------------------------


def parse_args(argv, doc):
    p = cli.ArgumentParser(description=doc)
    p.add_argument("--model_path", help="HF checkpoint directory with a tokenizer (default: the kit's tiny Llama)")
    p.add_argument("--reference_path", help="checkpoint of the reference, the format's simulation and the peer "
                                            "(default: --model_path)")
    p.add_argument("--engine", default="hf", help="hf | compile | llama.cpp | vllm | infinilm | package.module:Class | "
                                                  "file.py:Class (an engine that returns full distributions)")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"], help="attention of hf and of the peer")
    p.add_argument("--dtype", default="float32", type=devices.candidate_dtype,
                   help="candidate dtype: float32 (default) | bfloat16 | float16")
    p.add_argument("--format", help="the candidate's number format where it declares none (kitcore/formats.py): "
                                    + ", ".join(formats.FORMATS) + "; '+' joins a weight and a KV-cache format")
    p.add_argument("--text", help="a UTF-8 text file to score (default: Python's language reference, pydoc_data)")
    p.add_argument("--n_ctx", type=int, help=f"tokens per window (default {DEFAULT_N_CTX}); its second half is scored")
    p.add_argument("--tokens", type=int, help=f"scored tokens at least (default {DEFAULT_TOKENS})")
    p.add_argument("--manifest", metavar="PATH",
                   help="the frozen token manifest: read and checked when PATH exists, else written there (default: "
                        "the kit cache); every engine scored on one manifest is scored on the same tokens")
    p.add_argument("--max_kl_mean", type=float, help="sign-off margin: the upper end of the KL mean's interval must "
                                                     "be below it (else the cost is reported, not judged)")
    p.add_argument("--max_log_ppl_ratio", type=float, help="sign-off margin for the log-PPL ratio's upper end")
    p.add_argument("--confidence", type=float, default=0.95, help="of every interval, two-sided (default 0.95)")
    p.add_argument("--power", type=float, default=0.8, help="--plan: the chance to sign off when the cost is the "
                                                            "pilot's (default 0.8)")
    p.add_argument("--plan", action="store_true", help="score --pilot_windows windows and say how many tokens each "
                                                       "margin needs at --confidence and --power; no verdict")
    p.add_argument("--pilot_windows", type=int, default=4, help="windows of the --plan pilot (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); recorded")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH (atomically)")
    p.add_argument("--engine_args", metavar="JSON", help="settings handed to the engine, a JSON object")
    devices.add_device_args(p)
    for title, flags in engines.flag_groups():
        group = p.add_argument_group(title)
        for name, settings in flags:
            group.add_argument(name, **settings)
    args = p.parse_args(argv)
    if not 0.5 <= args.confidence < 1 or not 0 < args.power < 1:
        raise UsageError("--confidence is in [0.5, 1) and --power in (0, 1)")
    if args.pilot_windows < 2:
        raise UsageError(f"--pilot_windows {args.pilot_windows}: at least 2 (the planner needs a spread)")
    if args.max_kl_mean is not None and not args.max_kl_mean > 0:
        raise UsageError(f"--max_kl_mean {args.max_kl_mean}: a positive number of nats")
    return args


@dataclass
class Run:
    """One corpus scoring run, set up: where the results go, the tokens, the reference and the engines."""

    results: Results
    manifest: Manifest
    reference: Reference
    lineup: Lineup
    phases: object
    reference_checkpoint: object


def open_run(args):
    """Device, checkpoints, the manifest, the cached reference and the engines, each printed and recorded."""
    devices.set_threads(args.threads)
    device = devices.resolve_device(args)
    device.check_dtype(args.dtype)
    checkpoint = checkpoints.resolve_checkpoint(args.model_path, ("llama", "qwen3_moe"))
    reference_checkpoint = (checkpoints.open_checkpoint(args.reference_path, ("llama", "qwen3_moe"))
                            if args.reference_path else checkpoint)
    manifest = manifest_for(args, reference_checkpoint)
    labels = {"device": str(device), "dtype": devices.dtype_name(args.dtype), "engine": args.engine,
              "gguf_type": args.gguf_type, "kv_type": None if args.kv_type == "f32" else args.kv_type}
    results = Results(SCRIPT, labels={k: v for k, v in labels.items() if v is not None})
    results.env = environment(device, args.dtype, args.seed, checkpoint)
    results.env["manifest"] = manifest.summary()
    results.env["reference"] = {"checkpoint": str(reference_checkpoint.path),
                                "checkpoint_hash": reference_checkpoint.fingerprint, "dtype": "float32", "attn": "eager"}
    print(f"{SCRIPT}: engine={args.engine} device={results.env['device_name']} dtype={labels['dtype']} "
          f"seed={args.seed} threads={results.env['threads']}")
    print(f"  checkpoint {checkpoint.path} (hash {results.env['checkpoint_hash']}); reference, format and peer from "
          f"{reference_checkpoint.path}")
    if reference_checkpoint.truncation_note():
        print(f"  {reference_checkpoint.truncation_note()}")
    a, b = manifest.scored
    print(f"  manifest {manifest.path}: {manifest.source['name']}, {manifest.windows} windows of {manifest.n_ctx} "
          f"tokens, positions {a}-{b - 1} scored ({manifest.windows * manifest.scored_per_window} tokens); ids sha256 "
          f"{manifest.ids_sha256[:16]}")
    phases = memory.Phases(device)
    reference = Reference(reference_checkpoint, manifest, phases)
    per_1k = 1000 / (manifest.windows * manifest.scored_per_window)
    cost = {"path": str(reference.path), "cached": reference.cached,
            "bytes_per_1k_tokens": reference.path.stat().st_size * per_1k,
            "seconds_per_1k_tokens": reference.seconds * per_1k}
    results.env["reference_corpus"] = cost
    print(f"  reference: HF float32 eager on cpu, final hidden states {'read from' if reference.cached else 'cached in'} "
          f"{reference.path} ({cost['bytes_per_1k_tokens'] / 2**20:.2f} MiB and {cost['seconds_per_1k_tokens']:.1f} s "
          "per 1k scored tokens)")
    run = lineup(args, checkpoint, reference_checkpoint, device, args.dtype, manifest, phases)
    if protocol.declared(run.candidate, "description"):
        print(f"  {args.engine}: {protocol.declared(run.candidate, 'description')}")
    results.env["attested"] = {args.engine: protocol.attested(run.candidate)}
    results.env["format"] = run.format
    precision = devices.dtype_name(run.judged_dtype)
    fmt = f"{run.format} ({formats.describe(run.format)})" if run.format else f"none: the model in {precision}"
    exact = "HF float64 with the format simulated" if run.format else "the reference"
    peer = "none (the candidate is the peer)" if run.peer is None else f"{run.peer.name} {precision}"
    print(f"  format: {fmt}; its exact value: {exact}; correct peer: {peer}")
    return Run(results, manifest, reference, run, phases, reference_checkpoint)


def answer_faithfulness(args, run, scores, verdict):
    """The first answer, printed, recorded and added to the verdict."""
    fmt = run.lineup.format
    faithful = judge_faithfulness(scores, run.lineup.judged_dtype, args.confidence, args.seed)
    print(f"faithful to {'its format' if fmt else 'the model'}: {faithful.message(fmt)}")
    verdict.add("faithful to its format" if fmt else "faithful to the model", faithful.passed,
                f"not faithful to {fmt or 'the model'}: {faithful.message(fmt)}")
    figures = {"kl_mean": faithful.candidate.value, "kl_mean_low": faithful.candidate.low,
               "kl_mean_high": faithful.candidate.high}
    if faithful.peer is not None:
        figures.update(peer_kl_mean=faithful.peer.value, limit=faithful.limit)
    for metric, value in figures.items():
        run.results.add("faithfulness", metric, value, unit="nats")
    run.results.add("faithfulness", "passed", faithful.passed, unit="bool")
    return faithful


MARGINS = (("max_kl_mean", "kl_mean", "KL mean"), ("max_log_ppl_ratio", "log_ppl_ratio", "log-PPL ratio"))


def answer_cost(args, run, scores, verdict):
    """The second answer: the cost figures with their intervals, the format's own beside them, and the sign-off
    against each margin given."""
    cost = cost_figures(scores.cost, args.confidence, args.seed)
    print_figures("\ncost of the deployment (candidate against the float32 reference, per scored token):", cost)
    report(run.results, "cost", cost)
    naive = stats.naive_mean(torch.cat(scores.column("cost", "dnll")), args.confidence)
    print(f"  (the log-PPL ratio's interval if tokens were independent: [{naive.low:.4g}, {naive.high:.4g}])")
    if scores.format_cost:
        own = cost_figures(scores.format_cost, args.confidence, args.seed)
        print_figures(f"what the format ({run.lineup.format}) costs by itself:", own)
        report(run.results, "format_cost", own)
    for flag, key, label in MARGINS:
        margin = getattr(args, flag)
        if margin is not None:
            verdict.add(f"cost: {label}", cost[key].high < margin,
                        f"{label} {cost[key].describe('.3g')}: its upper end is not below the margin {margin:g}")


def print_distribution(run, scores):
    """Where the cost sits: KL per token by decade, by position in the window, and the worst tokens in context."""
    kl = scores.column("cost", "kl")
    extra = run.results.extra
    extra["kl_histogram"] = histogram(torch.cat(kl))
    extra["kl_by_position"] = by_position(kl)
    extra["worst_tokens"] = worst_tokens(kl, run.manifest, run.reference_checkpoint)
    print("KL per token, by decade: " + ", ".join(f"{k}: {v}" for k, v in extra["kl_histogram"].items() if v))
    print("KL mean by position (8 bands, middle to end of the window): "
          + " ".join(f"{x:.3g}" for x in extra["kl_by_position"]))
    print("worst tokens:")
    for t in extra["worst_tokens"]:
        print(f"  window {t['window']} position {t['position']}: KL {t['kl']:.3g} at {t['context'][-60:]!r} -> "
              f"{t['next']!r}")


def pass_notes(args, run, faithful):
    """What a PASS could not have seen, and that an unjudged cost is only reported."""
    notes = []
    if faithful.peer is not None and run.lineup.format:
        notes.append(f"note: faithful within k^2 x its format's own rounding noise here (a correct peer: "
                     f"{faithful.peer.value:.2g} nats per token); an engine error that moves the output by less than "
                     "that is not seen (intermediate validation --against format reads it layer by layer)")
    if args.max_kl_mean is None and args.max_log_ppl_ratio is None:
        notes.append("note: the cost is reported, not judged: --max_kl_mean / --max_log_ppl_ratio sign it off "
                     "(--plan says how many tokens a margin needs)")
    return notes


def main(argv=None, doc=None):
    started = time.perf_counter()
    args = parse_args(argv, doc)
    run = open_run(args)
    if args.plan:
        return plan(args, run)
    scores = score(run.lineup, run.reference, run.manifest, run.phases)
    print(f"\nintervals: {args.confidence:.0%}, block bootstrap over {run.manifest.windows} windows "
          f"({stats.BOOTSTRAP_SAMPLES} resamples, seed {args.seed})")
    verdict = Verdict()
    faithful = answer_faithfulness(args, run, scores, verdict)
    answer_cost(args, run, scores, verdict)
    print_distribution(run, scores)
    run.phases.report(run.results)
    run.results.add("timing", "check_wall", time.perf_counter() - started, unit="s")
    return run.results.finish(verdict, args.json, pass_notes(args, run, faithful) if verdict.passed else [])


def plan(args, run):
    """--plan: the pilot windows scored, and the windows each margin needs (stats.plan)."""
    manifest, results = run.manifest, run.results
    pilot = range(min(args.pilot_windows, manifest.windows))
    scores = score(run.lineup, run.reference, manifest, run.phases, pilot)
    kl, dnll = scores.column("cost", "kl"), scores.column("cost", "dnll")
    margins = [("KL mean", kl, args.max_kl_mean), ("log-PPL ratio", dnll, args.max_log_ppl_ratio)]
    print(f"\n--plan: {len(pilot)} pilot windows of {manifest.scored_per_window} scored tokens; confidence "
          f"{args.confidence}, power {args.power}")
    for label, values, margin in margins:
        default = margin is None
        if default:  # a margin to show the planner with: twice the pilot's mean KL; a 1% perplexity rise
            margin = 2 * float(torch.cat(values).mean()) if label == "KL mean" else math.log(1.01)
        p = stats.plan(label, values, margin, manifest.scored_per_window, args.confidence, args.power)
        print(f"  {p.describe()}" + ("  (no margin given: an example)" if default else ""))
        results.add("plan", f"{label.replace(' ', '_').replace('-', '_').lower()}_tokens", p.tokens or -1, unit="tokens")
    return results.finish(Verdict(), args.json, title=None)
