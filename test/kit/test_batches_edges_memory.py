"""Batches, edge inputs and memory: the cases where engines break (batch invariance, ragged caches,
padding, context limits, inputs without a tokenizer, memory that grows with every call)."""

import json
import shutil

import pytest
import torch
from kit_helpers import EXTENDED, FAULTY_ENGINES, LLAMA, copy_checkpoint, edit_config, load_script, run_script

from kitcore import inputs, memory

BATCH = f"{LLAMA}/test_batch_validation.py"
INFERENCE = f"{LLAMA}/test_llama_inference.py"
FORWARD = f"{LLAMA}/test_forward_validation.py"
INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"
MOE = "test/models/qwen3_moe/moe_test.py"
SMALL_BATCHES = ("--lengths", "1,5,17,40", "--batch_sizes", "2,4")  # every check, fewer tokens


@pytest.mark.parametrize("dtype,engine,attn,lengths", [
    ("bfloat16", "hf", "sdpa", ()),  # the defaults: 8 prompts of 1 to 300 tokens, batches of 2, 4, 8
    ("float16", "hf", "eager", SMALL_BATCHES),
    pytest.param("float32", "compile", "sdpa", SMALL_BATCHES, marks=EXTENDED),
])
def test_batch_validation_passes_correct_engines(dtype, engine, attn, lengths, llama_checkpoint, tmp_path):
    r = run_script(BATCH, "--model_path", llama_checkpoint, "--dtype", dtype, "--engine", engine, "--attn", attn,
                   *lengths, json_path=tmp_path / "batch.json")
    assert r.code == 0, r
    assert "NOT " not in r.out and "FAIL" not in r.out
    assert "shared prefix row 2" in r.out and "decode row 3" in r.out
    if engine == "hf":
        assert "right #0 row 1" in r.out  # hf declares right padding too
    kinds = {rec["invariance"] for rec in r.json["records"] if rec["metric"] == "invariant_max_abs"}
    assert kinds <= {"bitwise", "within_rounding"}


@pytest.mark.parametrize("fault,expected,not_expected", [
    # the mask ignored, positions from the first column: padded rows differ from themselves alone
    ("MaskIgnoringEngine", "batch 2 left #0 row 0 (prompt 0, 1 tokens)", None),
    # every row gets row 0's (the shortest prompt's) positions
    ("RowZeroPositionsEngine", "batch 2 left #0 row 1 (prompt 3, 40 tokens)", None),
    # decode reads the next row's cache length: prefill and every no-cache batch pass
    ("DecodeOtherRowLengthEngine", "decode row 0 (prompt 0, 1 tokens + 4 steps)", "NOT "),
])
def test_batch_faults_fail_naming_row_and_step(fault, expected, not_expected, llama_checkpoint):
    r = run_script(BATCH, "--model_path", llama_checkpoint, "--dtype", "float32",
                   "--engine", f"{FAULTY_ENGINES}:{fault}", *SMALL_BATCHES)
    assert r.code == 1, r
    failing = [ln for ln in r.out.splitlines() if ("FAIL" in ln or "NOT " in ln) and "verdict" not in ln]
    assert any(ln.strip().startswith(expected) for ln in failing), r
    if not_expected:
        assert not any(not_expected in ln for ln in failing), r
    if fault == "DecodeOtherRowLengthEngine":
        assert all((ln.strip().startswith("decode row") and "from decode step 1" in ln)
                   or ln.strip().startswith("every step of every row together") for ln in failing), r


def test_engine_without_batches_is_not_available(llama_checkpoint):
    r = run_script(BATCH, "--model_path", llama_checkpoint, "--engine", "llama.cpp", "--dtype", "float32")
    assert r.code == 3, r  # llama.cpp takes one prompt at a time (or is not installed): either way exit 3


@pytest.mark.parametrize("argv,message", [
    (("--batch_sizes", "1,2"), "--batch_sizes"),
    (("--batch_sizes", "16"), "need at least 16 prompts"),
    (("--lengths", "4,0"), "--lengths"),
    (("--lengths", "600,4"), "exceeds max_position_embeddings=512"),
])
def test_batch_bad_input(argv, message, llama_checkpoint):
    r = run_script(BATCH, "--model_path", llama_checkpoint, *argv)
    assert r.code == 2 and message in r.err and "Traceback" not in r.err, r


def test_intermediate_validation_checks_every_row_without_padding(llama_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Return the sum.\nOpen a file and return a stream. Raise OSError upon failure.\n")
    r = run_script(INTERMEDIATE, "--model_path", llama_checkpoint, "--prompts-file", prompts, "--dtype", "float32",
                   json_path=tmp_path / "iv.json")
    assert r.code == 0, r
    assert "== row 0 of 2" in r.out and "== row 1 of 2" in r.out
    rows = {p["row"] for p in r.json["points"]}
    assert rows == {0, 1}
    rows_in_records = {rec.get("row") for rec in r.json["records"] if rec["metric"] == "nmse"}
    assert rows_in_records == {0, 1}


@pytest.mark.parametrize("edge", ["one_token", "bos_only", "repeated_512", "extreme_ids", "at_max_positions"])
def test_edge_inputs_pass_a_correct_engine(edge, llama_checkpoint, tmp_path):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--edge", edge, json_path=tmp_path / "e.json")
    assert r.code == 0, r


def test_prompt_and_decode_exactly_at_the_context(llama_checkpoint):
    r = run_script(FORWARD, "--model_path", llama_checkpoint, "--edge", "at_max_positions", "--decode_steps", 4)
    assert r.code == 0, r
    assert "input: (1, 508) tokens" in r.out


@pytest.mark.parametrize("script,argv,message", [
    (FORWARD, ("--edge", "repeated_512"), "512 tokens + 8 decode steps exceed max_position_embeddings=512"),
    (INFERENCE, ("--edge", "long_4096"), "4096 tokens exceed max_position_embeddings=512"),
    (FORWARD, ("--edge", "at_max_positions", "--decode_steps", 512), "leave no room for a prompt"),
])
def test_impossible_edge_requests_are_usage_errors(script, argv, message, llama_checkpoint):
    r = run_script(script, "--model_path", llama_checkpoint, *argv)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r


def test_long_prompt_on_a_llama3_scaled_4096_context(llama_checkpoint, tmp_path):
    ckpt = copy_checkpoint(llama_checkpoint, tmp_path / "llama3-4k")
    edit_config(ckpt, max_position_embeddings=4096, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512})
    r = run_script(INFERENCE, "--model_path", ckpt, "--edge", "long_4096", json_path=tmp_path / "long.json")
    assert r.code == 0, r
    assert "input: (1, 4096) tokens" in r.out


@pytest.fixture(scope="module")
def no_tokenizer(llama_checkpoint, moe_checkpoint, tmp_path_factory):
    """The tiny Llama and Qwen3-MoE without their tokenizer files."""
    out = {}
    for name, src in (("llama", llama_checkpoint), ("moe", moe_checkpoint)):
        dst = tmp_path_factory.mktemp(name) / "ckpt"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
        out[name] = dst
    return out


@pytest.mark.parametrize("script,argv,code", [
    (INFERENCE, (), 2),
    (INFERENCE, ("--inputs", "random"), 0),
    (INFERENCE, ("--edge", "one_token"), 0),
    (INFERENCE, ("--input_ids", "5,6,7"), 0),
    (BATCH, ("--inputs", "random", *SMALL_BATCHES), 0),
    (FORWARD, ("--inputs", "random", "--decode_steps", 2), 0),
    (MOE, (), 2),
    (MOE, ("--inputs", "random", "--prefill_tokens", 32, "--decode_tokens", 4, "--warmups", 1, "--runs", 3), 0),
])
def test_checkpoint_without_tokenizer(script, argv, code, no_tokenizer):
    ckpt = no_tokenizer["moe" if script == MOE else "llama"]
    r = run_script(script, "--model_path", ckpt, *argv)
    assert r.code == code, r
    if code == 2:
        assert "has no tokenizer files" in r.err and len(r.err.strip().splitlines()) == 1, r


@pytest.mark.parametrize("script", [INFERENCE, FORWARD])
def test_repeat_flags_a_leaking_engine_only(script, llama_checkpoint, tmp_path):
    leaking = run_script(script, "--model_path", llama_checkpoint, "--engine",
                         f"{FAULTY_ENGINES}:KeepEveryCacheEngine", "--repeat", 8, json_path=tmp_path / "leak.json")
    assert leaking.code == 1, leaking
    assert "FAIL: it grows with every call" in leaking.out and "KiB per call" in leaking.out
    assert leaking.json["repeat"]["leaking"]
    correct = run_script(script, "--model_path", llama_checkpoint, "--repeat", 8, json_path=tmp_path / "ok.json")
    assert correct.code == 0, correct
    assert not correct.json["repeat"]["leaking"]
    phases = {rec["metric"] for rec in correct.json["records"] if rec["case"] == "memory"}
    assert {"peak_reference_load", "peak_candidate_load"} <= phases


def test_repeat_needs_three_calls(llama_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--repeat", 2)
    assert r.code == 2 and "--repeat 2" in r.err, r


def test_growth_is_the_median_step_after_the_first_call():
    mib = 2**20
    steady = memory.Growth([100 * mib, 101 * mib, 101 * mib, 101 * mib + 4096, 101 * mib])
    assert not steady.leaking
    leak = memory.Growth([100 * mib + i * 200 * 1024 + (5 * mib if i == 3 else 0) for i in range(8)])
    assert leak.leaking and leak.per_iteration == 200 * 1024


def test_phases_record_peak_memory():
    from kitcore.devices import Device
    from kitcore.results import Results

    phases = memory.Phases(Device("cpu", "cpu"))
    with phases("allocate"):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    with phases("idle"):
        pass
    assert phases.peak["allocate"] - phases.peak["idle"] > 32 * 2**20
    results = Results("t", stream=open("/dev/null", "w"))
    phases.report(results)
    assert {r["metric"] for r in results.records} >= {"allocate", "peak_allocate", "peak_idle"}


def test_compare_shows_memory_growth(tmp_path):
    compare = load_script("tools/compare.py")

    def record(metric, value):
        return {"script": "s", "case": "memory", "metric": metric, "value": value, "unit": "bytes"}

    base = [record("peak_candidate_forward", 400 * 2**20), record("memory_growth_per_call", 0)]
    cur = [record("peak_candidate_forward", 500 * 2**20), record("memory_growth_per_call", 130 * 1024)]
    same = [record("peak_candidate_forward", 401 * 2**20), record("memory_growth_per_call", 8 * 1024)]
    for name, records in (("base", base), ("cur", cur), ("same", same)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"records": records}))
    statuses = {key[-1]: s for key, s, _ in compare.compare_runs(base, cur)}
    assert statuses == {"peak_candidate_forward": "GREW", "memory_growth_per_call": "GREW"}
    assert {s for _, s, _ in compare.compare_runs(base, same)} == {"SAME"}
    r = run_script("tools/compare.py", tmp_path / "base.json", tmp_path / "cur.json")
    assert r.code == 1 and "GREW" in r.out


def test_padding_sides_and_rows():
    batch = inputs.pad([[5, 6, 7], [8]], side="right")
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.position_ids[1, 0] == 0 and batch.lengths == [3, 1]
    left = inputs.pad([[5, 6, 7], [8]])
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left.position_ids[1, 2] == 0
    assert left.row(1).input_ids.tolist() == [[8]] and not left.row(1).padded
