"""`--engine openai:http://HOST:PORT/v1`: any OpenAI-compatible completions server, black-box: token ids in,
logprobs out, through the serving protocol of kitcore.serving.

Three parts, each small:
  Client          HTTP and JSON, every request under `--request_timeout` (the constructor's requests too)
  check_tokenizer the server's tokenizer against the checkpoint's, where the server can tokenize
  the dialects    how a server returns the logprobs of prompt tokens, chosen from `/v1/models` (`owned_by`):
    VLLMDialect   `prompt_logprobs=k` (a vLLM extension) and `return_tokens_as_token_ids`: ids, exact
    EchoDialect   `echo` + `logprobs=k` (llama-cpp-python's server): top alternatives keyed by their text,
                  mapped back to ids with the checkpoint's tokenizer (texts shared by several ids are left
                  out); its prompt entries are aligned by the kit (EchoDialect.align)
k is the vocabulary unless `--top_logprobs K`. The server's dtype is what it was started with: --dtype must
say it (it picks the peer and the tolerance).
"""

import concurrent.futures
import functools
import json
import math
import urllib.error
import urllib.request

from .devices import dtype_name
from .errors import Unavailable, UsageError
from .serving import Completion, ServingEngine

FLAGS = (("--served_model", dict(help="the model name the server serves (default: its only one)")),
         ("--top_logprobs", dict(type=int, metavar="K",
                                 help="ask for the top K logprobs per position only, as a server capped at K returns "
                                      "(default: the whole vocabulary; judged then by what top K can show)")),
         ("--request_timeout", dict(type=float, default=300.0, metavar="S",
                                    help="seconds one request may take (default 300)")))

MAX_IN_FLIGHT = 8  # concurrent requests of one batch, on the loopback

DEFAULT_REQUEST_TIMEOUT_S = 300.0


class Refused(UsageError):
    """The server answered with an HTTP error; `detail` is the start of its body."""

    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _where_ids_differ(server, expected, whose):
    """'at position N (server [...], <whose> [...])': where the server's ids leave the expected ones."""
    first = _first_difference(server, expected)
    return f"at position {first} (server {server[first:first + 3]}, {whose} {expected[first:first + 3]})"


# ---- HTTP -----------------------------------------------------------------------------------------


class Client:
    """JSON requests to one server's `/v1` address (or, `root=True`, its root), each under `timeout` seconds."""

    def __init__(self, url, timeout):
        if not url or not url.startswith(("http://", "https://")):
            raise UsageError(f"--engine openai:{url}: expected openai:http://HOST:PORT/v1")
        self.url, self.timeout = url.rstrip("/"), timeout

    def request(self, method, path, body=None, root=False):
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

    def optional(self, path, body, root=False):
        """A request to an endpoint the server may not have: its answer, or None when it is refused."""
        try:
            return self.request("POST", path, body, root=root)
        except Refused:
            return None

    def served_model(self, name=None):
        """(model name, owner) of the model to test: `name`, or the server's only one."""
        models = self.request("GET", "/models").get("data") or []
        names = [m.get("id") for m in models]
        if name is None and len(names) != 1:
            raise UsageError(f"{self.url} serves {len(names)} models ({', '.join(map(str, names))}); "
                             "name one with --served_model")
        name = name or names[0]
        if name not in names:
            raise UsageError(f"--served_model {name!r}: {self.url} serves {', '.join(map(str, names))}")
        return name, next((m.get("owned_by") for m in models if m.get("id") == name), None)

    def tokenize(self, text, model=None, add_special_tokens=False):
        """The server's token ids for `text` (vLLM /tokenize, llama-cpp-python /extras/tokenize), or None."""
        answer = self.optional("/tokenize", {"model": model, "prompt": text, "add_special_tokens": add_special_tokens},
                               root=True)
        got = (answer or {}).get("tokens")
        if got is None:
            got = (self.optional("/extras/tokenize", {"input": text}, root=True) or {}).get("tokens")
        return None if got is None else [int(t) for t in got]


# ---- the tokenizer check --------------------------------------------------------------------------


def check_tokenizer(client, model, checkpoint):
    """The server's tokenizer against the checkpoint's, on the kit's default prompt: True when they agree,
    False when the server cannot tokenize, None when the checkpoint has no tokenizer. A disagreement is a
    different model being served: a UsageError naming the first differing token."""
    from .inputs import has_tokenizer, tokenizer
    from .tiny import DEFAULT_PROMPT

    if not has_tokenizer(checkpoint.path):
        return None
    expected = tokenizer(checkpoint.path)(DEFAULT_PROMPT)
    got = client.tokenize(DEFAULT_PROMPT, model)
    if got is None:
        return False
    if got != expected:
        raise UsageError(f"{client.url} tokenizes differently from {checkpoint.path}: first difference "
                         f"{_where_ids_differ(got, expected, 'checkpoint')}; a different model is being served")
    return True


def check_count(url, dist, position, want, distinct):
    """`dist` as returned holds at least the `want` logprobs asked for (`distinct`: how many keys exist)."""
    if dist is not None and len(dist) < min(want, distinct):
        raise UsageError(
            f"{url} returned {len(dist)} logprobs at position {position} where {want} were asked: the server "
            "caps them; restart it allowing all (vLLM: --max-logprobs -1) or judge its top k only with "
            f"--top_logprobs {len(dist)}")


# ---- the dialects ---------------------------------------------------------------------------------


class VLLMDialect:
    """vLLM's server: prompt logprobs keyed by token id, the prompt ids echoed back."""

    name, describes = "vllm", "prompt_logprobs"
    concurrent = True  # stateless per request: a batch's rows go out at the same time

    def __init__(self, client, vocab_size, top_k):
        self.client, self.vocab_size, self.top_k = client, vocab_size, top_k
        self.hidden = ()

    def asked(self):
        return self.top_k or -1

    def before(self, row):
        pass

    def body(self, prompt_logprobs):
        # plain greedy: vLLM would otherwise take a repetition penalty from the model's generation_config.json
        body = {"return_tokens_as_token_ids": True, "return_token_ids": True, "ignore_eos": True,
                "repetition_penalty": 1.0}
        if prompt_logprobs:
            body["prompt_logprobs"] = self.asked()
        return body

    def parse(self, choice, row, prompt_logprobs):
        url, want = self.client.url, self.top_k or self.vocab_size
        prompt = [None] * (len(row) - 1)
        if prompt_logprobs:
            entries = choice.get("prompt_logprobs")
            if not entries:
                raise UsageError(f"{url} returned no prompt_logprobs; it must be a vLLM server that allows them "
                                 "(start it with --max-logprobs -1)")
            echoed = choice.get("prompt_token_ids")
            if echoed is not None and list(echoed) != list(row):
                raise UsageError(f"{url} echoed other prompt ids than it was sent, first at position "
                                 f"{_first_difference(list(echoed), list(row))}")
            prompt = [{int(i): float(v["logprob"]) for i, v in d.items()} for d in entries[1:]]
            for p, dist in enumerate(prompt):
                check_count(url, dist, p, want, self.vocab_size)
        logprobs = choice.get("logprobs") or {}
        top = logprobs.get("top_logprobs")
        if not top:
            raise UsageError(f"{url} returned no logprobs for the generated tokens; allow them (--max-logprobs)")
        generated = [{_token_id(t): float(v) for t, v in d.items()} for d in top]
        for p, dist in enumerate(generated):
            check_count(url, dist, len(row) - 1 + p, want, self.vocab_size)
        tokens = choice.get("token_ids") or [_token_id(t) for t in logprobs.get("tokens", [])]
        return Completion(prompt + generated, [int(t) for t in tokens])


class EchoDialect:
    """OpenAI's `echo` + `logprobs` (llama-cpp-python's server): alternatives keyed by their text."""

    name, describes = "echo", "echo + logprobs"
    concurrent = False  # its alignment is measured on the first request, and its cache evicted per row

    def __init__(self, client, model, vocab_size, top_k, tokenizer):
        self.client, self.model, self.vocab_size, self.top_k = client, model, vocab_size, top_k
        self.texts, self.distinct, self.hidden = _token_texts(tokenizer, vocab_size, client.url)
        self.offset = None  # how its prompt entries are aligned, measured on the first request (align)
        self.evict_each = True  # before every request; off once the cache pairs take over (OpenAIEngine)

    def asked(self):
        return self.top_k or self.vocab_size

    def before(self, row):
        """llama-cpp-python's server reuses the longest prefix its context shares with the last request, scores
        included: a prefill right after a decode of the same tokens would return the decode's numbers, and the
        cache check would compare them with themselves. One token of another text first leaves no prefix."""
        if self.evict_each:
            self.evict(row[0])

    def evict(self, first=None):
        """One token of a text that does not start like `first`: the server's context shares no prefix after it."""
        other = next(t for t, i in self.texts.items() if t.strip() and i != first)
        self.client.request("POST", "/completions", {"model": self.model, "prompt": other, "max_tokens": 1,
                                                     "temperature": 0.0})

    def body(self, prompt_logprobs):
        # plain greedy: llama-cpp-python's server penalises repeated tokens by default (repeat_penalty 1.1), so
        # that at temperature 0 it picks another token than its own logprobs' top one
        return {"echo": bool(prompt_logprobs), "repeat_penalty": 1.0}

    def parse(self, choice, row, prompt_logprobs):
        url = self.client.url
        logprobs = choice.get("logprobs") or {}
        top = logprobs.get("top_logprobs")
        if not top:
            raise UsageError(f"{url} returned no logprobs; start it so that it computes them for every "
                             "position (llama-cpp-python: --logits_all true)")
        for p, d in enumerate(top):  # keyed by text: at most as many keys as different token texts
            check_count(url, d, p, self.asked(), self.distinct)
        dists = [None if d is None else {self.texts[t]: float(v) for t, v in d.items() if t in self.texts}
                 for d in top]
        n_prompt = len(row) if prompt_logprobs else 0
        if prompt_logprobs and len(dists) < len(row):
            raise UsageError(f"{url} returned logprobs for {len(dists)} tokens where the prompt has {len(row)}: "
                             "it does not echo the prompt's logprobs")
        prompt_part, generated = dists[:n_prompt], dists[n_prompt:]
        if prompt_logprobs:
            prompt_part = self.align(prompt_part, row)
            if self.offset:
                generated = generated[:-1]  # the entry after the last generated token: never evaluated
        else:
            prompt_part = [None] * (len(row) - 1)
        tokens = [self.texts.get(t, -1) for t in logprobs.get("tokens", [])[n_prompt:]]
        return Completion(prompt_part + generated, tokens)

    def align(self, entries, row):
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
                print(f"  note: {self.client.url} echoes the distribution after each prompt token at that token's "
                      "entry (one later than OpenAI's layout); the kit reads it shifted", flush=True)
        if self.offset:  # entry p = the distribution at position p (entry 0, position 0, is left empty)
            return list(entries)
        return list(entries[1:])  # entry p predicted token p: position p - 1


# ---- the engine -----------------------------------------------------------------------------------


class OpenAIEngine(ServingEngine):
    """An OpenAI-compatible `/v1/completions` server (module docstring): the client, the tokenizer check and
    the server's dialect, put together."""

    name = "openai"
    OPTIONS = ("url", "served_model", "top_logprobs", "request_timeout", "reference_path", "engine_args")
    capabilities = frozenset({"generate", "tokenize", "reset_prefix_cache", "attest"})

    def __init__(self, model_path, device, dtype, attn="sdpa", url=None, served_model=None, top_logprobs=None,
                 request_timeout=None, reference_path=None, engine_args=None):
        from .checkpoints import open_checkpoint

        settings = dict(engine_args or {})
        if set(settings) - {"block_size"} or not isinstance(settings.get("block_size", 1), int):
            raise UsageError(f"--engine_args {settings}: a server takes only block_size (an integer: the block size "
                             "of its prefix cache, which it does not report, for --cache_pairs)")
        self.block_size = settings.get("block_size")
        self.cached_tokens = []  # per request, from the answer's usage.prompt_tokens_details (None: not said)

        self.client = Client(url, request_timeout or DEFAULT_REQUEST_TIMEOUT_S)
        self.url = self.client.url
        self.checkpoint = open_checkpoint(reference_path or model_path)
        super().__init__(self.checkpoint.config["vocab_size"], dtype)
        if top_logprobs is not None and not 1 <= top_logprobs <= self.vocab_size:
            raise UsageError(f"--top_logprobs {top_logprobs}: between 1 and the vocabulary ({self.vocab_size})")
        self.top_k = top_logprobs if top_logprobs and top_logprobs < self.vocab_size else None
        self.model, owner = self.client.served_model(served_model)
        self.tokenizer_checked = check_tokenizer(self.client, self.model, self.checkpoint)
        if owner == "vllm":
            self.dialect = VLLMDialect(self.client, self.vocab_size, self.top_k)
        else:
            self.dialect = EchoDialect(self.client, self.model, self.vocab_size, self.top_k, self._tokenizer_or_none)
        self.hidden = self.dialect.hidden
        self.accepts_ids = True  # token-id prompts, until the server refuses one
        k = f"top {self.top_k}" if self.top_k else "all"
        if self.hidden:
            k += (f" ({len(self.hidden)} token ids share their text with another or have more than {PIECE_BYTES} "
                  "bytes of it, and cannot be told apart: left out)")
        self.description = (f"OpenAI-compatible server {self.url} model {self.model!r} ({owner or 'unknown'}; "
                            f"{self.dialect.describes}), {k} logprobs per position; judged as {dtype_name(dtype)} "
                            "(--dtype: the dtype it serves in)"
                            + {True: "; its tokenizer matches the checkpoint's",
                               False: "; its tokenizer is not checked (no /tokenize endpoint)", None: ""}
                            [self.tokenizer_checked])

    @property
    def reports_cache_hits(self):
        """vLLM's server says how many prompt tokens came from its cache; llama-cpp-python's never does."""
        return self.dialect.name == "vllm"

    def attest(self):
        return {"engine": "openai", "url": self.url, "dialect": self.dialect.name, "block_size": self.block_size}

    def reset_prefix_cache(self):
        """vLLM's server: its /reset_prefix_cache. llama-cpp-python's (the echo dialect) has none; it reuses the
        longest prefix its context shares with the last request, so one token of another text empties what it
        can reuse; from the first reset on, the kit stops doing that before every request (the caller decides
        when the cache is emptied: --cache_pairs)."""
        if self.dialect.name == "echo":
            self.dialect.evict_each = False
            self.dialect.evict()
            return
        try:
            self.client.request("POST", "/reset_prefix_cache", root=True)
        except Refused as exc:
            raise Unavailable(f"{self.url}: the server cannot reset its prefix cache ({exc}); vLLM's server offers "
                              "/reset_prefix_cache when started with VLLM_SERVER_DEV_MODE=1") from None

    @functools.cached_property
    def _tokenizer_or_none(self):
        """The checkpoint's tokenizer, loaded once, or None when it has none."""
        from transformers import AutoTokenizer

        from .inputs import has_tokenizer

        return AutoTokenizer.from_pretrained(str(self.checkpoint.path)) if has_tokenizer(self.checkpoint.path) \
            else None

    def tokenize(self, text=None, messages=None):
        """The ids the server computes for a prompt's text (special tokens as it adds them by default), or for
        chat messages through its own template (vLLM's /tokenize with messages); None where it cannot say."""
        if messages is None:
            return self.client.tokenize(text, self.model, add_special_tokens=True)
        if self.dialect.name != "vllm":
            return None
        answer = self.client.optional("/tokenize", {"model": self.model, "messages": messages,
                                                    "add_generation_prompt": True}, root=True)
        return None if answer is None or answer.get("tokens") is None else [int(t) for t in answer["tokens"]]

    def complete(self, rows, max_tokens, prompt_logprobs):
        """One request per row; a batch's rows at the same time (at most MAX_IN_FLIGHT) where the dialect
        allows: the server schedules them together, as it does concurrent users' traffic."""
        if len(rows) == 1 or not self.dialect.concurrent:
            return [self._complete_row(row, max_tokens, prompt_logprobs) for row in rows]
        with concurrent.futures.ThreadPoolExecutor(min(len(rows), MAX_IN_FLIGHT)) as pool:
            return list(pool.map(lambda row: self._complete_row(row, max_tokens, prompt_logprobs), rows))

    def _prompt(self, row):
        """The ids themselves where the server takes them; else their text, once the server's own tokenizer
        is shown to give back exactly these ids (it must tokenize: /extras/tokenize)."""
        if self.accepts_ids:
            return row
        if self._tokenizer_or_none is None:
            raise UsageError(f"{self.url} takes text prompts only and the checkpoint has no tokenizer to write them")
        text = self._tokenizer_or_none.decode(row, clean_up_tokenization_spaces=False)
        answer = self.client.optional("/extras/tokenize", {"input": text}, root=True)
        if answer is None:
            raise UsageError(f"{self.url} takes text prompts only and cannot tokenize them for the kit to check "
                             "(/extras/tokenize); the ids it computes on cannot be verified")
        got = [int(t) for t in answer.get("tokens", [])]
        if got != row:
            raise UsageError(f"{self.url} tokenizes the prompt's text into other ids than the kit's, first "
                             f"{_where_ids_differ(got, row, 'kit')}; use prompts of text (not --inputs random) and "
                             "serve the checkpoint's own tokenizer")
        return text

    def _complete_row(self, row, max_tokens, prompt_logprobs):
        self.dialect.before(row)
        body = {"model": self.model, "prompt": self._prompt(row), "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": self.dialect.asked(), "stream": False, **self.dialect.body(prompt_logprobs)}
        try:
            answer = self.client.request("POST", "/completions", body)
        except Refused as exc:
            if "logprob" in exc.detail.lower():
                asked = "all" if self.dialect.asked() == -1 else self.dialect.asked()
                raise UsageError(f"{self.url} refuses {asked} logprobs per position ({exc.detail[:160]}); "
                                 "start it allowing all (vLLM: --max-logprobs -1) or judge its top k only with "
                                 "--top_logprobs K") from None
            if not (self.accepts_ids and "string" in exc.detail):
                raise
            self.accepts_ids = False  # e.g. llama-cpp-python's server: text prompts only
            return self._complete_row(row, max_tokens, prompt_logprobs)
        details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
        self.cached_tokens.append(details.get("cached_tokens"))
        choices = answer.get("choices") or []
        if not choices:
            raise UsageError(f"{self.url}/completions: no choices in the answer; is this a completions server?")
        return self.dialect.parse(choices[0], row, prompt_logprobs)


# llama-cpp-python writes a token's text through a 32-byte buffer: a longer text comes out cut or garbled
PIECE_BYTES = 32


def _token_texts(tokenizer, vocab_size, url):
    """(text -> id, how many different texts, the ids left out) for the echo dialect's keys: each id's own
    text (invalid UTF-8 bytes dropped, as llama-cpp-python does; special and added control tokens print as
    nothing); a text shared by several ids is ambiguous and left out, and so is one longer than PIECE_BYTES,
    which the server cannot write whole."""
    if tokenizer is None:
        raise UsageError(f"{url} keys its logprobs by token text; the checkpoint has no tokenizer to map them "
                         "back to ids")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    seen, long = {}, []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
        raw = b"" if i in special else _byte_level_bytes(token)
        if raw is not None and len(raw) > PIECE_BYTES:
            long.append(i)
            continue
        text = (raw.decode("utf-8", errors="ignore") if raw is not None
                else tokenizer.decode([i], clean_up_tokenization_spaces=False).replace("\ufffd", ""))
        seen.setdefault(text, []).append(i)
    texts = {t: ids[0] for t, ids in seen.items() if len(ids) == 1}
    return texts, len(seen), tuple(i for ids in seen.values() if len(ids) > 1 for i in ids) + tuple(long)


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
