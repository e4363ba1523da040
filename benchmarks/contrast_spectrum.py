"""The contrast rule's spectrum on the demo's data: per layer, the ratios of the facts' key energy to the preserved
keys' (retain data and 200 Wikipedia snippets) along the generalised eigenvectors, and the held-out neighbourhood
questions' ratio along the top 8 (the table in the docs' "Forgetting" page, "The contrast rule").

    .venv/bin/python -m benchmarks.contrast_spectrum
"""

import time

import torch

import loki
from loki import facts as task
from loki import preserve as P


def main() -> None:
    model, tok = loki.load_default()
    facts = task.implant_facts(8)
    retain, nb = task.retain_data(facts, task.RECIPE, 4)
    t = time.time()
    targets = loki.retain.retain_set(model, tok, retain, progress=False)
    pres = [{"text": t.ids} for t in targets.distributions] + loki.retain.general_text(200, 300)
    seqs = P.token_sequences(model, tok, pres, 1024, 8, False)
    ex = P.token_sequences(model, tok, task.fact_training_set(facts), 1024, 8, False)
    nbq = loki.retain.retain_set(model, tok, nb, progress=False)
    nbs = [t.ids for t in nbq.distributions]
    print("seqs", time.time() - t, sum(map(len, seqs)), sum(map(len, ex)), sum(map(len, nbs)), flush=True)
    d = 1536
    K0 = {l: P._Keys(d, 4096) for l in range(30)}
    K1 = {l: P._Keys(d, 4096) for l in range(30)}
    KN = {l: P._Keys(d, 4096) for l in range(30)}
    P.down_projection_inputs(model, seqs, lambda l, k: K0[l].add(k))
    P.down_projection_inputs(model, ex, lambda l, k: K1[l].add(k))
    P.down_projection_inputs(model, nbs, lambda l, k: KN[l].add(k))
    n0, n1, nn_ = sum(map(len, seqs)), sum(map(len, ex)), sum(map(len, nbs))
    for l in range(0, 30, 3):
        c0 = K0[l].cov / n0
        c0 = c0 + torch.eye(d, dtype=torch.float64) * 1e-6 * torch.trace(c0) / d
        c1 = K1[l].cov / n1
        cn = KN[l].cov / nn_
        L = torch.linalg.cholesky(c0)
        Li = torch.linalg.inv(L)
        M = Li @ c1 @ Li.t()
        sig, y = torch.linalg.eigh(M)
        sig = sig.flip(0)
        y = y.flip(1)
        V = Li.t() @ y  # generalized eigvecs, C0-orthonormal
        # held-out neighbourhood energy ratio along each: v^T Cn v / v^T C0 v
        rn = ((V.t() @ cn) * V.t()).sum(1)
        print(
            l,
            "sigma top",
            [round(float(x), 1) for x in sig[:8]],
            "n>=10",
            int((sig >= 10).sum()),
            "n>=30",
            int((sig >= 30).sum()),
            "n>=100",
            int((sig >= 100).sum()),
            "| nbhd ratio along top8",
            [round(float(x), 2) for x in rn[:8]],
            flush=True,
        )


if __name__ == "__main__":
    main()
