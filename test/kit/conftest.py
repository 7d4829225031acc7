"""Fixtures of the kit's own tests (helpers live in kit_helpers.py)."""

import pytest
from kit_helpers import checkpoints


@pytest.fixture(scope="session")
def llama_checkpoint():
    return checkpoints.default_checkpoint("llama", 0)


@pytest.fixture(scope="session")
def moe_checkpoint():
    return checkpoints.default_checkpoint("qwen3_moe", 0)
