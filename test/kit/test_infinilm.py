"""--engine infinilm: InfiniLM's InferEngine under the kit. The parts that need no InfiniLM (the config view,
the refusal without it, the settings) always run; the rest skip with the reason where it is not built
(make setup-infinilm: its sources are not on the package index)."""

import importlib.util
import json
import os

import pytest
from kit_helpers import LLAMA, copy_checkpoint, edit_weights, run_script, scale_weight

from kitcore import checkpoints
from kitcore.infinilm import _rope_top_level

INFERENCE = f"{LLAMA}/test_llama_inference.py"
FORWARD = f"{LLAMA}/test_forward_validation.py"
INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"
BUILT = importlib.util.find_spec("infinilm") is not None
needs_infinilm = pytest.mark.skipif(not BUILT, reason="InfiniLM is not built here (make setup-infinilm needs its "
                                                      "sources, which CI cannot fetch)")


def test_config_view_changes_config_only(llama_checkpoint):
    before = (llama_checkpoint / "config.json").read_text()
    view = checkpoints.config_view(llama_checkpoint, {"torch_dtype": "bfloat16", "rope_theta": 123.0})
    try:
        cfg = json.loads(open(os.path.join(view.name, "config.json")).read())
        assert cfg["torch_dtype"] == "bfloat16" and cfg["rope_theta"] == 123.0
        weights = os.path.join(view.name, "model.safetensors")
        assert os.path.islink(weights) and os.path.samefile(weights, llama_checkpoint / "model.safetensors")
        assert checkpoints.open_checkpoint(view.name).fingerprint  # a checkpoint the kit can read
    finally:
        view.cleanup()
    assert (llama_checkpoint / "config.json").read_text() == before  # the user's files are never edited


def test_rope_keys_go_to_the_top_level_where_infinilm_reads_them():
    assert _rope_top_level({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) == {"rope_theta": 5e5}
    scaled = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    assert _rope_top_level({"rope_parameters": scaled}) == {"rope_theta": 5e5,
                                                            "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert _rope_top_level({"rope_theta": 1e4}) == {}


@pytest.mark.skipif(BUILT, reason="InfiniLM is built here: the refusal without it cannot be seen")
def test_without_infinilm_the_engine_is_not_available_with_the_fix(llama_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--engine", "infinilm")
    assert r.code == 3, r
    assert "InfiniLM is not importable here" in r.err and "make setup-infinilm" in r.err


def test_engine_args_are_refused_by_engines_that_take_none(llama_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--engine", "compile", "--engine_args", '{"x": 1}')
    assert r.code == 2 and "takes no engine settings" in r.err, r
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--engine_args", "[1]")
    assert r.code == 2 and "expected a JSON object" in r.err, r


@needs_infinilm
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # float16 on the CPU: README, "InfiniLM" (3.5x HF's error)
def test_infinilm_passes_end_to_end_and_forward_validation(dtype, llama_checkpoint, tmp_path):
    common = ["--model_path", llama_checkpoint, "--engine", "infinilm", "--dtype", dtype]
    r = run_script(INFERENCE, *common, json_path=tmp_path / "e2e.json")
    assert r.code == 0, r
    assert "InfiniLM InferEngine" in r.out and r.json["env"]["engines"]["infinilm"].startswith("InfiniLM")
    r = run_script(FORWARD, *common, "--decode_steps", 4)
    assert r.code == 0, r
    assert "verdict: PASS: every step CLOSE" in r.out


@needs_infinilm
def test_infinilm_on_a_faulty_checkpoint_fails_and_the_infinicore_dual_test_locates_it(llama_checkpoint, tmp_path):
    faulty = copy_checkpoint(llama_checkpoint, tmp_path / "faulty")
    edit_weights(faulty, scale_weight("model.layers.1.mlp.down_proj.weight", 1.01))
    common = ["--model_path", faulty, "--reference_path", llama_checkpoint, "--engine", "infinilm", "--dtype", "float32"]
    r = run_script(INFERENCE, *common)
    assert r.code == 1, r
    assert "verdict: FAIL" in r.out
    r = run_script(INTERMEDIATE, *common, json_path=tmp_path / "iv.json")
    assert r.code == 1, r
    assert r.json["first_divergence"] == {"layer": 1, "point": "down_proj"}
    assert r.json["largest_own_error"]["name"] == "layers.1.down_proj"


@needs_infinilm
def test_the_infinicore_dual_test_passes_a_correct_checkpoint(llama_checkpoint, tmp_path):
    r = run_script(INTERMEDIATE, "--model_path", llama_checkpoint, "--engine", "infinilm", "--dtype", "bfloat16",
                   json_path=tmp_path / "iv.json")
    assert r.code == 0, r
    assert "hands out no per-layer activations" in r.out
    assert len([p for p in r.json["points"] if "own" in p]) == 2 + 15 * 2 + 1  # every component of both layers


@needs_infinilm
def test_infinilm_refuses_qwen3_moe_on_the_cpu(moe_checkpoint):
    r = run_script(INFERENCE, "--model_path", moe_checkpoint, "--engine", "infinilm", "--dtype", "float32")
    assert r.code == 3, r
    assert "no kernels for the MoE ops" in r.err
