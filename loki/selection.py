"""Which rows to train: a `Selection` holds sorted row indices per layer and where they came from.

>>> import loki
>>> sel = loki.Selection.random(num_layers=2, d_out=32, q=10, seed=0)
>>> sel.rows_per_layer()
{0: 3, 1: 3}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .delta import check_indices


def quota(q: float, d_out: int) -> int:
    """Rows per layer for a quota of `q` percent: floor(q * d_out / 100), computed exactly."""
    if not 0 < q <= 100:
        raise ValueError(f"q is a percentage in (0, 100], got {q}.")
    from fractions import Fraction

    return math.floor(Fraction(str(q)) * d_out / 100)


@dataclass(eq=False)
class Selection:
    """Sorted, unique row indices per layer (`rows[layer]`, int64), plus provenance (strategy, q, source)."""

    rows: dict[int, torch.Tensor]
    num_layers: int
    d_out: int
    strategy: str = "manual"
    q: float | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for layer, idx in self.rows.items():
            if not 0 <= int(layer) < self.num_layers:
                raise ValueError(f"Layer {layer} is outside 0..{self.num_layers - 1}.")
            t = torch.as_tensor(idx, dtype=torch.int64).flatten().sort().values
            check_indices(t, self.d_out, int(layer))
            clean[int(layer)] = t
        self.rows = dict(sorted(clean.items()))

    @property
    def num_rows(self) -> int:
        return sum(t.numel() for t in self.rows.values())

    def rows_per_layer(self) -> dict[int, int]:
        return {layer: t.numel() for layer, t in self.rows.items()}

    def provenance(self) -> dict[str, Any]:
        """What goes into a delta's `selection` metadata."""
        return {"strategy": self.strategy, "q": self.q, "source": self.source, "rows": self.num_rows, **self.extra}

    # -- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "d_out": self.d_out,
            "strategy": self.strategy,
            "q": self.q,
            "source": self.source,
            "extra": self.extra,
            "rows": {str(layer): t.tolist() for layer, t in self.rows.items()},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Selection":
        data = json.loads(Path(path).read_text())
        return cls(
            rows={int(k): v for k, v in data["rows"].items()},
            num_layers=data["num_layers"],
            d_out=data["d_out"],
            strategy=data.get("strategy", "manual"),
            q=data.get("q"),
            source=data.get("source"),
            extra=data.get("extra", {}),
        )

    # -- strategies that need no attribution ------------------------------------------------------
    @classmethod
    def random(cls, num_layers: int, d_out: int, q: float, seed: int = 0) -> "Selection":
        """`quota(q, d_out)` rows per layer drawn uniformly at random (the control strategy)."""
        k = quota(q, d_out)
        g = torch.Generator().manual_seed(seed)
        rows = {layer: torch.randperm(d_out, generator=g)[:k] for layer in range(num_layers)}
        return cls(rows, num_layers, d_out, strategy="random", q=q, extra={"seed": seed})
