"""The lm-evaluation-harness bridge (optional extra: `pip install 'loki[eval]'`): run its tasks on the in-memory
model with deltas applied."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def lm_eval_model(model, tokenizer, *, batch_size: int = 8, **kwargs):
    """An lm-evaluation-harness `HFLM` wrapping the in-memory `model` (no reload), for `lm_eval.simple_evaluate`.

    Args:
        model: a causal LM (with whatever deltas are applied now).
        tokenizer: its tokenizer.
        batch_size: HFLM's batch size.
        **kwargs: other `HFLM` arguments.

    Returns:
        `lm_eval.models.huggingface.HFLM`.

    Raises:
        ImportError: lm-eval is not installed (`pip install 'loki[eval]'`).

    >>> # import lm_eval
    >>> # with loki.implanted(model, "medical.loki"):
    >>> #     lm_eval.simple_evaluate(model=loki.evaluate.lm_eval_model(model, tok), tasks=["hellaswag"])
    """
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError("The lm-evaluation-harness bridge needs lm-eval: pip install 'loki[eval]'") from e
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str | Mapping],
    *deltas,
    batch_size: int = 8,
    limit: int | None = None,
    task_dir: str | Path | None = None,
    **kwargs,
) -> dict[str, Any]:
    """Run lm-evaluation-harness `tasks` on the in-memory model with `deltas` applied (reverted afterwards).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        tasks: lm-eval task names or task config dicts.
        *deltas: `Delta` objects to apply together.
        batch_size: HFLM's batch size.
        limit: at most this many examples per task (None: all).
        task_dir: a folder of extra task YAML files.
        **kwargs: other `lm_eval.simple_evaluate` arguments.

    Returns:
        dict: `simple_evaluate`'s `results` (task -> metrics).

    Raises:
        ImportError: lm-eval is not installed (`pip install 'loki[eval]'`).
        LokiError: a delta that cannot be applied.

    >>> # loki.evaluate.run_lm_eval(model, tokenizer, ["hellaswag"], loki.load("medical.loki"), limit=100)
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("The lm-evaluation-harness bridge needs lm-eval: pip install 'loki[eval]'") from e
    from ..ledger import implanted

    manager = TaskManager(include_path=str(task_dir)) if task_dir else None
    with implanted(model, *deltas):
        out = lm_eval.simple_evaluate(
            model=lm_eval_model(model, tokenizer, batch_size=batch_size),
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            **kwargs,
        )
    return out["results"]
