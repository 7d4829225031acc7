"""Corpus scoring (test/models/llama/test_corpus_score.py, kitcore.corpus, kitcore.stats, kitcore.formats): the
statistics, the frozen manifest, and the two answers on correct and faulty engines of a format."""

import json
import math

import pytest
import torch
from kit_helpers import FAULTY_ENGINES, LLAMA, copy_checkpoint, run_script
from kitcore import formats, stats

CORPUS = f"{LLAMA}/test_corpus_score.py"
SMALL = ("--n_ctx", 64, "--tokens", 496)  # 16 windows of 31 scored tokens on the tiny Llama: seconds


def _windows(rng, n_windows, per_window, offset_sd, noise_sd, mean=0.0):
    """Per-token values of n_windows windows whose tokens share a window offset (correlated within a window)."""
    return [mean + offset_sd * torch.randn((), generator=rng) + noise_sd * torch.randn(per_window, generator=rng)
            for _ in range(n_windows)]


def test_block_bootstrap_covers_the_truth_at_about_the_stated_rate_where_independent_tokens_do_not():
    """Simulated windows (16 of 200 tokens, a window offset as large as the token noise / sqrt(20)): the block
    bootstrap's 90% interval of the mean covers the true mean (0, a correct engine's zero cost) in about 90% of
    seeds; the interval that treats tokens as independent (llama.cpp's) covers it far less often."""
    rng = torch.Generator().manual_seed(0)
    seeds, block, naive = 300, 0, 0
    for seed in range(seeds):
        values = _windows(rng, 16, 200, 0.5, 1.0)
        b = stats.mean(values, confidence=0.9, samples=500, seed=seed)
        n = stats.naive_mean(torch.cat(values), confidence=0.9)
        block += b.low <= 0 <= b.high
        naive += n.low <= 0 <= n.high
    assert 0.82 <= block / seeds <= 0.96, block / seeds  # percentile bootstrap over 16 blocks: a little short of 0.9
    assert naive / seeds < 0.5, naive / seeds


def test_bootstrap_is_reproducible_and_brackets_its_point():
    values = _windows(torch.Generator().manual_seed(1), 8, 50, 0.2, 1.0, mean=3.0)
    a, b = stats.mean(values, seed=5), stats.mean(values, seed=5)
    assert a == b and a.low <= a.value <= a.high
    q = stats.quantile(values, 0.99, seed=5)
    assert q.low <= q.value <= q.high
    r = stats.rms(values, seed=5)
    assert r.value == pytest.approx(float(torch.cat(values).pow(2).mean().sqrt()))


def test_planner_says_how_many_windows_a_margin_needs():
    """n = ((z_0.975 + z_0.8) sd / (margin - mean))^2; a margin at or below the expected value needs infinity."""
    values = [torch.full((10,), v) for v in (1.0, 2.0, 3.0, 2.0)]  # window means 1, 2, 3, 2: mean 2, sd 0.816
    p = stats.plan("KL mean", values, 2.5, 10)
    expected = math.ceil(((1.959964 + 0.841621) * math.sqrt(2 / 3) / 0.5) ** 2)
    assert p.windows == expected and p.tokens == 10 * expected, p
    assert stats.plan("KL mean", values, 2.0, 10).windows is None


def test_the_simulated_formats_round_as_their_storage_does():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    q8 = formats.q8_0_activations(x)
    assert torch.allclose(q8, formats.ggml_round(x, "q8_0"), atol=1e-6), "q8_0 activations are the gguf quantiser's"
    levels = formats.absmax_round(x, "int8")
    steps = levels / (x.abs().amax(-1, keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert formats.describe("q4_0+kv-q8_0").startswith("GGML q4_0 weights")
    with pytest.raises(Exception, match="one weight format"):
        formats.parse("q8_0+w8a8-int8")


def test_float32_hf_costs_nothing_within_its_interval(llama_checkpoint, tmp_path):
    r = run_script(CORPUS, "--model_path", llama_checkpoint, *SMALL, "--manifest", tmp_path / "m.json",
                   json_path=tmp_path / "r.json")
    assert r.code == 0, r
    records = {(x["case"], x["metric"]): x["value"] for x in r.json["records"]}
    assert abs(records["cost", "log_ppl_ratio"]) < 1e-6 and records["cost", "kl_mean"] < 1e-9, records
    assert records["cost", "same_top1"] == 1.0
    assert r.json["env"]["manifest"]["windows"] == 16 and "pydoc_data" in r.json["env"]["manifest"]["source"]["name"]
    assert "not judged" in r.out  # no margin: the cost is reported


def test_a_correct_int8_engine_is_faithful_to_its_format_and_one_layer_1pct_off_is_not(llama_checkpoint, tmp_path):
    """The plugin declares w8a8-int8 in one line and sums its products as integers; the kit's simulation multiplies
    rounded values. Measured on the tiny Llama: the correct engine's KL from the format's exact value is ~1x a
    correct peer's; one projection 1% off is ~90x (the limit is 9x)."""
    manifest = tmp_path / "m.json"
    good = run_script(CORPUS, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:Int8Engine", *SMALL,
                      "--manifest", manifest, "--max_kl_mean", 1e-3, json_path=tmp_path / "good.json")
    assert good.code == 0, good
    assert "format: w8a8-int8" in good.out and "faithful to its format" in good.out
    bad = run_script(CORPUS, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:Int8OneLayerOffEngine",
                     "--manifest", manifest, "--max_kl_mean", 1e-3, json_path=tmp_path / "bad.json")
    assert bad.code == 1 and "not faithful to w8a8-int8" in bad.out, bad
    assert [o["about"] for o in bad.json["outcomes"] if not o["passed"]] == ["faithful to its format"]
    assert good.json["env"]["manifest"]["ids_sha256"] == bad.json["env"]["manifest"]["ids_sha256"]


def test_a_quantised_cache_worse_than_its_format_is_not_faithful(llama_checkpoint, tmp_path):
    r = run_script(CORPUS, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:CoarserCacheEngine",
                   *SMALL, "--manifest", tmp_path / "m.json")
    assert r.code == 1 and "not faithful to kv-q8_0" in r.out, r


def test_a_margin_below_the_cost_fails_the_sign_off_alone(llama_checkpoint, tmp_path):
    r = run_script(CORPUS, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:Int8Engine", *SMALL,
                   "--manifest", tmp_path / "m.json", "--max_kl_mean", 1e-6, json_path=tmp_path / "r.json")
    assert r.code == 1, r
    assert [o["about"] for o in r.json["outcomes"] if not o["passed"]] == ["cost: KL mean"]


def test_plan_says_how_many_tokens_a_margin_needs(llama_checkpoint, tmp_path):
    r = run_script(CORPUS, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:Int8Engine", *SMALL,
                   "--manifest", tmp_path / "m.json", "--plan", "--max_kl_mean", 2e-4, json_path=tmp_path / "p.json")
    assert r.code == 0, r
    tokens = {x["metric"]: x["value"] for x in r.json["records"]}["kl_mean_tokens"]
    assert tokens > 0 and f"({tokens} scored tokens)" in r.out


def test_a_manifest_is_refused_for_other_tokens(llama_checkpoint, tmp_path):
    """Written once, then: other flags, edited ids, another tokenizer: one line each, exit 2."""
    manifest = tmp_path / "m.json"
    assert run_script(CORPUS, "--model_path", llama_checkpoint, *SMALL, "--manifest", manifest).code == 0
    r = run_script(CORPUS, "--model_path", llama_checkpoint, "--n_ctx", 128, "--manifest", manifest)
    assert r.code == 2 and "--n_ctx asks for other tokens" in r.err, r
    edited = tmp_path / "edited.json"
    raw = json.loads(manifest.read_text())
    raw["ids"][40] = (raw["ids"][40] + 1) % 100
    edited.write_text(json.dumps(raw))
    r = run_script(CORPUS, "--model_path", llama_checkpoint, "--manifest", edited)
    assert r.code == 2 and "do not hash to what it records" in r.err, r
    other = copy_checkpoint(llama_checkpoint, tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = run_script(CORPUS, "--model_path", other, "--manifest", manifest)
    assert r.code == 2 and "another tokenizer" in r.err and "Traceback" not in r.err, r


INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"
INFERENCE = f"{LLAMA}/test_llama_inference.py"


def test_a_declared_format_is_the_peer_of_end_to_end_validation(llama_checkpoint):
    """The int8 plugin costs the tiny Llama KL 1.2e-4 by its format alone; its peer is that format simulated, so
    it passes against the reference, and against the format's exact value (--against format) too, while the same
    engine 1% off in one projection fails there (the format's cost no longer hides it)."""
    common = ("--model_path", llama_checkpoint, "--dtype", "float32")
    r = run_script(INFERENCE, *common, "--engine", f"{FAULTY_ENGINES}:Int8Engine")
    assert r.code == 0 and "calibrated by HF with the format simulated (w8a8-int8)" in r.out, r
    r = run_script(INFERENCE, *common, "--engine", f"{FAULTY_ENGINES}:Int8Engine", "--against", "format")
    assert r.code == 0 and "the format's exact value, HF float64" in r.out, r
    r = run_script(INFERENCE, *common, "--engine", f"{FAULTY_ENGINES}:Int8OneLayerOffEngine", "--against", "format")
    assert r.code == 1 and "KL mean" in r.out, r


@pytest.mark.parametrize("engine,first", [("Int8Engine", None), ("Int8OneLayerOffEngine", "layers.1.v_proj")])
def test_against_its_format_layer_by_layer_a_1pct_fault_is_located(engine, first, llama_checkpoint, tmp_path):
    r = run_script(INTERMEDIATE, "--model_path", llama_checkpoint, "--engine", f"{FAULTY_ENGINES}:{engine}",
                   "--dtype", "float32", "--against", "format", json_path=tmp_path / "r.json")
    if first is None:
        assert r.code == 0, r
    else:
        assert r.code == 1 and f"first divergence: {first}" in r.out, r


def test_against_format_needs_a_declared_format(llama_checkpoint):
    r = run_script(INFERENCE, "--model_path", llama_checkpoint, "--engine", "compile", "--against", "format")
    assert r.code == 2 and "declares no format" in r.err, r


@pytest.mark.parametrize("current,status", [((4.1e-3, 3.9e-3, 4.3e-3), "SAME"), ((4.6e-3, 4.4e-3, 4.8e-3), "GREW"),
                                            ((3.0e-3, 2.9e-3, 3.1e-3), "SHRANK")])
def test_compare_takes_an_interval_as_the_spread(current, status, tmp_path):
    def rows(value, low, high):
        base = {"script": "test_corpus_score", "case": "cost", "device": "cpu", "dtype": "float32", "engine": "llama.cpp"}
        return "".join(json.dumps({**base, "metric": m, "value": v}) + "\n"
                       for m, v in (("kl_mean", value), ("kl_mean_low", low), ("kl_mean_high", high)))
    (tmp_path / "b.jsonl").write_text(rows(4.0e-3, 3.8e-3, 4.2e-3))
    (tmp_path / "c.jsonl").write_text(rows(*current))
    r = run_script("tools/compare.py", tmp_path / "b.jsonl", tmp_path / "c.jsonl", "--format", "json")
    assert {row["metric"]: row["status"] for row in json.loads(r.out)}["kl_mean"] == status, r.out
    assert r.code == (1 if status == "GREW" else 0)
