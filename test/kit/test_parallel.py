"""`--engine hf --tensor_parallel_size 2`: HF Transformers' own tensor parallelism over two CPU ranks (gloo) that the kit
starts and stops, as a candidate: correct runs pass, a rank that reads another rank's shard fails."""

import pytest
import torch
from kit_helpers import EXTENDED, FAULTY_ENGINES, LLAMA, run_script

INFERENCE = f"{LLAMA}/test_llama_inference.py"
FORWARD = f"{LLAMA}/test_forward_validation.py"


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), pytest.param("qwen3_moe", "bfloat16", marks=EXTENDED),
                                          pytest.param("llama", "bfloat16", marks=EXTENDED),
                                          pytest.param("qwen3_moe", "float32", marks=EXTENDED)])
def test_two_ranks_pass_end_to_end(family, dtype, llama_checkpoint, moe_checkpoint):
    ckpt = llama_checkpoint if family == "llama" else moe_checkpoint
    r = run_script(INFERENCE, "--model_path", ckpt, "--tensor_parallel_size", 2, "--dtype", dtype)
    assert r.code == 0, r
    assert "tp_plan=auto over 2 CPU ranks" in r.out and "tensor_parallel_size=2" in r.out
    assert "calibrated by its error" in r.out  # the ranks are a candidate, HF on one process its peer


@pytest.mark.parametrize("family,dtype,argv", [("llama", "float32", ()),
                                               ("qwen3_moe", "bfloat16", ("--enable_expert_parallel",))])
def test_two_ranks_keep_their_kv_caches_through_forward_validation(family, dtype, argv, llama_checkpoint,
                                                                   moe_checkpoint):
    ckpt = llama_checkpoint if family == "llama" else moe_checkpoint
    r = run_script(FORWARD, "--model_path", ckpt, "--tensor_parallel_size", 2, "--dtype", dtype, "--decode_steps", 4,
                   *argv)
    assert r.code == 0 and "every step CLOSE" in r.out, r


def test_a_rank_reading_another_ranks_shard_fails(llama_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:OtherShardTPEngine",
                   "--tensor_parallel_size", 2, "--dtype", "float32")
    assert r.code == 1 and "verdict: FAIL" in r.out, r


def test_the_ranks_are_stopped_with_the_engine(llama_checkpoint):
    from kitcore.devices import Device
    from kitcore.parallel import TensorParallelHFEngine

    engine = TensorParallelHFEngine(str(llama_checkpoint), Device("cpu", "cpu"), torch.float32, "sdpa", 2)
    assert all(p.poll() is None for p in engine._ranks)
    engine.close()
    assert all(p.poll() is not None for p in engine._ranks)


def test_tensor_parallel_refusals_are_one_line(llama_checkpoint, moe_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--tensor_parallel_size", 2, "--device_map", "auto")
    assert r.code == 2 and "choose one way to spread the model" in r.err, r
    r = run_script(INFERENCE, "--model_path", moe_checkpoint, "--enable_expert_parallel")
    assert r.code == 2 and "add --tensor_parallel_size N" in r.err, r
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--tensor_parallel_size", 2, "--enable_expert_parallel")
    assert r.code == 2 and "has no experts" in r.err, r
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--tensor_parallel_size", 3)
    assert r.code == 3 and "attention heads 4, intermediate_size 256 do not split evenly" in r.err, r
    # two KV heads over four ranks: HF's plan would cut a head in two
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--tensor_parallel_size", 4)
    assert r.code == 3 and "cannot replicate them" in r.err and "Traceback" not in r.err, r


def test_a_rank_patch_that_raises_is_the_engines_failure(llama_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:RaisingPatchTPEngine",
                   "--tensor_parallel_size", 2)
    assert r.code == 1 and "raised on rank" in r.out and "a shape this plugin did not expect" in r.out, r


def test_the_peer_of_ranks_adds_their_sums_as_they_do(llama_checkpoint, moe_checkpoint):
    """sum_as_ranks splits every row-parallel projection and the experts over the ranks and adds the partial sums in
    rank order: in float32 the model computes what it did (a split that lost or doubled a block would not)."""
    from kitcore.devices import Device
    from kitcore.engines import HFEngine
    from kitcore.parallel import sum_as_ranks

    for ckpt, expert_parallel in ((llama_checkpoint, False), (moe_checkpoint, False), (moe_checkpoint, True)):
        engine = HFEngine(str(ckpt), Device("cpu", "cpu"), torch.float32, "sdpa")
        ids = torch.arange(3, 35)[None]
        plain = engine.forward(ids, torch.arange(32)[None])
        sum_as_ranks(engine.model, {"tensor_parallel_size": 2, "expert_parallel": expert_parallel})
        summed = engine.forward(ids, torch.arange(32)[None])
        torch.testing.assert_close(summed, plain, rtol=1e-5, atol=1e-5)
        assert not torch.equal(summed, plain)  # the sums were split: another rounding


INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"


@pytest.mark.parametrize("engine,first,finding,dtype", [
    ("hf", None, None, "float32"),
    (f"{FAULTY_ENGINES}:OtherShardTPEngine", "layers.1.v_proj", "rank 1's share is the furthest off", "float32"),
    (f"{FAULTY_ENGINES}:DivergentReplicaTPEngine", None, "rank 1's differs from rank 0's", "float32"),
    (f"{FAULTY_ENGINES}:MissingAllReduceTPEngine", "layers.1.down_proj", "partial sums never all-reduced", "float32"),
    (f"{FAULTY_ENGINES}:WrongQKVSplitTPEngine", "layers.1.q_proj", "rank 1's share is the furthest off", "float32"),
    pytest.param(f"{FAULTY_ENGINES}:WrongQKVSplitTPEngine", "layers.1.q_proj", "rank 1's share is the furthest off",
                 "bfloat16", marks=EXTENDED),
    pytest.param(f"{FAULTY_ENGINES}:MissingAllReduceTPEngine", "layers.1.down_proj", "partial sums never all-reduced",
                 "bfloat16", marks=EXTENDED)])
def test_layer_by_layer_through_the_ranks_names_the_rank(engine, first, finding, dtype, llama_checkpoint, tmp_path):
    """Per-rank captures unsharded by HF's plan (column-parallel blocks concatenated in rank order, replicated
    tensors from rank 0, each other rank checked equal): a correct run passes; a rank reading rank 0's shard, or q/k/v
    shards cut from one fused matrix evenly by rank, is located at its layer, component and rank; a replica that
    differs is a finding of its own; a row-parallel projection without its all-reduce is located and its partial sums
    found."""
    r = run_script(INTERMEDIATE, "--model_path", llama_checkpoint, "--engine", engine, "--tensor_parallel_size", 2,
                   "--dtype", dtype, json_path=tmp_path / "r.json")
    assert r.code == (0 if first is None and finding is None else 1), r
    if engine == "hf":  # every point handed out, q/k after RoPE from each rank's heads, the RoPE check run
        assert "not seen" not in r.out and "RoPE: PASS" in r.out, r.out
    if first:
        assert r.json["first_divergence"] == {"layer": 1, "point": first.rsplit(".", 1)[-1]}, r.out
    if finding:
        assert finding in r.out, r.out


@pytest.mark.parametrize("dtype,expert_parallel", [("float32", True), ("bfloat16", False),
                                                   pytest.param("bfloat16", True, marks=EXTENDED),
                                                   pytest.param("float32", False, marks=EXTENDED),
                                                   pytest.param("float16", True, marks=EXTENDED)])
def test_qwen3_moe_layer_by_layer_through_the_ranks(dtype, expert_parallel, moe_checkpoint, tmp_path):
    """Qwen3-MoE over two ranks, each expert split (HF's tensor plan) or the experts spread whole (expert parallel):
    every point passes, the router's and the experts' included, against a peer that adds the ranks' sums as they do."""
    argv = ["--enable_expert_parallel"] if expert_parallel else []
    r = run_script(INTERMEDIATE, "--model_path", moe_checkpoint, "--tensor_parallel_size", 2, "--dtype", dtype, *argv,
                   json_path=tmp_path / "r.json")
    assert r.code == 0, r
    assert f"expert_parallel_size={2 if expert_parallel else 1}" in r.out and "as the all-reduce does" in r.out
    seen = {p["point"].split(".")[-1] for p in r.json["points"] if p["status"] == "ok"}
    assert {"q_norm", "router_logits", "experts_selected", "expert_outputs", "moe_out"} <= seen


def test_global_expert_ids_under_expert_parallelism_name_the_rank(moe_checkpoint, tmp_path):
    """Layer 1's experts handed global ids where local ones were meant: rank 0's coincide, rank 1's routes are lost;
    located at layers.1.expert_outputs, and rank 1 named by the experts it holds."""
    r = run_script(INTERMEDIATE, "--model_path", moe_checkpoint, "--engine", f"{FAULTY_ENGINES}:GlobalExpertIdsEPEngine",
                   "--tensor_parallel_size", 2, "--enable_expert_parallel", "--dtype", "float32",
                   json_path=tmp_path / "r.json")
    assert r.code == 1 and r.json["first_divergence"] == {"layer": 1, "point": "expert_outputs"}, r
    assert "rank 1's share is the furthest off" in r.out


@pytest.fixture(scope="module")
def biased_llama(llama_checkpoint, tmp_path_factory):
    """The tiny Llama with q/k/v/o biases (seeded, 0.02 standard deviation): a row-parallel o_proj with a bias."""
    from kit_helpers import copy_checkpoint, edit_config, edit_weights

    ckpt = copy_checkpoint(llama_checkpoint, tmp_path_factory.mktemp("tp") / "attention_bias")
    generator = torch.Generator().manual_seed(0)

    def add_biases(sd):
        for name in [n for n in sd if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))]:
            sd[name.removesuffix("weight") + "bias"] = 0.02 * torch.randn(sd[name].shape[0], generator=generator)

    edit_weights(ckpt, add_biases)
    edit_config(ckpt, attention_bias=True)
    return ckpt


@pytest.mark.parametrize("engine,dtype,ranks,found", [
    ("BiasOnEveryRankTPEngine", "bfloat16", 2, "off by 1.00x its bias on every token"),
    ("DroppedBiasEngine", "float32", 1, "off by -1.00x its bias on every token"),
    pytest.param("hf", "bfloat16", 2, None, marks=EXTENDED),
    pytest.param("BiasOnEveryRankTPEngine", "float32", 2, "off by 1.00x its bias on every token", marks=EXTENDED)])
def test_a_bias_added_on_every_rank_or_never(engine, dtype, ranks, found, biased_llama, tmp_path):
    """HF adds a row-parallel projection's bias once, after the all-reduce: passes (and layer 0 does so in the
    faulty runs). Added to each rank's partial sum, it is located at layers.1.o_proj and found to be the bias added
    twice; a kernel that drops it, found to be the bias never added."""
    spec = engine if engine == "hf" else f"{FAULTY_ENGINES}:{engine}"
    argv = ["--tensor_parallel_size", ranks] if ranks > 1 else []
    r = run_script(INTERMEDIATE, "--model_path", biased_llama, "--engine", spec, "--dtype", dtype, *argv,
                   json_path=tmp_path / "r.json")
    if found is None:
        assert r.code == 0, r
        return
    assert r.code == 1 and r.json["first_divergence"] == {"layer": 1, "point": "o_proj"}, r
    assert found in r.out and ("added 2 times" if ranks > 1 else "never added") in r.out, r.out


@pytest.mark.parametrize("engine,code", [pytest.param("ReplicatedKVTPEngine", 0, marks=EXTENDED),
                                         ("KVHeadsWrongOffsetTPEngine", 1)])
def test_kv_heads_copied_to_more_ranks_than_heads(engine, code, llama_checkpoint, tmp_path):
    """Two KV heads over four ranks: a sharded attention that copies KV head r * 2 // 4 to rank r passes (layer 0 of
    the faulty one too); one that takes layer 1's at rank % 2 is located at layers.1.k_proj, rank 2 named (the first
    holder of head 1), and the copies that differ (rank 1 from rank 0, rank 3 from rank 2) are findings."""
    r = run_script(INTERMEDIATE, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:{engine}",
                   "--tensor_parallel_size", 4, "--dtype", "float32", json_path=tmp_path / "r.json")
    assert r.code == code, r
    if code:
        assert r.json["first_divergence"] == {"layer": 1, "point": "k_proj"}, r.json["first_divergence"]
        assert "rank 2's share is the furthest off" in r.out
        assert "rank 1's differs from rank 0's" in r.out and "rank 3's differs from rank 2's" in r.out


@pytest.mark.parametrize("family,argv,tensor,first,rank", [
    pytest.param("llama", (), "model.layers.1.mlp.down_proj.weight", "down_proj", None, marks=EXTENDED),
    ("qwen3_moe", ("--enable_expert_parallel",), "model.layers.1.mlp.experts.6.down_proj.weight", "expert_outputs",
     "rank 1's share is the furthest off")])
def test_a_checkpoint_fault_read_by_the_ranks_is_located(family, argv, tensor, first, rank, llama_checkpoint,
                                                         moe_checkpoint, tmp_path):
    """The ranks load a copy with one weight x1.01 (an expert's x1.05), the reference the clean checkpoint: the first
    divergence is that layer and component; under expert parallelism the rank holding the expert (6 of 8: rank 1)."""
    from kit_helpers import copy_checkpoint, edit_weights, scale_weight

    clean = llama_checkpoint if family == "llama" else moe_checkpoint
    faulty = copy_checkpoint(clean, tmp_path / "faulty")
    edit_weights(faulty, scale_weight(tensor, 1.01 if family == "llama" else 1.05))
    r = run_script(INTERMEDIATE, "--model_path", faulty, "--reference_path", clean, "--tensor_parallel_size", 2,
                   "--dtype", "float32", *argv, json_path=tmp_path / "r.json")
    assert r.code == 1 and r.json["first_divergence"] == {"layer": 1, "point": first}, r
    if rank:
        assert rank in r.out, r.out
