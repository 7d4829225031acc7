"""Benchmarks against the device's limit: FLOPs and bytes on hand-computed shapes, the roofline bound, the
cached ceilings, sweeps and cold timings."""

import json
from types import SimpleNamespace

import pytest
import torch
from kit_helpers import run_script

from kitcore import attention_bench, moe_bench, roofline
from kitcore.devices import Device

ATTENTION = "test/models/qwen3_moe/attention_test.py"
MOE = "test/models/qwen3_moe/moe_test.py"
QUICK = ["--warmups", 1, "--runs", 3]
CONFIG = SimpleNamespace(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                         moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2)


def test_attention_flops_and_bytes_by_hand():
    flops_and_bytes = attention_bench.flops_and_bytes
    # 4 new tokens on 6 past, float32: projections 2*4*128*(128+2*64) + 2*4*128*128 = 393216; each query sees
    # 6 + its causal prefix: 4*6 + 4*5/2 = 34 keys, attention 2*2*4*34*32 = 17408
    assert flops_and_bytes(CONFIG, 4, 6, torch.float32)[0] == 393216 + 17408
    # weights (128*8*32 + 4*32*128 + 2*32)*4 = 196864; activations 2*4*128*4 = 4096; KV read 2*2*32*10*4 = 5120,
    # written 2*2*32*4*4 = 2048
    assert flops_and_bytes(CONFIG, 4, 6, torch.float32)[1] == 196864 + 4096 + 5120 + 2048
    batch = attention_bench.batch_flops_and_bytes(CONFIG, [6, 6], torch.float32)
    one = flops_and_bytes(CONFIG, 1, 6, torch.float32)
    assert batch == (2 * one[0], 2 * one[1] - 196864)  # a batch reads the weights once


def test_moe_flops_and_bytes_by_hand():
    # 16 tokens, 5 experts used, bfloat16: router 2*16*128*8 = 32768, experts 2*3*128*64*2*16 = 1572864;
    # bytes (8*128 + 5*3*128*64 + 2*16*128) * 2 = 256000
    assert moe_bench.flops_and_bytes(CONFIG, 16, 5, torch.bfloat16) == (32768 + 1572864, 256000)


def test_roofline_bound_names_the_larger_term():
    ceilings = roofline.Ceilings("test", 1e10, {"float32": 1e11}, {})
    memory = roofline.bound(1e9, 1e9, ceilings, "float32", 200.0)  # 100 ms of bytes, 10 ms of FLOPs
    assert (memory.ms, memory.kind, memory.fraction) == (100.0, "memory", 0.5)
    compute = roofline.bound(1e11, 1e8, ceilings, "float32", 1000.0)
    assert (compute.ms, compute.kind, compute.fraction) == (1000.0, "compute", 1.0)


def test_ceilings_are_measured_once_and_a_corrupt_cache_is_remeasured(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_KIT_CACHE", str(tmp_path))
    cpu, logs = Device("cpu", "cpu"), []
    first = roofline.ceilings_for(cpu, ["float32"], log=logs.append)
    assert len(logs) == 1 and first.bandwidth_bytes_per_s > 1e8 and first.flops_per_s["float32"] > 1e8
    again = roofline.ceilings_for(cpu, ["float32"], log=logs.append)
    assert len(logs) == 1 and again == first
    path = next((tmp_path / "ceilings").iterdir())
    path.write_text("{not json")
    roofline.ceilings_for(cpu, ["float32"], log=logs.append)
    assert len(logs) == 2 and json.loads(path.read_text())["fingerprint"] == roofline.fingerprint(cpu)


def test_cache_flush_is_twice_the_last_level_cache():
    flush = roofline.CacheFlush(Device("cpu", "cpu"))
    assert flush.bytes == 2 * roofline.last_level_cache_bytes(Device("cpu", "cpu")) >= 2 * 2**20
    flush()


def test_moe_sweep_with_cold_timings(moe_checkpoint, tmp_path):
    r = run_script(MOE, "--model_path", moe_checkpoint, "--sweep", "--cold", *QUICK, json_path=tmp_path / "m.json")
    assert r.code == 0, r
    points = {c["size"]: c for c in r.json["cases"].values()}
    assert sorted(points) == [1, 4, 16, 64, 256, 1024, 4096]
    assert all(c["bound"] in ("memory", "compute") and c["roofline_fraction"] > 0 and "cold" in c
               for c in points.values())
    records = r.json["records"]
    fractions = [x for x in records if x["metric"] == "roofline_fraction"]
    assert len(fractions) == 14 and {x["bound"] for x in fractions} <= {"memory", "compute"}
    assert {x.get("cache") for x in fractions} == {None, "cold"}
    assert "cold / warm median" in r.out and "of the device's limit" in r.out


def test_attention_sweep_covers_length_context_and_batch(moe_checkpoint, tmp_path):
    r = run_script(ATTENTION, "--model_path", moe_checkpoint, "--sweep", *QUICK, json_path=tmp_path / "a.json")
    assert r.code == 0, r
    sizes = {}
    for x in r.json["records"]:
        if x["metric"] == "roofline_ms":
            sizes.setdefault(x["sweep"], set()).add(x["size"])
    assert sizes == {"prefill_length": {16, 64, 256, 1023}, "context_length": {16, 64, 256, 1023},
                     "batch": {1, 2, 4, 8, 16}}


@pytest.mark.parametrize("script", [ATTENTION, MOE])
def test_help_states_the_formulas(script):
    r = run_script(script, "--help")
    assert r.code == 0 and "FLOPs =" in r.out and "bytes =" in r.out and "roofline_ms" in r.out
