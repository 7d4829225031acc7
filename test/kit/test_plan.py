"""Scale: --plan (what a check of an 8B-235B model needs, from config.json alone), the streamed reference
(bit for bit the resident one), and the up-front choice or refusal instead of the OOM killer halfway."""

import json

import pytest
import torch
from kit_helpers import LLAMA, copy_checkpoint, edit_config, run_script

from kitcore import devices, engines

INFERENCE = f"{LLAMA}/test_llama_inference.py"
LLAMA_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
QWEN3_235B = dict(model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                  num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False)


def figures(r):
    """A run's metric records without timings and memory peaks: what must be equal bit for bit."""
    return [(x["case"], x["metric"], x["value"]) for x in r.json["records"]
            if x["case"] != "timing" and not x["metric"].startswith("peak_")]


@pytest.mark.parametrize("config,billions,active", [(LLAMA_70B, 70.55, 69.50), (QWEN3_235B, 235.09, 21.57)])
def test_plan_from_a_config_alone(config, billions, active, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = run_script(INFERENCE, "--plan", "--model_path", tmp_path, json_path=tmp_path / "plan.json")
    assert r.code == 0, r
    plan = r.json["plan"]
    assert round(plan["parameters"] / 1e9, 2) == billions
    assert round(plan["active_parameters_per_token"] / 1e9, 2) == active
    assert plan["reference_bytes_per_layer"] * config["num_hidden_layers"] < plan["reference_bytes_resident"]
    assert plan["candidate_bytes"] * 2 == plan["reference_bytes_resident"]  # bfloat16 vs float32
    assert plan["reference_cache_bytes_per_1k_tokens"] == 4 * 1000 * config["vocab_size"]
    assert plan["estimated_reference_seconds"] > 0


def test_plan_over_ranks(tmp_path):
    """Qwen3-235B over 8 ranks in bfloat16: 438 GiB in all; its decoder layers split, the embeddings and LM head on
    every rank."""
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_235B))
    r = run_script(INFERENCE, "--plan", "--model_path", tmp_path, "--tensor_parallel_size", 8)
    assert r.code == 0 and "over 8 ranks: about 56.77 GiB each, 454.1 GiB together" in r.out, r


def test_plan_needs_a_config(tmp_path):
    r = run_script(INFERENCE, "--plan")
    assert r.code == 2 and "--plan needs --model_path" in r.err, r
    r = run_script(INFERENCE, "--plan", "--model_path", tmp_path)
    assert r.code == 2 and "cannot read" in r.err, r


def test_a_check_that_cannot_fit_is_refused_before_loading(llama_checkpoint, tmp_path):
    ckpt = copy_checkpoint(llama_checkpoint, tmp_path / "claims-70b")
    edit_config(ckpt, **LLAMA_70B)
    for mode in ("auto", "resident", "streamed"):
        r = run_script(INFERENCE, "--model_path", ckpt, "--reference_mode", mode)
        assert r.code == 3 and "nothing was loaded" in r.err and len(r.err.strip().splitlines()) == 1, r


@pytest.mark.parametrize("family", ["llama", "moe"])
def test_streamed_reference_is_the_resident_one_bit_for_bit(family, request):
    checkpoint = request.getfixturevalue(f"{family}_checkpoint")
    cpu = devices.Device("cpu", "cpu")
    resident = engines.HFEngine(str(checkpoint), cpu, torch.float32, "eager")
    streamed = engines.StreamedHFEngine(str(checkpoint), cpu, torch.float32, "eager")
    ids = torch.randint(0, resident.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(resident.forward(ids, pos, mask), streamed.forward(ids, pos, mask))
    caches = resident.new_cache(), streamed.new_cache()
    for engine, cache in zip((resident, streamed), caches):
        engine.forward(ids, pos, mask, cache)
    step = ids[:, -1:], pos[:, -1:] + 1, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert torch.equal(resident.forward(*step, caches[0]), streamed.forward(*step, caches[1]))
    if family == "llama":  # intermediate validation is Llama's
        a, b = resident.capture(ids[:1], pos[:1]), streamed.capture(ids[:1], pos[:1])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.is_meta for p in streamed.model.parameters())  # nothing stays loaded between forwards


def test_streamed_reference_through_the_scripts(llama_checkpoint, moe_checkpoint, tmp_path):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--reference_mode", "streamed",
                   "--no_reference_cache", json_path=tmp_path / "s.json")
    assert r.code == 0 and r.json["env"]["reference_source"] == "streamed", r
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--no_reference_cache", json_path=tmp_path / "a.json")
    assert r.code == 0 and r.json["env"]["reference_source"] == "resident", r
    r = run_script(INFERENCE, "--model_path", moe_checkpoint, "--reference_mode", "streamed",
                   "--no_reference_cache", json_path=tmp_path / "m.json")
    assert r.code == 0 and r.json["env"]["reference_source"] == "streamed", r


def test_reference_cache_reuses_and_never_trusts_a_bad_entry(llama_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_KIT_CACHE", str(tmp_path / "cache"))
    forward = f"{LLAMA}/test_forward_validation.py"
    first = run_script(forward, "--model_path", llama_checkpoint, json_path=tmp_path / "1.json")
    assert first.code == 0 and first.json["env"]["reference_cache"]["misses"] > 0, first
    second = run_script(forward, "--model_path", llama_checkpoint, json_path=tmp_path / "2.json")
    assert second.code == 0 and second.json["env"]["reference_source"] == "cache", second
    assert second.json["env"]["reference_cache"]["misses"] == 0
    assert second.json["all_steps"] == first.json["all_steps"]  # the same reference, bit for bit
    for entry in (tmp_path / "cache" / "reference").iterdir():
        entry.write_bytes(entry.read_bytes()[:100])  # truncated
    third = run_script(forward, "--model_path", llama_checkpoint, json_path=tmp_path / "3.json")
    assert third.code == 0 and third.json["env"]["reference_cache"]["rejected"] > 0, third
    assert third.json["all_steps"] == first.json["all_steps"]
    off = run_script(INFERENCE, "--model_path", llama_checkpoint, "--no_reference_cache", json_path=tmp_path / "4.json")
    assert off.code == 0 and "reference_cache" not in off.json["env"] and "reference cache:" not in off.out


def test_reference_cache_stays_within_its_bound(llama_checkpoint, tmp_path):
    from kitcore import checkpoints, refcache

    cache = refcache.ReferenceCache(checkpoints.open_checkpoint(llama_checkpoint), "float32", max_bytes=3 * 2**20,
                                    root=tmp_path)
    for i in range(8):  # 1 MiB each
        cache.get_or_compute("logits", (torch.tensor([i]),), lambda: {"logits": torch.zeros(2**18)})
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 3 * 2**20
    assert cache.misses == 8 and len(list(tmp_path.iterdir())) == 2


def test_intermediate_validation_reuses_cached_captures(llama_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_KIT_CACHE", str(tmp_path / "cache"))
    script = f"{LLAMA}/test_intermediate_validation.py"
    first = run_script(script, "--model_path", llama_checkpoint, json_path=tmp_path / "1.json")
    assert first.code == 0 and first.json["env"]["reference_cache"]["misses"] > 0, first
    second = run_script(script, "--model_path", llama_checkpoint, json_path=tmp_path / "2.json")
    assert second.code == 0 and second.json["env"]["reference_cache"]["misses"] == 0, second
    assert second.json["env"]["reference_cache"]["hits"] == first.json["env"]["reference_cache"]["misses"]
    assert figures(second) == figures(first)  # the same captures, bit for bit


def test_captures_stream_a_layer_at_a_time_from_one_forward(llama_checkpoint):
    import threading

    cpu = devices.Device("cpu", "cpu")
    engine = engines.HFEngine(str(llama_checkpoint), cpu, torch.float32, "eager")
    layers = engine.model.model.layers
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: runs.__setitem__(i, runs[i] + 1))
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None]
    whole = engine.capture(ids, pos)
    runs[:] = [0] * len(layers)
    streamed = list(engine.capture_layers(ids, pos))
    assert runs == [1] * len(layers) and len(streamed) == len(layers)  # one forward, every layer once
    assert "embed_tokens" in streamed[0] and {"final_norm", "logits"} <= streamed[-1].keys()
    merged = {k: v for one in streamed for k, v in one.items()}
    assert merged.keys() == whole.keys() and all(torch.equal(merged[k], whole[k]) for k in whole)
    # given up after the first layer: the forward stops there, its thread ends, its hooks are gone
    runs[:] = [0] * len(layers)
    stream = engine.capture_layers(ids, pos)
    next(stream)
    stream.close()
    assert runs == [1] + [0] * (len(layers) - 1)
    assert not [t for t in threading.enumerate() if t.name.endswith("-capture")]
    assert not any(m._forward_hooks for m in engine.model.modules())


def test_an_error_inside_a_streamed_capture_reaches_the_caller(llama_checkpoint):
    engine = engines.HFEngine(str(llama_checkpoint), devices.Device("cpu", "cpu"), torch.float32, "eager")

    def broken(mod, args):
        raise RuntimeError("layer 1 is broken")

    engine.model.model.layers[1].register_forward_pre_hook(broken)
    stream = engine.capture_layers(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    assert "layers.0.output" in next(stream)
    with pytest.raises(RuntimeError, match="layer 1 is broken"):
        next(stream)


def test_streamed_intermediate_validation_reads_the_weights_once(llama_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_KIT_CACHE", str(tmp_path / "cache"))
    script = f"{LLAMA}/test_intermediate_validation.py"
    one_forward = engines.StreamedHFEngine(str(llama_checkpoint), devices.Device("cpu", "cpu"), torch.float32)
    one_forward.forward(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])
    weights = one_forward.bytes_read  # every tensor once
    first = run_script(script, "--model_path", llama_checkpoint, "--reference_mode", "streamed",
                       json_path=tmp_path / "1.json")
    assert first.code == 0 and first.json["env"]["reference_bytes_read"] == weights, first
    # the cache holds a layer per entry: a second run reads them and nothing from the shards
    second = run_script(script, "--model_path", llama_checkpoint, "--reference_mode", "streamed",
                        json_path=tmp_path / "2.json")
    assert second.code == 0 and second.json["env"]["reference_bytes_read"] == 0, second
    assert second.json["env"]["reference_source"] == "cache"
    # one entry lost: the layers before it come from disk, the forward runs once for it and the rest
    entries = sorted((tmp_path / "cache" / "reference").iterdir(), key=lambda p: p.stat().st_mtime)
    entries[-1].unlink()
    third = run_script(script, "--model_path", llama_checkpoint, "--reference_mode", "streamed",
                       json_path=tmp_path / "3.json")
    assert third.code == 0 and third.json["env"]["reference_cache"]["misses"] == 1, third
    assert third.json["env"]["reference_bytes_read"] == weights
    assert figures(first) == figures(second) == figures(third)


def test_device_map_loads_through_accelerate(llama_checkpoint, tmp_path):
    """Only the CPU here: the placement is trivial, the code path (loading, forward, a component on the
    device that holds it, the script) is what is checked."""
    cpu = devices.Device("cpu", "cpu")
    plain = engines.HFEngine(str(llama_checkpoint), cpu, torch.float32, "eager")
    mapped = engines.HFEngine(str(llama_checkpoint), cpu, torch.float32, "eager", device_map="auto")
    ids, pos = torch.arange(12)[None], torch.arange(12)[None]
    assert torch.equal(plain.forward(ids, pos), mapped.forward(ids, pos))
    captured = plain.capture(ids, pos)
    inputs = {"layer_input": captured["layers.0.output"]}
    assert torch.equal(plain.run_component("input_layernorm", 1, inputs, pos),
                       mapped.run_component("input_layernorm", 1, inputs, pos))
    r = run_script(f"{LLAMA}/test_intermediate_validation.py", "--model_path", llama_checkpoint, "--device_map", "auto",
                   json_path=tmp_path / "iv.json")
    assert r.code == 0, r
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--device_map", "cuda:7")
    assert r.code == 2 and "--device_map" in r.err, r


def test_captures_larger_than_the_cache_are_not_cached(llama_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_KIT_CACHE", str(tmp_path / "cache"))
    script = f"{LLAMA}/test_intermediate_validation.py"
    # 0.0005 GiB (~0.5 MiB): one layer's captures of the 28-token prompt fit, both do not
    r = run_script(script, "--model_path", llama_checkpoint, "--reference_cache_gb", 0.0005,
                   json_path=tmp_path / "iv.json")
    assert r.code == 0 and "exceed the reference cache's bound" in r.out, r
    entries = (tmp_path / "cache" / "reference").glob("*.safetensors")
    assert not any(b"capture" in entry.read_bytes()[:4096] for entry in entries)  # the kind is in the header
