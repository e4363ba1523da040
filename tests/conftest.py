"""Shared fixtures: tiny random models of every family, and the real default model (loaded once); test tiers.

`pytest -m "not slow"` is the fast tier (tiny random-weight models, in process, a few minutes); plain `pytest`
runs everything, as CI does. `pytest_collection_modifyitems` below marks tests slow; see CONTRIBUTING.md.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

import loki
from loki.testing import FAMILIES, tiny_model

# The tests own their model cache, so CI converts the default model once per checkout.
os.environ.setdefault("LOKI_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".loki-cache"))
torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family):
    """A tiny random model of each supported family."""
    return tiny_model(family)


@pytest.fixture(scope="session")
def default_model_and_tokenizer():
    """The real SmolLM2-135M-Instruct (converted once into the tests' cache). Tests must leave it unchanged."""
    return loki.load_default()


@pytest.fixture(scope="session")
def default_model(default_model_and_tokenizer):
    return default_model_and_tokenizer[0]


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer alone (no weights loaded): tests that only tokenize stay in the fast tier."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loki.models.default_model_path())


# -- test tiers -------------------------------------------------------------------------------------
# A test is slow when it uses a real model (these fixtures, or a loader called in its body or a helper of its
# module), starts another process (a subprocess, a notebook kernel, a launcher), runs the demo, or took more than about 5 s on 2 CPU cores for another reason
# (SLOW_TESTS, measured with `pytest --durations=60`; a parametrised test's id matches all its parameters).
REAL_MODEL_FIXTURES = {"default_model_and_tokenizer", "default_model", "qwen_coder"}
SLOW_CALLS = ("load_default(", "load_qwen_coder(", "load_model(", "subprocess", "multiprocessing", "mp.spawn",
              "NotebookClient(", "run_demo(")
SLOW_TESTS = {  # measured alone on 2 cores: 6.5 s per family, 8 s, 13 s
    "tests/test_retain.py::test_retain_keeps_the_retained_distributions",
    "tests/test_retain.py::test_retain_loss_with_the_hf_trainer",
    "tests/test_evaluate.py::test_lm_eval_bridge_on_a_local_task",
}


def _calls_slow(function, depth: int = 2) -> bool:
    """Whether `function`'s source, or that of a function of its own module it calls (`depth` levels down, e.g.
    a `launch(...)` helper that starts processes), contains one of SLOW_CALLS."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if any(call in source for call in SLOW_CALLS):
        return True
    code, module = getattr(function, "__code__", None), inspect.getmodule(function)
    if depth == 0 or code is None or module is None:
        return False
    helpers = (getattr(module, name, None) for name in code.co_names)
    return any(inspect.isfunction(f) and f.__module__ == module.__name__ and _calls_slow(f, depth - 1)
               for f in helpers)


def _is_slow(item: pytest.Item) -> bool:
    if item.get_closest_marker("slow"):
        return True
    if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    if item.nodeid.split("[")[0] in SLOW_TESTS:
        return True
    function = getattr(item, "function", None)
    return function is not None and _calls_slow(function)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of a model's whole state dict with a saved copy."""
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype, k
        assert torch.equal(actual[k], v), f"{k} differs"
