"""Which rows to train: a `Selection` holds sorted row indices per layer and where they came from.

Stage 2 of LoKI (LOKI-METHOD.md): from attributions `[N prompts, L layers, d_model]`, `select` picks, per prompt
and layer, the `k = floor(q * d_model / 100)` rows with the smallest signed attribution, counts per layer how often
each row was picked, and keeps the `k` most frequent rows of every layer (the layer-balanced strategy).

Tie-breaking (every strategy): rows are ranked by (1) how often they were picked, more first, then (2) their mean
attribution over prompts, lower first for the "lowest" strategies and higher first for the "highest" ones, then
(3) their index, lower first. Within one prompt, equal attributions are ordered by index (a stable sort).

>>> import loki, torch
>>> attr = torch.tensor([[[0.5, -1.0, 0.2, 3.0]], [[0.1, -2.0, 0.0, 1.0]]])  # 2 prompts, 1 layer, d_model 4
>>> loki.select(attr, q=50).rows[0].tolist()
[1, 2]
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
from .errors import SelectionError

STRATEGIES = ("layer_balanced", "layer_highest", "global_lowest", "global_highest", "random")




def quota(q: float, d_out: int) -> int:
    """Rows per layer for a quota of `q` percent: floor(q * d_out / 100), computed exactly."""
    if not 0 < q <= 100:
        raise SelectionError(f"q is a percentage in (0, 100], got {q}.")
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

    @classmethod
    def from_attributions(cls, attributions, q: float, strategy: str = "layer_balanced", seed: int = 0) -> "Selection":
        """Same as `loki.select`."""
        return select(attributions, q, strategy, seed=seed)

    @classmethod
    def import_published(cls, path: str | Path, d_out: int, q: float | None = None) -> "Selection":
        """Read the LoKI authors' published format: a JSON list with one list of row indices per layer.

        `q` defaults to the number in a file name like `q10.json`. Their lists are in count order; loki keeps rows
        sorted and stores each layer's original order in `extra["order"]`.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SelectionError(f"Cannot read {path} as a JSON list of per-layer row lists: {e}") from e
        if not isinstance(data, list) or not all(isinstance(x, list) for x in data):
            raise SelectionError(f"{path} is not the published format (a JSON list of per-layer lists of row indices).")
        if q is None:
            import re

            m = re.fullmatch(r"q(\d+(?:\.\d+)?)", path.stem)
            q = float(m.group(1)) if m else None
        return cls(
            {layer: rows for layer, rows in enumerate(data)}, len(data), d_out, strategy="layer_balanced", q=q,
            source=f"published:{path.name}", extra={"order": [list(map(int, x)) for x in data]},
        )

    def suppression_delta(self, model, name: str | None = None, template: str | None = None):
        """A `.loki` delta that zeroes the selected rows (the paper's suppression ablation); revert it to undo."""
        from .delta import make_delta
        from .targets import find_down_projections

        projs = find_down_projections(model, template)
        self._check_model(projs)
        w = projs.weight
        changes = {layer: (idx, torch.zeros(idx.numel(), projs.d_in, dtype=w.dtype)) for layer, idx in self.rows.items()}
        return make_delta(
            model, changes, name=name or f"suppress-{self.strategy}-q{self.q}",
            description=f"Zeroes the {self.num_rows} rows of a {self.strategy} selection (damage probe).",
            selection=self.provenance(), template=template,
        )

    def _check_model(self, projs) -> None:
        if len(projs) != self.num_layers or projs.d_out != self.d_out:
            raise SelectionError(
                f"This selection is for {self.num_layers} layers x {self.d_out} rows, the model has {len(projs)} x "
                f"{projs.d_out}; make the selection from attributions of this model."
            )

    def density(self, bins: int = 64) -> torch.Tensor:
        """`[num_layers, bins]` counts of selected rows per layer and row-index bin (what `plot` draws)."""
        bins = min(bins, self.d_out)
        out = torch.zeros(self.num_layers, bins)
        for layer, idx in self.rows.items():
            out[layer] = torch.bincount(idx * bins // self.d_out, minlength=bins).float()
        return out

    def plot(self, ax=None, bins: int = 64):
        """Where the chosen rows sit: a layer x row-index density map (the paper's Figure 2). Needs matplotlib."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 4))
        dens = self.density(bins)
        im = ax.imshow(dens.numpy(), aspect="auto", origin="lower", interpolation="nearest",
                       extent=(0, self.d_out, -0.5, self.num_layers - 0.5), cmap="viridis")
        ax.set_xlabel("row index (down-projection output coordinate)")
        ax.set_ylabel("layer")
        ax.set_title(f"{self.strategy}, q={self.q}: {self.num_rows} rows")
        ax.figure.colorbar(im, ax=ax, label=f"rows per bin of {self.d_out / dens.shape[1]:.0f}")
        return ax


def select(attributions, q: float, strategy: str = "layer_balanced", *, score: str = "signed",
           seed: int = 0) -> Selection:
    """Choose rows from attributions `[N, L, d_model]` (a tensor or `loki.Attributions`); see the module docstring.

    Strategies: "layer_balanced" (LoKI: lowest per layer, k rows every layer), "layer_highest" (highest per layer,
    for the S-H suppression ablation), "global_lowest" / "global_highest" (the counting over all L*d_model rows at
    once with floor(q*L*d_model/100) rows in total, so layers get unequal counts), "random" (seeded control).

    `score="signed"` ranks rows by their attribution as published (LOKI-METHOD.md, stage 2); `score="abs"` ranks
    them by its magnitude |attribution|, so "lowest" means the rows that contribute least in either direction (on
    the default model the signed-lowest rows include massive-activation rows; benchmarks/README.md#forgetting).
    """
    if strategy not in STRATEGIES:
        raise SelectionError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if score not in ("signed", "abs"):
        raise SelectionError(f"score must be 'signed' (as published) or 'abs' (|attribution|), got {score!r}.")
    source = getattr(attributions, "path", None)
    values = attributions if isinstance(attributions, torch.Tensor) else getattr(attributions, "values", attributions)
    values = torch.as_tensor(values)
    if values.dim() != 3 or values.shape[0] == 0:
        raise SelectionError(f"attributions must be [N prompts, L layers, d_model] with N >= 1, got {tuple(values.shape)}.")
    n, num_layers, d_out = values.shape
    if strategy == "random":
        return Selection.random(num_layers, d_out, q, seed)
    values = values.float()
    if not torch.isfinite(values).all():
        raise SelectionError("attributions contain NaN or inf; recompute them (float32 is safest).")
    if score == "abs":
        values = values.abs()
    lowest = strategy in ("layer_balanced", "global_lowest")
    scores = values if lowest else -values  # pick the smallest `scores`
    if strategy.startswith("layer"):
        k = quota(q, d_out)
        picked = _lowest(scores, k)  # [N, L, k]
        counts = torch.zeros(num_layers, d_out).scatter_add_(
            1, picked.transpose(0, 1).reshape(num_layers, -1), torch.ones(num_layers, n * k))
        top = _rank(counts, scores.mean(0))[:, :k]  # [L, k]
        rows = {layer: top[layer] for layer in range(num_layers)}
    else:
        k = quota(q, num_layers * d_out)
        flat = scores.reshape(n, -1)
        counts = torch.zeros(num_layers * d_out).scatter_add_(0, _lowest(flat, k).reshape(-1), torch.ones(n * k))
        top = _rank(counts[None], flat.mean(0)[None])[0, :k]
        rows = {layer: top[top // d_out == layer] % d_out for layer in range(num_layers)}
        rows = {layer: idx for layer, idx in rows.items() if idx.numel()}  # a layer may get no rows at all
    extra = {"prompts": n, "score": score}
    return Selection(rows, num_layers, d_out, strategy=strategy, q=q, source=str(source) if source else None,
                     extra=extra)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries along the last dim; equal values keep index order (stable sort)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def _rank(counts: torch.Tensor, mean_scores: torch.Tensor) -> torch.Tensor:
    """Row order along the last dim: count descending, then mean score ascending, then index ascending."""
    order = torch.sort(mean_scores, dim=-1, stable=True).indices
    by_count = torch.sort(-counts.gather(-1, order), dim=-1, stable=True).indices
    return order.gather(-1, by_count)


def suppress(model, selection: Selection, template: str | None = None):
    """Zero `selection`'s rows in place (applied as a delta); returns the `Handle` that `loki.revert` undoes."""
    from .apply import apply

    return apply(model, selection.suppression_delta(model, template=template), template=template)
