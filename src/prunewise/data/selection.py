"""Recovery data selection: which candidate windows a recovery budget trains on.

PASER (Post-training data Selection for Efficient pruned LLM Recovery) spends the budget where the pruned model lost
most: the candidates are clustered in a semantic space (here the pruned model's own mean last hidden state, no
external embedding model), each cluster gets a share of the budget in proportion to the capability it lost (the sum
of its windows' degradation, pruned minus dense loss, negatives counted as none), and within a cluster the most
degraded windows go first. PASER's conflict filter drops instruction samples whose concepts contradict selected ones;
these candidates are plain text windows, so the filter here drops a window nearly identical in meaning to one already
selected (cosine of the embeddings above ``duplicate``), the budget moving on to the next window. Clusters come from
k-means on the normalised embeddings (PASER uses spectral clustering on a diffusion kernel; this is the simpler
stand-in, said so in the report). Everything here is deterministic for a seed.
"""

from __future__ import annotations

import torch

from ..errors import PrunewiseError
from .mixture import mixture_counts


def kmeans(x: torch.Tensor, k: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster of each row of ``x`` (cosine k-means, k-means++ start)."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    gen = torch.Generator().manual_seed(int(seed))
    centers = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    for _ in range(1, k):
        dist = (1 - x @ torch.stack(centers).t()).clamp_min(0).min(1).values
        if float(dist.sum()) <= 0:
            centers.append(x[int(torch.randint(x.shape[0], (1,), generator=gen))])
        else:
            centers.append(x[int(torch.multinomial(dist, 1, generator=gen))])
    c = torch.stack(centers)
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iterations):
        labels = (x @ c.t()).argmax(1)
        for j in range(k):
            members = x[labels == j]
            if members.numel():
                c[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return labels


def cluster_budgets(mass: list[float], sizes: list[int], budget: int) -> list[int]:
    """Windows per cluster: ``budget`` split in proportion to ``mass``, no cluster given more than it has (what a full
    cluster cannot take goes to the others, in proportion again; with no mass left, in proportion to size)."""
    out = [0] * len(sizes)
    left = min(budget, sum(sizes))
    while left > 0:  # each round fills at least one cluster or places the whole rest
        room = [s - o for s, o in zip(sizes, out)]
        weights = [m if r > 0 else 0.0 for m, r in zip(mass, room)]
        if sum(weights) <= 0:
            weights = [float(r) for r in room]
        for j, n in enumerate(mixture_counts(weights, left)):
            add = min(n, room[j])
            out[j] += add
            left -= add
    return out


def paser_select(embeddings: torch.Tensor, degradation: torch.Tensor, budget: int, clusters: int, seed: int = 0,
                 duplicate: float = 0.98) -> tuple[torch.Tensor, dict]:
    """Indices (sorted) of the ``budget`` candidates PASER trains on, and what it decided (for the report)."""
    n = embeddings.shape[0]
    if budget > n:
        raise PrunewiseError(f"recovery selection: a budget of {budget} windows from {n} candidates; raise the pool")
    if budget < clusters:
        raise PrunewiseError(f"recovery budget of {budget} windows is smaller than the {clusters} clusters PASER "
                             "splits it over; raise --recover-tokens or lower the part's clusters option")
    labels = kmeans(embeddings, clusters, seed=seed)
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    gain = degradation.double().clamp_min(0)
    sizes = [int((labels == j).sum()) for j in range(clusters)]
    mass = [float(gain[labels == j].sum()) for j in range(clusters)]
    want = cluster_budgets(mass, sizes, budget)
    chosen: list[int] = []
    dropped = 0
    for j in range(clusters):
        members = torch.nonzero(labels == j).flatten()
        order = members[torch.argsort(-degradation[members].double(), stable=True)]
        picked: list[int] = []
        for idx in order.tolist():
            if len(picked) == want[j]:
                break
            if picked and float((unit[picked] @ unit[idx]).max()) > duplicate:
                dropped += 1
                continue
            picked.append(idx)
        chosen += picked
    if len(chosen) < budget:  # duplicates left some cluster short: the most degraded of the rest fill it
        taken = set(chosen)
        rest = [i for i in torch.argsort(-degradation.double(), stable=True).tolist() if i not in taken]
        chosen += rest[:budget - len(chosen)]
    index = torch.tensor(sorted(chosen), dtype=torch.long)
    info = {"method": "paser", "candidates": n, "selected": int(index.numel()), "clusters": clusters,
            "cluster_sizes": sizes, "cluster_budgets": want, "cluster_degradation": mass,
            "duplicates_dropped": dropped, "mean_degradation_selected": float(degradation[index].double().mean()),
            "mean_degradation_all": float(degradation.double().mean())}
    return index, info
