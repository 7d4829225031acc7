"""`--engine hf --tensor_parallel_size 2`: HF Transformers' own tensor parallelism over two CPU ranks (gloo) that the kit
starts and stops, as a candidate: correct runs pass, a rank that reads another rank's shard fails."""

import pytest
import torch
from kit_helpers import EXTENDED, FAULTY_ENGINES, LLAMA, run_script

INFERENCE = f"{LLAMA}/test_llama_inference.py"
FORWARD = f"{LLAMA}/test_forward_validation.py"


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("qwen3_moe", "bfloat16"),
                                          pytest.param("llama", "bfloat16", marks=EXTENDED),
                                          pytest.param("qwen3_moe", "float32", marks=EXTENDED)])
def test_two_ranks_pass_end_to_end(family, dtype, llama_checkpoint, moe_checkpoint):
    ckpt = llama_checkpoint if family == "llama" else moe_checkpoint
    r = run_script(INFERENCE, "--model_path", ckpt, "--tensor_parallel_size", 2, "--dtype", dtype)
    assert r.code == 0, r
    assert "tp_plan=auto over 2 CPU ranks" in r.out and "tensor_parallel_size=2" in r.out
    assert "calibrated by its error" in r.out  # the ranks are a candidate, HF on one process its peer


def test_two_ranks_keep_their_kv_caches_through_forward_validation(llama_checkpoint):
    r = run_script(FORWARD, "--model_path", llama_checkpoint, "--tensor_parallel_size", 2, "--dtype", "float32",
                   "--decode_steps", 4)
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
    r = run_script(f"{LLAMA}/test_intermediate_validation.py", "--model_path", moe_checkpoint, "--tensor_parallel_size",
                   2, "--dtype", "float32")
    assert r.code == 3 and "dense Llama layers only" in r.err, r


INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"


@pytest.mark.parametrize("engine,first,finding", [
    ("hf", None, None),
    (f"{FAULTY_ENGINES}:OtherShardTPEngine", "layers.1.v_proj", "rank 1's share is the furthest off"),
    (f"{FAULTY_ENGINES}:DivergentReplicaTPEngine", None, "rank 1's differs from rank 0's"),
    (f"{FAULTY_ENGINES}:MissingAllReduceTPEngine", "layers.1.down_proj", "partial sums never all-reduced")])
def test_layer_by_layer_through_the_ranks_names_the_rank(engine, first, finding, llama_checkpoint, tmp_path):
    """Per-rank captures unsharded by HF's plan (column-parallel blocks concatenated in rank order, replicated
    tensors from rank 0, each other rank checked equal): a correct run passes; a rank reading rank 0's shard is
    located at its layer, component and rank; a replica that differs is a finding of its own; a row-parallel
    projection without its all-reduce is located and its partial sums found."""
    r = run_script(INTERMEDIATE, "--model_path", llama_checkpoint, "--engine", engine, "--tensor_parallel_size", 2,
                   "--dtype", "float32", json_path=tmp_path / "r.json")
    assert r.code == (0 if first is None and finding is None else 1), r
    if first:
        assert f"and {first} (FAIL" in r.out, r.out
    if finding:
        assert finding in r.out, r.out
