"""The README's example plugin (test/models/llama/plain_llama_engine.py) is a working engine: it passes on a correct
checkpoint and fails on a faulty one."""

import pytest
from kit_helpers import LLAMA, ROOT, copy_checkpoint, edit_config, run_script

INFERENCE = f"{LLAMA}/test_llama_inference.py"
FORWARD = f"{LLAMA}/test_forward_validation.py"


@pytest.fixture(scope="module")
def readme_plugin(tmp_path_factory):
    """The example the README names, copied out of the repository as a user would start from it."""
    text = (ROOT / "README.md").read_text()
    assert "--engine test/models/llama/plain_llama_engine.py:PlainLlama" in text
    path = tmp_path_factory.mktemp("plugin") / "my_engine.py"
    path.write_text((ROOT / LLAMA / "plain_llama_engine.py").read_text())
    return f"{path}:PlainLlama"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_readme_plugin_passes_end_to_end_and_forward(readme_plugin, dtype, llama_checkpoint):
    common = ["--model_path", llama_checkpoint, "--engine", readme_plugin, "--dtype", dtype]
    r = run_script(INFERENCE, *common)
    assert r.code == 0, r
    assert "calibrated by its error" in r.out
    r = run_script(FORWARD, *common, "--decode_steps", 4)
    assert r.code == 0, r
    assert "verdict: PASS: every step CLOSE" in r.out


def test_readme_plugin_fails_on_a_wrong_rope_theta(readme_plugin, llama_checkpoint, tmp_path):
    faulty = copy_checkpoint(llama_checkpoint, tmp_path / "faulty")
    edit_config(faulty, rope_theta=15000.0)
    r = run_script(INFERENCE, "--model_path", faulty, "--reference_path", llama_checkpoint,
                   "--engine", readme_plugin, "--dtype", "float32")
    assert r.code == 1, r
    assert "verdict: FAIL" in r.out
