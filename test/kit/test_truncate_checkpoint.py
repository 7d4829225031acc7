"""tools/truncate_checkpoint.py: the first layers of a (sharded) checkpoint, byte for byte, in about one chunk of
memory, and the checks run on what it writes."""

import json
import struct
import subprocess
import sys

import pytest
from kit_helpers import LLAMA, ROOT, run_script

TOOL = "tools/truncate_checkpoint.py"


def raw_tensors(directory):
    """{name: bytes} of every tensor of a checkpoint directory's safetensors files."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        for name, t in header.items():
            if name != "__metadata__":
                start, end = t["data_offsets"]
                out[name] = data[8 + n + start:8 + n + end]
    return out


@pytest.fixture(scope="module")
def sharded(llama_checkpoint, tmp_path_factory):
    """The tiny Llama saved in shards of at most 300 kB."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(str(llama_checkpoint), dtype=torch.float32)
    model.save_pretrained(str(out), max_shard_size="300KB")
    for f in llama_checkpoint.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            (out / f.name).write_bytes(f.read_bytes())
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def test_the_first_layer_of_a_sharded_checkpoint_byte_for_byte(sharded, tmp_path):
    out = tmp_path / "one"
    r = run_script(TOOL, sharded, "--layers", 1, "--out", out)
    assert r.code == 0, r
    source, kept = raw_tensors(sharded), raw_tensors(out)
    assert kept and all(kept[name] == source[name] for name in kept)
    assert not any(".layers.1." in name for name in kept)
    assert {n for n in source if ".layers.1." not in n} == set(kept)  # embeddings, final norm and LM head kept
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    record = json.loads((out / "kit_truncated.json").read_text())
    assert record["layers_kept"] == 1 and record["layers_in_source"] == 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(kept)
    assert (out / "tokenizer.json").is_file()


def test_the_checks_run_on_a_truncated_checkpoint_and_say_what_it_means(sharded, tmp_path):
    out = tmp_path / "one"
    assert run_script(TOOL, sharded, "--layers", 1, "--out", out).code == 0
    r = run_script(f"{LLAMA}/test_llama_inference.py", "--model_path", out, "--dtype", "float32", "--engine", "compile")
    assert r.code == 0 and "truncated: layers 0-0 of the 2" in r.out and "not a language model's" in r.out, r


def test_peak_memory_is_a_chunk_not_the_tensor(tmp_path):
    """A 160 MiB embedding is streamed in 16 MiB chunks: the tool's peak RSS stays below the tensor's size."""
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "big"
    src.mkdir()
    hidden, vocab = 1024, 40960
    tensors = {"model.embed_tokens.weight": np.ones((vocab, hidden), dtype=np.float32),
               "model.norm.weight": np.ones(hidden, dtype=np.float32),
               "model.layers.0.input_layernorm.weight": np.ones(hidden, dtype=np.float32),
               "model.layers.1.input_layernorm.weight": np.ones(hidden, dtype=np.float32)}
    save_file(tensors, str(src / "model.safetensors"))
    del tensors
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": hidden,
                                                 "vocab_size": vocab, "num_attention_heads": 8}))
    # VmHWM, the peak of this process's own memory (ru_maxrss keeps the forking parent's across exec)
    probe = ("import re, runpy, sys\n"
             f"sys.argv = [{str(ROOT / TOOL)!r}, {str(src)!r}, '--layers', '1', '--out', {str(tmp_path / 'out')!r}]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1]) * 1024
    assert peak < 120 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB for a 160 MiB tensor"
    assert raw_tensors(tmp_path / "out")["model.embed_tokens.weight"] == raw_tensors(src)["model.embed_tokens.weight"]


def test_bad_requests_are_one_line(llama_checkpoint, tmp_path):
    r = run_script(TOOL, llama_checkpoint, "--layers", 3, "--out", tmp_path / "x")
    assert r.code == 2 and "has 2 decoder layers" in r.err, r
    r = run_script(TOOL, llama_checkpoint, "--layers", 1)
    assert r.code == 2 and "give --layers N and --out DIR" in r.err, r


def test_plan_says_how_many_layers_fit(tmp_path):
    """Qwen3-235B-A22B's shape (94 layers, 128 experts): a layer is ~2.5B parameters; few fit a workstation."""
    config = {"model_type": "qwen3_moe", "num_hidden_layers": 94, "hidden_size": 4096, "num_attention_heads": 64,
              "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
              "moe_intermediate_size": 1536, "vocab_size": 151936, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = run_script(TOOL, tmp_path, "--plan")
    assert r.code == 0 and "94 layers of 2.49B parameters" in r.out and "layers that fit" in r.out, r.out
