"""Shared fixtures: tiny random models of every family, and the real default model (loaded once); test tiers.

`pytest -m "not slow"` is the fast tier (tiny random-weight models, in process, a few minutes); plain `pytest`
runs everything, as CI does. Slow tests are marked `@pytest.mark.slow`; see CONTRIBUTING.md.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import loki
from loki.testing import FAMILIES, tiny_model

# The tests own their model cache, so CI converts the default model once per checkout.
os.environ.setdefault("LOKI_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".loki-cache"))
torch.set_num_threads(min(4, os.cpu_count() or 1))

# `accelerate launch` on 2 CPU processes (gloo; `--cpu` would start one), for the multi-process tests.
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]


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
# A test is slow when it uses a real model, starts another process (a subprocess, a notebook kernel, a launcher),
# runs the demo, or takes more than about 5 s on 2 CPU cores for another reason; it says so with
# `@pytest.mark.slow` (or a module's `pytestmark`), see CONTRIBUTING.md. The one thing checked here: a test that asks
# for a real model's fixture must carry the marker, so the fast tier never loads one.
REAL_MODEL_FIXTURES = {"default_model_and_tokenizer", "default_model", "qwen_coder"}


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(
            "These tests use a real model's fixture but are not marked slow; add @pytest.mark.slow to them: "
            + ", ".join(unmarked)
        )


def state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of a model's whole state dict with a saved copy."""
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        assert actual[k].dtype == v.dtype, k
        assert torch.equal(actual[k], v), f"{k} differs"
