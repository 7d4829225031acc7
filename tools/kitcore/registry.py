"""The one list of the kit's checks: each script, the family it checks and the figures its summary row shows.

The Makefile's `validate-llama`, `validate-real` and `bench-qwen3-moe` (through tools/run_checks.py),
noxfile.py's sessions and their summary table read it: adding a check is its script, its tests and one
entry here.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    script: str  # path from the repository root
    family: str  # "llama": the checks of test/models/llama (Llama and Qwen3-MoE checkpoints); "qwen3_moe": the Qwen3-MoE benchmarks
    headline: tuple = ()  # (case, metric, label) of the figures nox's summary row shows
    validate_flags: tuple = ()  # what `make validate-llama` adds to its run
    real_flags: tuple = ()  # what `make validate-real` adds (a real checkpoint: what the check could catch too)

    @property
    def name(self):
        return self.script.rsplit("/", 1)[-1].removesuffix(".py")


CHECKS = (
    Check("test/models/llama/test_llama_inference.py", "llama",
          (("logits", "max_abs", "logits max abs"), ("logits", "nmse", "nmse")), ("--also_float32",),
          ("--controls", "--also_float32")),
    Check("test/models/llama/test_forward_validation.py", "llama",
          (("step0", "a_vs_ref_max_abs", "prefill max abs"),)),
    Check("test/models/llama/test_intermediate_validation.py", "llama", (("logits", "nmse", "logits nmse"),)),
    Check("test/models/llama/test_batch_validation.py", "llama", (("decode_row0", "max_abs", "decode row 0 max abs"),)),
    Check("test/models/llama/test_corpus_score.py", "llama",
          (("cost", "kl_mean", "corpus KL mean"), ("cost", "log_ppl_ratio", "log-PPL ratio"))),
    Check("test/models/qwen3_moe/attention_test.py", "qwen3_moe",
          (("prefill", "ttft_per_request_median_ms", "TTFT ms"), ("decode", "tokens_per_s_median", "decode tok/s"))),
    Check("test/models/qwen3_moe/moe_test.py", "qwen3_moe",
          (("prefill", "median_ms", "prefill ms"), ("decode", "median_ms", "decode ms"))),
)


def scripts(family):
    return [c.script for c in CHECKS if c.family == family]

