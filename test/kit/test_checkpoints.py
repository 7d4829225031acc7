"""Embedded checkpoints: real HF directories, deterministic, realistic; bad checkpoints refused clearly."""

import hashlib
import json
import shutil

import pytest
import torch
from kit_helpers import EXTENDED, LLAMA, ROOT, run_script, run_subprocess

from kitcore import checkpoints, tiny
from kitcore.errors import UsageError

INFERENCE = f"{LLAMA}/test_llama_inference.py"


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


SHORT = 40  # training steps of the determinism tests: the recipe's code path, not its 400-600 steps


# what an AVX2-only machine computes with, on this one: torch's, oneDNN's and MKL's kernels held to AVX2
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen3_moe", marks=EXTENDED)])
def test_generation_is_byte_identical_seed_dependent_and_the_same_on_an_avx2_machine(family, tmp_path, monkeypatch):
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        tiny.write_checkpoint(family, tmp_path / name, seed=seed, log=lambda m: None, train_steps=SHORT)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha(tmp_path / "a" / name) == sha(tmp_path / "b" / name), name
    assert sha(tmp_path / "other" / "model.safetensors") != sha(tmp_path / "a" / "model.safetensors")
    for variable, value in AVX2_MACHINE.items():  # the training child inherits them
        monkeypatch.setenv(variable, value)
    tiny.write_checkpoint(family, tmp_path / "avx2", seed=0, log=lambda m: None, train_steps=SHORT)
    assert sha(tmp_path / "avx2" / "model.safetensors") == sha(tmp_path / "a" / "model.safetensors")
    meta = json.loads((tmp_path / "a" / "kit_metadata.json").read_text())
    assert meta["cpu_capability"] == "AVX2" and meta["arithmetic"].startswith("pinned: ATEN_CPU_CAPABILITY=avx2")


def test_native_arithmetic_is_another_model_on_an_avx512_machine(tmp_path):
    """What the pinned arithmetic prevents: left to an AVX-512 machine's kernels, the same recipe trains other
    bytes (a fault test's margin measured on one of them did not hold on the other)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip(f"this CPU's kernels are {torch.backends.cpu.get_cpu_capability()}, not AVX-512")
    tiny.write_checkpoint("llama", tmp_path / "pinned", log=lambda m: None, train_steps=SHORT)
    tiny.write_checkpoint("llama", tmp_path / "native", log=lambda m: None, train_steps=SHORT, arithmetic="native")
    assert sha(tmp_path / "native" / "model.safetensors") != sha(tmp_path / "pinned" / "model.safetensors")


def test_default_checkpoints_are_the_bytes_the_readme_states():
    """The default checkpoints' sha256, as the README states them, on any x86-64 CPU: with another Python (its
    standard library is the corpus), torch or transformers they are another model, and the test says so."""
    import platform

    import transformers

    made_with = ("3.11.7", "2.13.0", "5.24.0")
    here = (platform.python_version(), torch.__version__.split("+")[0], transformers.__version__)
    if here != made_with:
        pytest.skip(f"the hashes are of Python/torch/transformers {made_with}; this is {here}")
    readme = (ROOT / "README.md").read_text()
    for family in ("llama", "qwen3_moe"):
        digest = sha(checkpoints.default_checkpoint(family, 0) / "model.safetensors")
        assert f"| `{family}-tiny-seed0` | `{digest}` |" in readme, (family, digest)


def test_default_checkpoint_records_the_full_recipe(llama_checkpoint, moe_checkpoint):
    for ckpt, family in ((llama_checkpoint, "llama"), (moe_checkpoint, "qwen3_moe")):
        meta = json.loads((ckpt / "kit_metadata.json").read_text())
        assert meta["train_steps"] == tiny.TRAIN_STEPS[family] and meta["threads"] == tiny.GENERATION_THREADS


def test_llama_is_trained_to_be_peaked(llama_checkpoint):
    meta = json.loads((llama_checkpoint / "kit_metadata.json").read_text())
    assert meta["train_steps"] > 0
    assert meta["median_top1_prob"] > 0.08  # random init: ~0.001 (1/vocab)
    assert "Held-out median top-1 probability" in (llama_checkpoint / "README.md").read_text()


def test_checkpoint_directories_are_complete(llama_checkpoint, moe_checkpoint):
    for ckpt in (llama_checkpoint, moe_checkpoint):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json"):
            assert (ckpt / name).is_file(), name


def test_qwen3_moe_layout_matches_real_checkpoints(moe_checkpoint):
    cfg = json.loads((moe_checkpoint / "config.json").read_text())
    # the spelling of real Qwen3 checkpoints, which transformers 4.57 and 5.x both read
    assert cfg["num_experts"] == 8 and "num_local_experts" not in cfg and cfg["rope_theta"] == 10000.0
    assert cfg["num_experts_per_tok"] == 2 and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    ck = checkpoints.open_checkpoint(moe_checkpoint, "qwen3_moe")
    for e in range(8):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.0.mlp.experts.{e}.{proj}.weight" in ck.tensors
    assert "model.layers.1.self_attn.q_norm.weight" in ck.tensors
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(moe_checkpoint))
    assert model.config.num_experts == 8
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_larger_sizes_are_sharded_with_an_index(tmp_path):
    # "small" is a random-init shape for scale runs; shards are 1 GB, so force sharding via a tiny limit
    model = tiny.build_model("llama", "small", seed=0)
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    ck = checkpoints.open_checkpoint(tmp_path)
    assert len(ck.weight_files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert len(ck.load_tensors(["lm_head.weight", "model.embed_tokens.weight"])) == 2


def test_tiny_checkpoint_cli_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("")
    r = run_script("tools/tiny_checkpoint.py", "--family", "llama", "--out", tmp_path)
    assert r.code == 2 and "directory is not empty" in r.err


def broken(tmp_path, llama_checkpoint, kind):
    d = tmp_path / kind
    if kind == "missing":
        return d
    d.mkdir()
    if kind == "empty":
        return d
    for f in llama_checkpoint.iterdir():
        shutil.copy(f, d)
    weights = d / "model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "no_safetensors":
        weights.unlink()
    elif kind == "pickled_only":
        weights.rename(d / "pytorch_model.bin")
    elif kind == "corrupt_config":
        (d / "config.json").write_text('{"model_type": "llama", ')
    elif kind == "corrupt_header":
        weights.write_bytes(b"\xff" * 64)
    return d


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such directory"),
    ("empty", "no config.json"),
    ("truncated", "truncated safetensors file"),
    ("no_safetensors", "no *.safetensors weights"),
    ("pickled_only", "pickled weights are never loaded"),
    ("corrupt_config", "corrupt config.json"),
    ("corrupt_header", "corrupt safetensors header"),
])
def test_bad_checkpoint_is_refused_in_one_line(kind, message, tmp_path, llama_checkpoint):
    path = broken(tmp_path, llama_checkpoint, kind)
    with pytest.raises(UsageError, match=message.replace("*", r"\*")):
        checkpoints.open_checkpoint(path, "llama")
    r = run_script(INFERENCE, "--model_path", path)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r


def test_bad_checkpoint_through_the_real_command_line(tmp_path, llama_checkpoint):
    r = run_subprocess(INFERENCE, "--model_path", broken(tmp_path, llama_checkpoint, "truncated"))
    assert r.code == 2 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r


def test_streamed_sizes_are_written_one_layer_per_shard(tmp_path, monkeypatch):
    """--size 8b's writer, on a small shape: one shard per piece, an index, and a checkpoint HF loads."""
    from transformers import AutoModelForCausalLM

    small = dict(tiny.SIZES["llama"]["tiny"], num_hidden_layers=3, vocab_size=4096)
    monkeypatch.setitem(tiny.SIZES["llama"], "8b", small)
    tiny.write_checkpoint("llama", tmp_path / "ck", size="8b", dtype=torch.bfloat16, log=lambda *a: None)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 2  # embedding, three layers, norm + LM head
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert model.config.num_hidden_layers == 3
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    first = checkpoints.open_checkpoint(tmp_path / "ck").load_tensors(["model.embed_tokens.weight"])
    assert first["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert checkpoints.open_checkpoint(tmp_path / "ck").config["vocab_size"] == 4096
