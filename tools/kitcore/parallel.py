"""`--engine hf --tensor_parallel_size N`: HF Transformers' own tensor parallelism as a candidate.

The kit starts N rank processes itself (no torchrun): each joins a torch.distributed group over gloo on
127.0.0.1, loads the checkpoint with `from_pretrained(..., tp_plan="auto")` (its weights as DTensors sharded by
the model's own plan: q/k/v/gate/up by output rows, o/down by input columns with an all-reduce) and serves the
parent's requests over a local socket: every rank runs each forward (the collectives need all of them), rank 0
hands the logits back. KV caches live in the ranks, one per new_cache(). Every request has a timeout; a rank that
dies or hangs ends the check with its last stderr lines; the ranks are stopped with the engine and at exit.
CPU ranks only (each bound to its share of the CPU threads); end-to-end, forward and batch validation and corpus
scoring run through it. Not yet: per-rank captures (intermediate validation), expert parallelism, NCCL ranks.
"""

import atexit
import io
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from .devices import dtype_name
from .errors import Unavailable, UsageError

LOAD_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
STOP_TIMEOUT_S = 10
TOOLS = str(Path(__file__).resolve().parents[1])


def _pack(value):
    """Tensors as bytes for the socket: pickled as they are, torch hands their storage over by file descriptor through a
    resource sharer the other process cannot authenticate with."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpack(raw):
    return torch.load(io.BytesIO(raw), weights_only=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelHFEngine:
    name = "hf-tp"
    padding_sides = ("left", "right")
    OPTIONS = ("tensor_parallel_size",)
    capabilities = frozenset({"new_cache", "attest"})
    # "path/to/file.py:function": run in every rank on the loaded model, function(model, rank), before any request:
    # how a plugin puts its own sharded layer (or, in the kit's tests, a rank's bug) in place
    rank_patch = None

    def __init__(self, model_path, device, dtype, attn="sdpa", tensor_parallel_size=2):
        if device.type != "cpu":
            raise Unavailable(f"--tensor_parallel_size with --engine hf: CPU ranks over gloo only so far, not {device}")
        if tensor_parallel_size < 2:
            raise UsageError(f"--tensor_parallel_size {tensor_parallel_size}: at least 2 for tensor parallelism")
        self.device, self.dtype, self.size = device, dtype, tensor_parallel_size
        threads = max(1, torch.get_num_threads() // tensor_parallel_size)
        authkey = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        env = dict(os.environ, WORLD_SIZE=str(tensor_parallel_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()), OMP_NUM_THREADS=str(threads))
        code = (f"import sys; sys.path.insert(0, {TOOLS!r}); from kitcore.parallel import rank_main; "
                f"rank_main({str(model_path)!r}, {dtype_name(dtype)!r}, {attn!r}, {threads}, "
                f"{self._listener.address!r}, {authkey!r}, {self.rank_patch!r})")
        self._ranks, self._conns = [], [None] * tensor_parallel_size
        atexit.register(self.close)
        for rank in range(tensor_parallel_size):
            self._ranks.append(subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(rank),
                                                LOCAL_RANK=str(rank)), stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True))
        for conn in self._accept_all():
            rank, status, detail = self._receive(conn, LOAD_TIMEOUT_S)
            if status != "ready":
                self.close()
                raise RuntimeError(f"rank {rank} could not load the model: {detail}")
            self._conns[rank] = conn
            if rank == 0:
                self._placement = detail
        self.description = (f"HF Transformers tp_plan=auto over {tensor_parallel_size} CPU ranks (gloo), "
                            f"{threads} thread(s) each, {dtype_name(dtype)} {attn}")

    def _accept_all(self):
        """Every rank's connection, in the order they come; a rank that exits or a start past LOAD_TIMEOUT_S ends it."""
        accepted = []
        thread = threading.Thread(target=lambda: accepted.extend(self._listener.accept() for _ in self._ranks),
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while thread.is_alive() and time.monotonic() < deadline and all(p.poll() is None for p in self._ranks):
            thread.join(0.2)
        if len(accepted) < len(self._ranks):
            self.close()
            raise RuntimeError(f"a tensor-parallel rank did not start{self._stderr()}")
        return accepted

    def _stderr(self):
        tails = []
        for rank, p in enumerate(self._ranks):
            if p.poll() is not None and p.stderr:
                lines = p.stderr.read().strip().splitlines()
                if lines:
                    tails.append(f"rank {rank}: {lines[-1]}")
        return ("; " + "; ".join(tails)) if tails else ""

    def _receive(self, conn, timeout):
        if not conn.poll(timeout):
            self.close()
            raise RuntimeError(f"a tensor-parallel rank sent nothing for {timeout} s{self._stderr()}")
        try:
            return conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"a tensor-parallel rank died{self._stderr()}") from None

    def _request(self, op, *args):
        """`op` on every rank (each runs it: the collectives need all of them); rank 0's answer."""
        for conn in self._conns:
            conn.send((op, args))
        answers = [self._receive(conn, REQUEST_TIMEOUT_S) for conn in self._conns]
        for rank, status, detail in answers:
            if status != "ok":
                raise RuntimeError(f"rank {rank}: {detail}")
        return answers[0][2]

    def new_cache(self):
        return self._request("new_cache")

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        return _unpack(self._request("forward", _pack((input_ids, position_ids, attention_mask)), cache))

    def attest(self):
        return {"engine": self.name, "tensor_parallel_size": self.size, "backend": "gloo",
                "q_proj_placement": self._placement, "dtype": dtype_name(self.dtype)}

    def close(self):
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send(("stop", ()))
                except OSError:
                    pass
        for p in self._ranks:
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._conns = [None] * len(self._conns)
        self._listener.close()


def _patch(spec):
    import importlib.util

    path, _, function = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(f"kit_rank_patch_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, function)


def rank_main(model_path, dtype, attn, threads, address, authkey, rank_patch=None):
    """One rank: load the model under the group's tensor-parallel plan, then run the parent's requests until "stop"."""
    import inspect
    from multiprocessing.connection import Client

    torch.set_num_threads(threads)
    rank = int(os.environ["RANK"])
    conn = Client(address, authkey=authkey)
    try:
        from transformers import AutoModelForCausalLM, DynamicCache

        from .engines import quiet_transformers

        quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(model_path, tp_plan="auto", dtype=getattr(torch, dtype),
                                                     attn_implementation=attn).eval()
        if rank_patch:
            with torch.no_grad():
                _patch(rank_patch)(model, rank)
        weight = model.model.layers[0].self_attn.q_proj.weight
        conn.send((rank, "ready", str(getattr(weight, "placements", "replicated"))))
    except Exception as exc:  # the parent reports it and stops every rank
        conn.send((rank, "error", f"{type(exc).__name__}: {exc}"))
        return
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    caches = {}
    while True:
        op, args = conn.recv()
        if op == "stop":
            return
        try:
            with torch.no_grad():
                if op == "new_cache":
                    caches[len(caches)] = DynamicCache(config=model.config)
                    answer = len(caches) - 1
                else:
                    (ids, positions, mask), cache = _unpack(args[0]), args[1]
                    logits = model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                   use_cache=cache is not None, **{cache_kwarg: caches.get(cache)}).logits
                    answer = _pack(logits) if rank == 0 else None
            conn.send((rank, "ok", answer))
        except Exception as exc:
            conn.send((rank, "error", f"{type(exc).__name__}: {exc}"))
