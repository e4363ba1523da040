"""Apply + revert of a q=10 delta on the default model, against the floor: plain torch copies of the same bytes.

The floor is what any exact apply/revert must move, with everything prepared in advance: gather the rows that will
be overwritten into a buffer, scatter the new rows in, scatter the saved rows back (index tensors prebuilt).
loki additionally validates, checks the base fingerprint and keeps its bookkeeping.

    python benchmarks/swap.py [--rounds 9] [--iters 50] [--q 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import loki
import loki.testing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--q", type=float, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (row copies gain nothing from more)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = loki.load_default(dtype=getattr(torch, args.dtype), device=args.device)
    projs = loki.projections.find_down_projections(model)
    delta = loki.testing.random_delta(model, q=args.q, seed=0, noise=0.01, name="bench")
    selection = loki.Selection({l: ld.indices for l, ld in delta.layers.items()}, len(projs), projs.d_out)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # The floor, prepared in advance.
    views = [projs.rows(layer) for layer in selection.rows]
    indices = [idx.to(args.device) for idx in selection.rows.values()]
    new_rows = [delta.layers[layer].rows.to(args.device, projs.weight.dtype) for layer in selection.rows]
    buffers = [torch.empty_like(r) for r in new_rows]

    def floor() -> None:
        with torch.no_grad():
            for view, idx, new, buf in zip(views, indices, new_rows, buffers):
                torch.index_select(view, 0, idx, out=buf)
                view.index_copy_(0, idx, new)
            for view, idx, buf in zip(views, indices, buffers):
                view.index_copy_(0, idx, buf)

    def ours() -> None:
        loki.revert(model, loki.apply(model, delta))

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        sync()
        return (time.perf_counter() - start) / args.iters

    for fn in (floor, ours):  # warm-up
        timed(fn)
    results: dict[str, list[float]] = {"floor": [], "loki": []}
    for _ in range(args.rounds):  # interleaved, so both see the same machine noise
        results["floor"].append(timed(floor))
        results["loki"].append(timed(ours))
    exact = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["loki"] / med["floor"]
    mb = sum(r.numel() * r.element_size() for r in new_rows) / 1e6
    print(
        f"model: {loki.models.DEFAULT_MODEL_ID} ({args.dtype}, {args.device}), q={args.q}: "
        f"{delta.num_rows} rows, {mb:.1f} MB of rows"
    )
    print(f"floor (plain torch copies):  median {med['floor'] * 1e3:8.3f} ms per apply+revert")
    print(f"loki.apply + loki.revert:    median {med['loki'] * 1e3:8.3f} ms per apply+revert")
    print(f"ratio loki / floor:          {ratio:.2f}x (goal <= 1.5x); model bit-identical afterwards: {exact}")
    print(
        json.dumps(
            {
                "bench": "swap",
                "apply_revert_vs_copy": round(ratio, 3),
                "loki_ms": round(med["loki"] * 1e3, 4),
                "floor_ms": round(med["floor"] * 1e3, 4),
                "rows": delta.num_rows,
                "q": args.q,
                "dtype": args.dtype,
                "device": args.device,
                "rounds": args.rounds,
                "iters": args.iters,
                "exact": exact,
            }
        )
    )


if __name__ == "__main__":
    main()
