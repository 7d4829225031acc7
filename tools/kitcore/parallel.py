"""`--engine hf --tensor_parallel_size N`: HF Transformers' own tensor parallelism as a candidate.

The kit starts N rank processes itself (no torchrun): each joins a torch.distributed group over gloo on
127.0.0.1, loads the checkpoint with `from_pretrained(..., tp_plan="auto")` (its weights as DTensors sharded by
the model's own plan: q/k/v/gate/up by output rows, o/down by input columns with an all-reduce) and serves the
parent's requests over a local socket: every rank runs each forward (the collectives need all of them), rank 0
hands the logits back. KV caches live in the ranks, one per new_cache(). Every request has a timeout; a rank that
dies or hangs ends the check with its last stderr lines; the ranks are stopped with the engine and at exit.
CPU ranks only (each bound to its share of the CPU threads); end-to-end, forward and batch validation and corpus
scoring run through it.

With --enable_expert_parallel (a Qwen3-MoE model) HF's expert plan spreads the experts whole over the same ranks
(EP = TP, as InfiniLM ties them): each rank runs its own experts on every token, the others' routes masked, and an
all-reduce sums them.

Layer by layer (capture()): every rank hands out its own tensors, unsharded by the layout of the plan (RANK_LAYOUT,
RankCaptures; vLLM's workers are unsharded the same way): the outputs of the column-parallel projections (and
Qwen3's per-head q/k norms, q/k after RoPE by heads) and the inputs of the row-parallel ones are each rank's block,
concatenated in rank order; copies of a KV head where there are fewer KV heads than ranks, each from its first
holder; under expert parallelism each [token, k] slot of expert_outputs belongs to the rank that holds the expert;
everything else is replicated after the all-reduce and taken from rank 0. Every copy is checked equal to the one
taken (a difference is a finding of its own: `replicated_differences`). ranks_of() says which elements of a point
each rank computed, so a first divergence names the rank. The peer of a candidate over ranks adds its sums as the
ranks do (sum_as_ranks). Not yet: partial sums before the all-reduce as points, NCCL ranks.
"""

import importlib
import io
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Listener
from pathlib import Path

import torch

from .checkpoints import open_checkpoint
from .devices import dtype_name
from .errors import EngineFailed, Unavailable, UsageError

LOAD_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
STOP_TIMEOUT_S = 10
# how a point's tensor is spread over the ranks under HF's plans: "columns" (each rank its block of the last
# dimension, in rank order: q/k/v/gate/up by output rows, the per-head q/k norms, o_proj and down_proj's inputs);
# "experts" (expert parallelism: each [token, k] slot of expert_outputs computed by the rank holding that expert);
# every other point replicated (the router, moe_out, and each expert's output all-reduced under plain TP)
RANK_LAYOUT = {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "attn_out", "gate_proj", "up_proj",
                                "act_mul"), "columns"), **dict.fromkeys(("q_rope", "k_rope"), "heads"),
               "expert_outputs": "experts"}
SPLIT_DIM = {"columns": -1, "heads": 1}  # q/k after RoPE are [B, heads, S, D]: each rank its heads
# where there are fewer KV heads than ranks, copies of one KV head on several ranks
KV_POINTS = ("k_proj", "v_proj", "k_norm", "k_rope")
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


class RankCaptures:
    """Captures handed out by every rank, unsharded by RANK_LAYOUT (module docstring); an engine spread over ranks
    sets `size`, `kv_heads` and `experts_per_rank` (None without expert parallelism) and offers ranks_of()."""

    rank_slices, replicated_differences, rank_parts = {}, (), {}  # of the last unshard()

    def unshard(self, per_rank):
        """[{point: this rank's tensor}] in rank order -> {point: the whole tensor}."""
        out, self.rank_slices, self.replicated_differences, self.rank_parts = {}, {}, [], {}
        for name in per_rank[0]:
            parts = [captures[name] for captures in per_rank]
            point = name.rsplit(".", 1)[-1]
            layout = RANK_LAYOUT.get(point)
            if layout in SPLIT_DIM and point in KV_POINTS and self.kv_heads < self.size:
                self._unshard_kv_copies(name, parts, out, SPLIT_DIM[layout])
                continue
            if layout in SPLIT_DIM:
                dim = SPLIT_DIM[layout]
                out[name] = torch.cat(parts, dim)
                edges = torch.tensor([0] + [p.shape[dim] for p in parts]).cumsum(0).tolist()
                self.rank_slices[name] = [(r, _block(dim, a, b)) for r, (a, b) in enumerate(zip(edges, edges[1:]))]
                continue
            if layout == "experts" and self.experts_per_rank:  # all-reduced; each slot owned by its expert's rank
                owner = per_rank[0][name.replace("expert_outputs", "experts_selected")] // self.experts_per_rank
                self.rank_slices[name] = [(rank, owner == rank) for rank in range(self.size)]
            out[name] = parts[0]
            self._check_copies(name, parts, range(self.size))
        return out

    def _unshard_kv_copies(self, name, parts, out, dim):
        """Fewer KV heads than ranks: rank r holds a copy of KV head r * kv_heads // size. The point is each head
        from the first rank holding it; every other copy is checked equal to that one."""
        width = parts[0].shape[dim]
        holders = [[r for r in range(self.size) if r * self.kv_heads // self.size == h] for h in range(self.kv_heads)]
        out[name] = torch.cat([parts[ranks[0]] for ranks in holders], dim)
        self.rank_slices[name] = [(ranks[0], _block(dim, h * width, (h + 1) * width))
                                  for h, ranks in enumerate(holders)]
        for ranks in holders:
            self._check_copies(name, parts, ranks)

    def _check_copies(self, name, parts, ranks):
        """Every rank of `ranks` holds what the first one does; those that do not are findings."""
        first, *others = ranks
        differing = [(name, r, first) for r in others if not torch.equal(parts[r], parts[first])]
        if differing:
            self.replicated_differences += differing
            self.rank_parts[name] = parts

    def ranks_of(self, name):
        """("computed", [(rank, index)]): which elements of a point of the last capture each rank computed
        (`tensor[index]`: a block along the split dimension, or a mask of expert_outputs' slots under expert
        parallelism); for a replicated point that differs between ranks, ("held", [(rank, its whole tensor)]);
        else None."""
        if name in self.rank_parts and name not in self.rank_slices:
            return "held", list(enumerate(self.rank_parts[name]))
        indices = self.rank_slices.get(name)
        return None if indices is None else ("computed", indices)


class TensorParallelHFEngine(RankCaptures):
    name = "hf-tp"
    padding_sides = ("left", "right")
    OPTIONS = ("tensor_parallel_size", "enable_expert_parallel")
    capabilities = frozenset({"new_cache", "attest", "capture", "ranks_of", "rope"})
    # "path/to/file.py:function": run in every rank on the loaded model, function(model, rank), before any request:
    # how a plugin puts its own sharded layer (or, in the kit's tests, a rank's bug) in place
    rank_patch = None

    def __init__(self, model_path, device, dtype, attn="sdpa", tensor_parallel_size=2, enable_expert_parallel=False):
        if device.type != "cpu":
            raise Unavailable(f"--tensor_parallel_size with --engine hf: CPU ranks over gloo only so far, not {device}")
        if tensor_parallel_size < 2:
            raise UsageError(f"--tensor_parallel_size {tensor_parallel_size}: at least 2 for tensor parallelism")
        self.device, self.dtype, self.size = device, dtype, tensor_parallel_size
        config = open_checkpoint(model_path).config
        self.model_type, experts = config.get("model_type"), config.get("num_experts") or 0
        if enable_expert_parallel and not experts:
            raise UsageError(f"--enable_expert_parallel: this {self.model_type} model has no experts; drop it")
        if enable_expert_parallel and experts % tensor_parallel_size:
            raise UsageError(f"--enable_expert_parallel: {experts} experts do not spread evenly over "
                             f"{tensor_parallel_size} ranks")
        self.experts_per_rank = experts // tensor_parallel_size if enable_expert_parallel else None
        self.ranks = {"tensor_parallel_size": tensor_parallel_size, "expert_parallel": enable_expert_parallel}
        self.kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
        split = {"attention heads": config.get("num_attention_heads"),
                 "intermediate_size": config.get("intermediate_size")}
        if not enable_expert_parallel:  # each expert's intermediate split too
            split["moe_intermediate_size"] = config.get("moe_intermediate_size")
        uneven = [f"{what} {n}" for what, n in split.items() if n and n % tensor_parallel_size]
        if uneven:
            raise Unavailable(f"--tensor_parallel_size {tensor_parallel_size}: {', '.join(uneven)} do not split evenly "
                              "over the ranks; choose a size that divides them")
        # fewer KV heads than ranks need copies of them, which only a rank_patch of the engine's own makes
        if self.kv_heads % tensor_parallel_size and (tensor_parallel_size % self.kv_heads or self.rank_patch is None):
            raise Unavailable(f"--tensor_parallel_size {tensor_parallel_size} over {self.kv_heads} KV heads: HF's plan "
                              "cuts the KV heads evenly by rank and cannot replicate them; an engine that does puts "
                              "its attention in every rank with rank_patch (tools/kitcore/parallel.py)")
        threads = max(1, torch.get_num_threads() // tensor_parallel_size)
        authkey = secrets.token_bytes(16)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        env = dict(os.environ, WORLD_SIZE=str(tensor_parallel_size), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()), OMP_NUM_THREADS=str(threads))
        code = (f"import sys; sys.path.insert(0, {TOOLS!r}); from kitcore.parallel import rank_main; "
                f"rank_main({str(model_path)!r}, {dtype_name(dtype)!r}, {attn!r}, {threads}, "
                f"{self._listener.address!r}, {authkey!r}, {self.rank_patch!r}, {enable_expert_parallel!r})")
        self._ranks, self._conns = [], [None] * tensor_parallel_size
        # the ranks stop with the engine: when it is closed, collected, or at exit
        self.close = weakref.finalize(self, _stop, self._ranks, self._conns, self._listener)
        for rank in range(tensor_parallel_size):
            self._ranks.append(subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(rank),
                                                LOCAL_RANK=str(rank)), stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE, text=True))
        for conn in self._accept_all():
            rank, status, detail = self._receive(conn, LOAD_TIMEOUT_S)
            if status == "patch error":
                self.close()
                raise EngineFailed(f"rank_patch {self.rank_patch} raised on rank {rank}: {detail}")
            if status != "ready":
                self.close()
                raise Unavailable(f"--tensor_parallel_size {tensor_parallel_size}: HF could not load the model over "
                                  f"the ranks (rank {rank}: {detail})")
            self._conns[rank] = conn
            if rank == 0:
                self._placement = detail
        self.description = (f"HF Transformers tp_plan=auto over {tensor_parallel_size} CPU ranks (gloo)"
                            + (", experts spread whole over them (expert parallel)" if enable_expert_parallel else "")
                            + f", {threads} thread(s) each, {dtype_name(dtype)} {attn}")

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
            raise Unavailable(f"a tensor-parallel rank did not start{self._stderr()}")
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
            raise EngineFailed(f"a tensor-parallel rank sent nothing for {timeout} s{self._stderr()}")
        try:
            return conn.recv()
        except EOFError:
            self.close()
            raise EngineFailed(f"a tensor-parallel rank died{self._stderr()}") from None

    def _request(self, op, *args):
        """`op` on every rank (each runs it: the collectives need all of them): rank 0's answer, or every rank's for
        a capture."""
        for conn in self._conns:
            conn.send((op, args))
        answers = [self._receive(conn, REQUEST_TIMEOUT_S) for conn in self._conns]
        for rank, status, detail in answers:
            if status != "ok":
                raise EngineFailed(f"tensor-parallel rank {rank} raised {detail}")
        return [answer for _, _, answer in answers] if op == "capture" else answers[0][2]

    def new_cache(self):
        return self._request("new_cache")

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        return _unpack(self._request("forward", _pack((input_ids, position_ids, attention_mask)), cache))

    def rope(self, x, position_ids):
        """x [B, heads, S, D] rotated by rank 0's rotary embedding (the one every rank holds)."""
        return _unpack(self._request("rope", _pack((x, position_ids))))

    def capture(self, input_ids, position_ids, layers=None):
        """Every rank's captures of one forward, unsharded by RANK_LAYOUT (module docstring)."""
        return self.unshard([_unpack(raw) for raw in self._request("capture", _pack((input_ids, position_ids)))])

    def attest(self):
        return {"engine": self.name, "tensor_parallel_size": self.size, "backend": "gloo",
                "expert_parallel_size": self.size if self.experts_per_rank else 1, **self._placement,
                "dtype": dtype_name(self.dtype)}


def _block(dim, start, stop):
    """The index of elements start:stop along `dim` (-1 or 1) of a tensor: `tensor[_block(...)]`."""
    return (..., slice(start, stop)) if dim == -1 else (slice(None), slice(start, stop))


def _stop(ranks, conns, listener):
    """Ask every rank to stop, kill one that does not within STOP_TIMEOUT_S, close the listener."""
    for conn in conns:
        if conn is not None:
            try:
                conn.send(("stop", ()))
            except OSError:
                pass
    for p in ranks:
        try:
            p.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    conns[:] = [None] * len(conns)
    listener.close()


def _patch(spec):
    import importlib.util

    path, _, function = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(f"kit_rank_patch_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, function)


def _rank_capture(model, ids, positions):
    """This rank's tensors of one forward at every one of the kit's points (kitcore.points), as they are
    on this rank."""
    from .engines import HFEngine

    out, hooks = {}, []

    def keep(name, flat=False):
        def hook(module, args, output):
            tensor = (output[0] if isinstance(output, tuple) else output).detach().clone()
            out[name] = tensor.flatten(-2) if flat else tensor  # q/k norms work on [B, S, heads, D]
        return hook

    def keep_input(name):
        def hook(module, args):
            out[name] = args[0].detach().clone()
        return hook

    def keep_routing(prefix, experts):
        def hook(module, args, output):  # the router's points, each expert's output run through this rank's plan
            for name, tensor in HFEngine._routing_points(experts, args[0], *output).items():
                out[prefix + name] = tensor.reshape(*ids.shape, *tensor.shape[1:])
        return hook

    base = model.model
    hooks.append(base.embed_tokens.register_forward_hook(keep("embed_tokens")))
    for i, layer in enumerate(base.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
        for point, module in (("input_layernorm", layer.input_layernorm), ("q_proj", attn.q_proj),
                              ("k_proj", attn.k_proj), ("v_proj", attn.v_proj), ("o_proj", attn.o_proj),
                              ("post_attention_layernorm", layer.post_attention_layernorm), ("output", layer)):
            hooks.append(module.register_forward_hook(keep(p + point)))
        for point, module in (("attn_out", attn.o_proj), ("attn_residual", layer.post_attention_layernorm)):
            hooks.append(module.register_forward_pre_hook(keep_input(p + point)))
        if getattr(attn, "q_norm", None) is not None:
            hooks += [attn.q_norm.register_forward_hook(keep(p + "q_norm", flat=True)),
                      attn.k_norm.register_forward_hook(keep(p + "k_norm", flat=True))]
        if hasattr(mlp, "experts"):
            hooks += [mlp.gate.register_forward_hook(keep_routing(p, mlp.experts)),
                      mlp.register_forward_hook(keep(p + "moe_out"))]
        else:
            hooks += [mlp.gate_proj.register_forward_hook(keep(p + "gate_proj")),
                      mlp.up_proj.register_forward_hook(keep(p + "up_proj")),
                      mlp.down_proj.register_forward_pre_hook(keep_input(p + "act_mul")),
                      mlp.down_proj.register_forward_hook(keep(p + "down_proj"))]
    hooks.append(base.norm.register_forward_hook(keep("final_norm")))
    try:
        out["logits"] = model(input_ids=ids, position_ids=positions).logits
    finally:
        for h in hooks:
            h.remove()
    head_dim = base.layers[0].self_attn.head_dim
    for i in range(len(base.layers)):  # HF rotates inside the attention, unhooked: q/k again with its own RoPE
        for point in ("q", "k"):
            flat = out.get(f"layers.{i}.{point}_norm", out[f"layers.{i}.{point}_proj"])
            out[f"layers.{i}.{point}_rope"] = _rotate(model, flat.view(*flat.shape[:2], -1, head_dim).transpose(1, 2),
                                                      positions)
    return out


def _rotate(model, heads, positions):
    """[B, heads, S, D] after the model's own rotary embedding."""
    cos, sin = model.model.rotary_emb(heads, positions)
    return importlib.import_module(type(model).__module__).apply_rotary_pos_emb(heads, heads, cos, sin)[0]


def _placements(model):
    """Where the ranks' shards of one attention and (a MoE model's) one experts weight lie, as torch names them."""
    first = model.model.layers[0]
    found = {"q_proj_placement": str(getattr(first.self_attn.q_proj.weight, "placements", "replicated"))}
    experts = next((layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")), None)
    if experts is not None:
        found["experts_placement"] = str(getattr(experts.gate_up_proj, "placements", "replicated"))
    return found


def rank_main(model_path, dtype, attn, threads, address, authkey, rank_patch=None, expert_parallel=False):
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
        if expert_parallel:  # HF's expert plan (experts whole, Shard(0)) over the same ranks as its tensor plan
            from transformers.distributed import DistributedConfig

            size = int(os.environ["WORLD_SIZE"])
            spread = dict(distributed_config=DistributedConfig(tp_size=size, ep_size=size))
        else:
            spread = dict(tp_plan="auto")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), attn_implementation=attn,
                                                     **spread).eval()
    except Exception as exc:  # the parent reports it and stops every rank
        conn.send((rank, "error", f"{type(exc).__name__}: {exc}"))
        return
    try:
        if rank_patch:
            with torch.no_grad():
                _patch(rank_patch)(model, rank)
    except Exception as exc:  # the engine's own code: its failure
        conn.send((rank, "patch error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send((rank, "ready", _placements(model)))
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    caches = {}
    while True:
        op, args = conn.recv()
        if op == "stop":
            return
        try:
            with torch.no_grad():
                if op == "capture":
                    answer = _pack(_rank_capture(model, *_unpack(args[0])))
                elif op == "rope":
                    answer = _pack(_rotate(model, *_unpack(args[0]))) if rank == 0 else None
                elif op == "new_cache":
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


def sum_as_ranks(model, ranks):
    """Make a one-process HF model add up what the ranks of `ranks` (an engine's declared `ranks`) sum: every
    row-parallel projection (o_proj, a dense down_proj) as N partial products over blocks of its input, each in the
    model's dtype, added in rank order in that dtype as an all-reduce does; a sparse block's experts as N partial
    outputs (each rank's experts under expert parallelism, each rank's slice of every expert otherwise) added the same
    way. The peer of a candidate spread over ranks: its error includes the all-reduce's own rounding."""
    size, by_expert = ranks["tensor_parallel_size"], ranks["expert_parallel"]
    for layer in model.model.layers:
        projections = [layer.self_attn.o_proj] + ([layer.mlp.down_proj] if hasattr(layer.mlp, "down_proj") else [])
        for module in projections:
            module.forward = _row_parallel_sum(module, size)
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.forward = _experts_sum(layer.mlp.experts, size, by_expert)


def _add_in_rank_order(partials):
    total = partials[0]
    for part in partials[1:]:
        total = total + part  # in the partials' dtype, as the all-reduce adds them
    return total


def _row_parallel_sum(module, size):
    blocks = module.weight.shape[1] // size

    def forward(x):
        partials = [torch.nn.functional.linear(x[..., r * blocks:(r + 1) * blocks],
                                               module.weight[:, r * blocks:(r + 1) * blocks]) for r in range(size)]
        total = _add_in_rank_order(partials)
        return total if module.bias is None else total + module.bias
    return forward


def _experts_sum(experts, size, by_expert):
    import copy

    whole = type(experts).forward
    if by_expert:
        own = experts.num_experts // size

        def forward(hidden_states, top_k_index, top_k_weights):
            return _add_in_rank_order([whole(experts, hidden_states, top_k_index,
                                             top_k_weights.masked_fill(top_k_index // own != r, 0.0))
                                       for r in range(size)])
        return forward
    inner = experts.down_proj.shape[-1]
    block = inner // size
    slices = []
    for r in range(size):  # rank r's slice of every expert: its gate and up rows, its down_proj columns
        part = copy.copy(experts)
        rows = torch.cat([torch.arange(r * block, (r + 1) * block), inner + torch.arange(r * block, (r + 1) * block)])
        part._parameters = {"gate_up_proj": torch.nn.Parameter(experts.gate_up_proj[:, rows], requires_grad=False),
                            "down_proj": torch.nn.Parameter(experts.down_proj[..., r * block:(r + 1) * block],
                                                            requires_grad=False)}
        part.intermediate_dim = block
        slices.append(part)

    def forward(hidden_states, top_k_index, top_k_weights):
        return _add_in_rank_order([whole(part, hidden_states, top_k_index, top_k_weights) for part in slices])
    return forward
