"""Which rows to train: a `Selection` holds sorted row indices per layer and where they came from.

Stage 2 of LoKI (LoKI paper §3.2; docs/method.md): from attributions `[N prompts, L layers, d_model]`, `select`
picks, per prompt and layer, the `k = floor(q * d_model / 100)` rows with the smallest signed attribution, counts per
layer how often each row was picked, and keeps the `k` most frequent rows of every layer (the layer-balanced
strategy).

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
from .format import atomic_write

STRATEGIES = ("layer_balanced", "layer_highest", "global_lowest", "global_highest", "random")


def quota(q: float, d_out: int) -> int:
    """Rows per layer for a quota of `q` percent: `floor(q * d_out / 100)`, computed exactly (LoKI paper §3.2).

    Args:
        q: the quota, a percentage in (0, 100]. It is read through `str(q)`, so `0.1` counts as exactly 1/10.
        d_out: rows per layer (`d_model`).

    Returns:
        int: rows per layer; 0 when the quota rounds down to nothing.

    Raises:
        SelectionError: `q` is not in (0, 100].

    >>> quota(5, 896), quota(0.1, 896)
    (44, 0)
    """
    if not 0 < q <= 100:
        raise SelectionError(f"q is a percentage in (0, 100], got {q}.")
    from fractions import Fraction

    return math.floor(Fraction(str(q)) * d_out / 100)


def _some_rows(q: float, d_out: int) -> int:
    """`quota(q, d_out)`, refusing a quota that selects nothing."""
    k = quota(q, d_out)
    if k == 0:
        raise SelectionError(
            f"q={q} selects no row of {d_out} (floor(q * {d_out} / 100) = 0); the smallest quota "
            f"that selects one is q={100 / d_out:.3g}."
        )
    return k


@dataclass(eq=False)
class Selection:
    """Sorted, unique row indices per layer (`rows[layer]`, int64), plus provenance (strategy, q, source).

    A row is output coordinate `j` of a layer's FFN down-projection (the paper's knowledge vector; `loki.projections`).
    The constructor sorts each layer's indices and checks them; layers without rows are left out of `rows`.

    Args:
        rows: layer -> row indices (a tensor or a list of ints, any order); stored as sorted int64 tensors `[k_l]`.
        num_layers: layers of the model (`L`).
        d_out: rows per layer (`d_model`).
        strategy: how the rows were chosen: one of `STRATEGIES`, or "manual" (the default).
        q: the quota in percent, when there is one.
        source: where the attributions came from (an attribution folder, a published file), or None.
        extra: strategy-specific provenance (seed, prompts, score, published order); it goes into deltas.

    Raises:
        SelectionError: a layer outside `0..num_layers-1`.
        InvalidIndicesError: a layer with an empty list, a row outside `[0, d_out)`, or a row listed twice.

    >>> sel = Selection({1: [7, 3]}, num_layers=2, d_out=8)
    >>> sel.rows, sel.num_rows
    ({1: tensor([3, 7])}, 2)
    """

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
                raise SelectionError(f"Layer {layer} is outside 0..{self.num_layers - 1}.")
            t = torch.as_tensor(idx, dtype=torch.int64).flatten().sort().values
            check_indices(t, self.d_out, int(layer))
            clean[int(layer)] = t
        self.rows = dict(sorted(clean.items()))

    @property
    def num_rows(self) -> int:
        """Rows over all layers."""
        return sum(t.numel() for t in self.rows.values())

    def rows_per_layer(self) -> dict[int, int]:
        """`{layer: number of rows}` for the layers that have rows.

        >>> Selection({1: [7, 3]}, num_layers=2, d_out=8).rows_per_layer()
        {1: 2}
        """
        return {layer: t.numel() for layer, t in self.rows.items()}

    def provenance(self) -> dict[str, Any]:
        """What goes into a delta's `selection` metadata (formats/SPEC.md §4): strategy, q, source, the number of
        rows, and `extra`'s keys.

        >>> Selection.random(num_layers=2, d_out=32, q=10, seed=0).provenance()
        {'strategy': 'random', 'q': 10, 'source': None, 'rows': 6, 'seed': 0}
        """
        return {"strategy": self.strategy, "q": self.q, "source": self.source, "rows": self.num_rows, **self.extra}

    # -- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The selection as a JSON-ready dict (what `save` writes and `load` reads); layer keys become strings.

        >>> Selection({1: [7, 3]}, num_layers=2, d_out=8).to_json()["rows"]
        {'1': [3, 7]}
        """
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
        """Write `to_json()` to `path` as JSON (overwriting it).

        Args:
            path: the file to write (conventionally `.json`).

        Returns:
            Path: `path`.

        >>> import os, tempfile
        >>> path = Selection.random(2, 32, q=10).save(os.path.join(tempfile.mkdtemp(), "selection.json"))
        >>> Selection.load(path).rows_per_layer()
        {0: 3, 1: 3}
        """
        path = Path(path)
        return atomic_write(path, json.dumps(self.to_json()).encode())

    @classmethod
    def load(cls, path: str | Path) -> Selection:
        """Read a selection written by `save`.

        Args:
            path: a JSON file of `to_json()`'s layout.

        Returns:
            Selection: with the saved provenance.

        Raises:
            SelectionError: a missing or unreadable file, text that is not JSON, JSON without `rows`, `num_layers`
                or `d_out`, or a layer outside the saved `num_layers`. (The published format: `import_published`.)
            InvalidIndicesError: a saved row out of range or listed twice.
        See `save` for an example.
        """
        try:
            data = json.loads(Path(path).read_text())
            rows, num_layers, d_out = {int(k): v for k, v in data["rows"].items()}, data["num_layers"], data["d_out"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SelectionError(
                f"Cannot read a selection from {path}: {type(e).__name__}: {e}. Give a file written "
                "by Selection.save (the authors' published files: Selection.import_published)."
            ) from None
        return cls(
            rows=rows,
            num_layers=num_layers,
            d_out=d_out,
            strategy=data.get("strategy", "manual"),
            q=data.get("q"),
            source=data.get("source"),
            extra=data.get("extra", {}),
        )

    # -- strategies that need no attribution ------------------------------------------------------
    @classmethod
    def random(cls, num_layers: int, d_out: int, q: float, seed: int = 0) -> Selection:
        """`quota(q, d_out)` rows per layer drawn uniformly at random (the control strategy), the same for a `seed`.

        Args:
            num_layers: layers of the model.
            d_out: rows per layer (`d_model`).
            q: the quota in percent, in (0, 100].
            seed: seeds a `torch.Generator`; each layer draws its own rows from it in turn.

        Returns:
            Selection: strategy "random", `extra={"seed": seed}`.

        Raises:
            SelectionError: `q` not in (0, 100], or it rounds down to 0 rows per layer (e.g. q=1 with d_out=32).

        >>> Selection.random(num_layers=2, d_out=32, q=10, seed=0).rows
        {0: tensor([12, 25, 31]), 1: tensor([ 2,  9, 20])}
        """
        k = _some_rows(q, d_out)
        g = torch.Generator().manual_seed(seed)
        rows = {layer: torch.randperm(d_out, generator=g)[:k] for layer in range(num_layers)}
        return cls(rows, num_layers, d_out, strategy="random", q=q, extra={"seed": seed})

    @classmethod
    def import_published(cls, path: str | Path, d_out: int, q: float | None = None) -> Selection:
        """Read the LoKI authors' published format: a JSON list with one list of row indices per layer.

        Their lists are in count order; loki keeps rows sorted and stores each layer's original order in
        `extra["order"]`. The strategy is recorded as "layer_balanced" (LoKI paper §3.2).

        Args:
            path: the authors' JSON file, e.g. `q10.json` of their Qwen2.5-0.5B-Instruct selections.
            d_out: rows per layer of the model it is for (`d_model`; the file does not say).
            q: the quota in percent; None takes it from a file name like `q10.json` (None when the name has none).

        Returns:
            Selection: one layer per list, `source="published:<file name>"`.

        Raises:
            SelectionError: the file cannot be read, is not JSON, or is not a list of lists.
            InvalidIndicesError: a layer's list is empty, out of range for `d_out`, or repeats a row.

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "q10.json")
        >>> with open(path, "w") as f:
        ...     _ = f.write("[[5, 1, 3], [2, 0]]")
        >>> sel = Selection.import_published(path, d_out=8)
        >>> sel.rows, sel.q, sel.extra["order"]
        ({0: tensor([1, 3, 5]), 1: tensor([0, 2])}, 10.0, [[5, 1, 3], [2, 0]])
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
            {layer: rows for layer, rows in enumerate(data)},
            len(data),
            d_out,
            strategy="layer_balanced",
            q=q,
            source=f"published:{path.name}",
            extra={"order": [list(map(int, x)) for x in data]},
        )

    def density(self, bins: int = 64) -> torch.Tensor:
        """Counts of selected rows per layer and row-index bin (what `plot` draws).

        Args:
            bins: bins over the row indices `0..d_out-1` (at most `d_out`); row `j` falls in bin `j * bins // d_out`.

        Returns:
            Tensor: float32 `[num_layers, bins]`; layers without rows are all zero.

        >>> Selection({0: [0, 1, 7]}, num_layers=1, d_out=8).density(bins=2)
        tensor([[2., 1.]])
        """
        bins = min(bins, self.d_out)
        out = torch.zeros(self.num_layers, bins)
        for layer, idx in self.rows.items():
            out[layer] = torch.bincount(idx * bins // self.d_out, minlength=bins).float()
        return out

    def plot(self, ax=None, bins: int = 64):
        """Where the chosen rows sit: a layer x row-index density map (the paper's Figure 2). Needs matplotlib.

        Args:
            ax: the matplotlib `Axes` to draw into; None makes a new pyplot figure.
            bins: row-index bins (see `density`).

        Returns:
            The `Axes` drawn into.

        >>> from matplotlib.figure import Figure
        >>> Selection.random(2, 32, q=10).plot(Figure().add_subplot()).get_title()
        'random, q=10: 6 rows'
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 4))
        dens = self.density(bins)
        im = ax.imshow(
            dens.numpy(),
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            extent=(0, self.d_out, -0.5, self.num_layers - 0.5),
            cmap="viridis",
        )
        ax.set_xlabel("row index (down-projection output coordinate)")
        ax.set_ylabel("layer")
        ax.set_title(f"{self.strategy}, q={self.q}: {self.num_rows} rows")
        ax.figure.colorbar(im, ax=ax, label=f"rows per bin of {self.d_out / dens.shape[1]:.0f}")
        return ax


def select(
    attributions, q: float, strategy: str = "layer_balanced", *, score: str = "signed", seed: int = 0
) -> Selection:
    """Choose rows from KVA attributions: the layer-balanced strategy of the LoKI paper (§3.2) and its ablations.

    Per prompt and layer the `k = quota(q, d_model)` lowest-scored rows are picked; each layer keeps the `k` rows
    picked most often (ties: module docstring).

    Args:
        attributions: `[N prompts, L layers, d_model]` scores, a tensor (any float dtype) or `loki.Attributions`
            (whose Hub `origin`, else its `path`, becomes the selection's `source`, and its model `extra["model"]`).
        q: the quota, a percentage of rows in (0, 100].
        strategy: "layer_balanced" (LoKI: the lowest rows, `k` in every layer), "layer_highest" (the highest per
            layer, for the S-H suppression ablation), "global_lowest" / "global_highest" (the same counting over
            all `L * d_model` rows at once, `quota(q, L * d_model)` rows in all, so layers get unequal counts and
            may get none), "random" (the seeded control; ignores the values).
        score: "signed" ranks rows by their attribution as published (docs/method.md, stage 2); "abs" by its
            magnitude, so "lowest" means the rows that contribute least in either direction (on the default model
            the signed-lowest rows include massive-activation rows: the docs' "Forgetting" benchmark page).
        seed: the seed of strategy "random".

    Returns:
        Selection: `extra={"prompts": N, "score": score}` plus `"model"` for `Attributions` (`{"seed": seed}` for
            "random").

    Raises:
        SelectionError: an unknown strategy or score, attributions not `[N >= 1, L, d_model]`, NaN or inf values,
            `q` outside (0, 100], or a quota that rounds down to 0 rows (per layer for the layer strategies).

    >>> import torch
    >>> attr = torch.tensor([[[0.5, -1.0, 0.2, 3.0], [-3.0, -4.0, 0.0, 1.0]]])  # 1 prompt, 2 layers, d_model 4
    >>> select(attr, q=50).rows
    {0: tensor([1, 2]), 1: tensor([0, 1])}
    >>> select(attr, q=50, score="abs").rows
    {0: tensor([0, 2]), 1: tensor([2, 3])}
    >>> select(attr, q=25, strategy="global_lowest").rows_per_layer()  # 2 rows in all, both in layer 1
    {1: 2}
    """
    if strategy not in STRATEGIES:
        raise SelectionError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if score not in ("signed", "abs"):
        raise SelectionError(f"score must be 'signed' (as published) or 'abs' (|attribution|), got {score!r}.")
    source = getattr(attributions, "origin", None) or getattr(attributions, "path", None)
    model = (getattr(attributions, "meta", None) or {}).get("model")
    values = attributions if isinstance(attributions, torch.Tensor) else getattr(attributions, "values", attributions)
    values = torch.as_tensor(values)
    if values.dim() != 3 or values.shape[0] == 0:
        raise SelectionError(
            f"attributions must be [N prompts, L layers, d_model] with N >= 1, got {tuple(values.shape)}."
        )
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
        k = _some_rows(q, d_out)
        picked = _lowest(scores, k)  # [N, L, k]
        counts = torch.zeros(num_layers, d_out).scatter_add_(
            1, picked.transpose(0, 1).reshape(num_layers, -1), torch.ones(num_layers, n * k)
        )
        top = _rank(counts, scores.mean(0))[:, :k]  # [L, k]
        rows = {layer: top[layer] for layer in range(num_layers)}
    else:
        k = _some_rows(q, num_layers * d_out)
        flat = scores.reshape(n, -1)
        counts = torch.zeros(num_layers * d_out).scatter_add_(0, _lowest(flat, k).reshape(-1), torch.ones(n * k))
        top = _rank(counts[None], flat.mean(0)[None])[0, :k]
        rows = {layer: top[top // d_out == layer] % d_out for layer in range(num_layers)}
        rows = {layer: idx for layer, idx in rows.items() if idx.numel()}  # a layer may get no rows at all
    extra = {"prompts": n, "score": score, **({"model": model} if model else {})}
    return Selection(
        rows, num_layers, d_out, strategy=strategy, q=q, source=str(source) if source else None, extra=extra
    )


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries along the last dim; equal values keep index order (stable sort)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def _rank(counts: torch.Tensor, mean_scores: torch.Tensor) -> torch.Tensor:
    """Row order along the last dim: count descending, then mean score ascending, then index ascending."""
    order = torch.sort(mean_scores, dim=-1, stable=True).indices
    by_count = torch.sort(-counts.gather(-1, order), dim=-1, stable=True).indices
    return order.gather(-1, by_count)
