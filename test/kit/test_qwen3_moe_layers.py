"""Qwen3-MoE layer by layer: intermediate validation passes correct engines in every dtype and locates routing
and expert faults at their layer and component (the router's points, near-tie-aware expert sets)."""

import pytest
from kit_helpers import EXTENDED, FAULTY_ENGINES, LLAMA, run_script

INTERMEDIATE = f"{LLAMA}/test_intermediate_validation.py"
MOE_POINTS = ("q_norm", "k_norm", "router_logits", "experts_selected", "routing_weights", "expert_outputs", "moe_out")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("engine", ["hf", f"{FAULTY_ENGINES}:ChunkedCaptureEngine"])
def test_a_correct_engine_passes_every_point(engine, dtype, moe_checkpoint, tmp_path):
    """HF itself (judged by the table) and a correct plugin (calibrated by the peer), both layers sparse."""
    r = run_script(INTERMEDIATE, "--model_path", moe_checkpoint, "--engine", engine, "--dtype", dtype,
                   json_path=tmp_path / "iv.json")
    assert r.code == 0, r
    assert r.json["first_divergence"] is None
    seen = {p["point"].split(".")[-1] for p in r.json["points"]}
    assert set(MOE_POINTS) <= seen and "gate_proj" not in seen
    sets = [p for p in r.json["points"] if p["point"].endswith("experts_selected")]
    assert len(sets) == 2 and all(p["own"]["not_admissible"] == 0 for p in sets)
    assert "router near ties:" in r.out


# (fault, dtype, the point it must be located at: every one in the last layer, its own error out of bounds)
FAULTS = [
    ("UnrenormalisedRoutingEngine", "float32", "routing_weights"),
    ("UnrenormalisedRoutingEngine", "bfloat16", "routing_weights"),
    ("TopKMinusOneEngine", "bfloat16", "experts_selected"),
    ("SkipsSecondExpertEngine", "float32", "experts_selected"),
    ("SkipsSecondExpertEngine", "bfloat16", "experts_selected"),
    ("SwappedExpertsEngine", "float32", "expert_outputs"),
    ("SwappedExpertsEngine", "bfloat16", "expert_outputs"),
    ("ScaledOneExpertEngine", "float32", "expert_outputs"),
    ("ScaledOneExpertEngine", "bfloat16", "expert_outputs"),
    # a bfloat16 check cannot see it: the peer rounds its routing weights to bfloat16 too
    ("BFloat16RouterEngine", "float32", "routing_weights"),
    pytest.param("TopKMinusOneEngine", "float16", "experts_selected", marks=EXTENDED),
    pytest.param("ScaledOneExpertEngine", "float16", "expert_outputs", marks=EXTENDED),
]


@pytest.mark.parametrize("fault,dtype,point", FAULTS)
def test_a_moe_fault_is_located_at_its_component(fault, dtype, point, moe_checkpoint, tmp_path):
    r = run_script(INTERMEDIATE, "--model_path", moe_checkpoint, "--engine", f"{FAULTY_ENGINES}:{fault}",
                   "--dtype", dtype, json_path=tmp_path / "iv.json")
    assert r.code == 1, r
    assert r.json["first_divergence"] == {"layer": 1, "point": point}, r.json["first_divergence"]
    first = next(p for p in r.json["points"] if p["point"] == f"layers.1.{point}")
    assert first["status"] == "FAIL: ADDS error"
    if fault == "SkipsSecondExpertEngine":  # as many experts as the reference: the set itself is not admissible
        assert first["total"]["not_admissible"] > 0 and first["own"]["not_admissible"] > 0
    assert all(p["status"] == "ok" for p in r.json["points"] if p.get("layer") == 0)


def test_the_moe_controls_are_caught_and_located(moe_checkpoint, tmp_path):
    """--controls on a Qwen3-MoE in float32: every control, the three routing ones included, caught at its layer."""
    r = run_script(INTERMEDIATE, "--model_path", moe_checkpoint, "--dtype", "float32", "--controls",
                   json_path=tmp_path / "iv.json")
    assert r.code == 0, r
    table = r.json["controls"]["table"]
    assert len(table) == 13 and all(c["caught"] and c["located"] for c in table), table
    routing = {c["name"].split(" (")[0]: c["figure"] for c in table if c["shape"] in (
        "routing not renormalised", "expert scaled", "top-k off by one")}
    assert "layers.1.routing_weights" in routing["routing weights not renormalised"]
    assert "layers.1.experts_selected" in routing["top-k one expert short"]
