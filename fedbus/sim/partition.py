"""Non-IID splits: per-class Dirichlet proportions over clients.

The usual label-skew benchmark (Hsu et al. 2019; NIID-Bench): for every class, draw
proportions ``p ~ Dirichlet(alpha * 1)`` over clients and cut that class's shuffled examples
at ``cumsum(p)``. Small ``alpha`` gives each client a handful of dominant classes; large
``alpha`` tends to the IID split.

Minimum size rule (top-up, not resampling): with hundreds of clients and a few examples each,
redrawing until every client has ``min_size`` examples essentially never terminates. Instead,
each client below ``min_size`` takes the missing examples, chosen at random, from whichever
client currently holds the most. Donors are the largest shards, so the skew of everyone
else is untouched and the donors lose a negligible share.
"""

from __future__ import annotations

import numpy as np


def dirichlet_partition(
    labels: np.ndarray, n_clients: int, alpha: float, seed: int, *, min_size: int = 2
) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``n_clients`` clients (each sorted, disjoint, covering).

    Deterministic given ``seed``. Raises ``ValueError`` when ``n_clients * min_size``
    exceeds the number of examples.
    """
    labels = np.asarray(labels)
    n = labels.size
    if n_clients < 1:
        raise ValueError("n_clients must be at least 1")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_size < 0 or n_clients * min_size > n:
        raise ValueError(f"cannot give {n_clients} clients {min_size} examples each out of {n}")
    rng = np.random.default_rng(seed)
    shards: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(n_clients, float(alpha)))
        cuts = np.minimum((np.cumsum(p)[:-1] * idx.size).astype(np.int64), idx.size)
        for client, part in enumerate(np.split(idx, cuts)):
            if part.size:
                shards[client].append(part)
    parts = [np.concatenate(s) if s else np.empty(0, dtype=np.int64) for s in shards]
    _top_up(parts, min_size, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> None:
    """Move random examples from the largest shard to each shard short of ``min_size``."""
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            take = min(min_size - int(sizes[client]), int(sizes[donor]) - min_size)
            pick = rng.permutation(parts[donor].size)
            moved, kept = parts[donor][pick[:take]], parts[donor][pick[take:]]
            parts[donor] = kept
            parts[client] = np.concatenate([parts[client], moved])
            sizes[donor] -= take
            sizes[client] += take


def owned_labels_partition(
    labels: np.ndarray,
    n_clients: int,
    owners: np.ndarray,
    owned: tuple[int, ...],
    alpha: float,
    seed: int,
    *,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Like :func:`dirichlet_partition`, but the examples of the ``owned`` labels go only to
    the ``owners`` clients (Dirichlet among them) and every other example only to the rest.

    Models a fleet where some labels live only on some devices (the slow ones, say): an
    algorithm that hears from fast devices more often under-learns those labels.
    """
    labels = np.asarray(labels)
    owners = np.unique(np.asarray(owners, dtype=np.int64))
    if owners.size == 0 or owners.size >= n_clients or owners[0] < 0 or owners[-1] >= n_clients:
        raise ValueError("owners must be a non-empty proper subset of the clients")
    rest = np.setdiff1d(np.arange(n_clients), owners)
    mine = np.isin(labels, np.asarray(owned))
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n_clients
    for clients, mask, s in ((owners, mine, seed), (rest, ~mine, seed + 1)):
        idx = np.flatnonzero(mask)
        sub = dirichlet_partition(labels[idx], clients.size, alpha, s, min_size=min_size)
        for c, p in zip(clients, sub, strict=True):
            parts[int(c)] = idx[p]
    return parts
