"""Fixtures of the kit's own tests (helpers live in kit_helpers.py)."""

import kit_helpers  # noqa: F401  (puts tools/ on sys.path)
import pytest

from kitcore import checkpoints


@pytest.fixture(scope="session")
def llama_checkpoint():
    return checkpoints.default_checkpoint("llama", 0)


@pytest.fixture(scope="session")
def moe_checkpoint():
    return checkpoints.default_checkpoint("qwen3_moe", 0)
