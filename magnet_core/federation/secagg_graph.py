"""The neighbourhood graph of sparse secure aggregation (SecAgg+, Bell et al. 2020): public, deterministic, checked.

Every site and the coordinator derive the same graph from public inputs only, the round id and the sorted site ids
(the coordinator cannot pick it): a Harary graph H(k, n) (each site joined to the k/2 nearest on either side of a
ring) on a permutation of the sites drawn from SHA-256(round id || sorted ids || k). This is the ring-on-a-random-
permutation construction of Flower's SecAgg+ workflow; Bell et al. use a random graph, whose role (neighbourhoods of
O(log n) sites, a connected graph among the survivors) the shuffled Harary graph plays here.

Degree (:func:`choose_degree`): a site's secrets are shared among its closed neighbourhood (itself and its k
neighbours, k + 1 share holders) with threshold t = floor((k + 1) / 2) + 1 (a majority: holders that each reveal
one secret of a site, never both, cannot give the coordinator t shares of both). The round can be finished if every
neighbourhood keeps >= t holders answering. With sites dropping independently at rate delta, a neighbourhood fails
with probability P[Bin(k + 1, delta) > k + 1 - t]; the union over the n neighbourhoods is kept below 2^-eta (eta = 20
by default: a failed round is run again, it leaks nothing). The smallest even k meeting that is chosen; when it is
>= n - 1 the graph is the complete one. Privacy does not rest on that probability: before it helps unmask, every site
checks that the survivors form one connected piece of the graph (:func:`connected`), so the coordinator can only
ever remove the masks of the sum over all survivors (any smaller set has a pairwise mask with a survivor outside it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping, Sequence

PREFIX = b"magnet-fl/secagg/graph/v1"


def _stream(seed: bytes):
    counter = 0
    while True:
        block = hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
        for i in range(0, 32, 8):
            yield int.from_bytes(block[i:i + 8], "big")


def graph_seed(round_id: str, site_ids: Sequence[int], degree: int) -> bytes:
    ids = ",".join(str(int(i)) for i in sorted(site_ids)).encode()
    rid = str(round_id).encode()
    return hashlib.sha256(PREFIX + len(rid).to_bytes(8, "big") + rid + len(ids).to_bytes(8, "big") + ids
                          + int(degree).to_bytes(8, "big")).digest()


def permutation(round_id: str, site_ids: Sequence[int], degree: int) -> list[int]:
    """The sorted site ids shuffled (Fisher-Yates, unbiased: rejection sampling on a SHA-256 counter stream)."""
    order = sorted(int(i) for i in site_ids)
    draw = _stream(graph_seed(round_id, order, degree))
    for i in range(len(order) - 1, 0, -1):
        span = i + 1
        limit = (2**64 // span) * span
        while True:
            r = next(draw)
            if r < limit:
                break
        j = r % span
        order[i], order[j] = order[j], order[i]
    return order


def neighbourhood_graph(round_id: str, site_ids: Sequence[int], degree: int) -> dict[int, frozenset[int]]:
    """site id -> its ``degree`` neighbours (Harary graph H(degree, n) on the seeded permutation)."""
    n = len(site_ids)
    if degree < 2 or degree % 2 or degree > n - 1:
        raise ValueError(f"graph degree must be even and in 2..{n - 1} for {n} sites, got {degree}")
    order = permutation(round_id, site_ids, degree)
    half = degree // 2
    return {order[p]: frozenset(order[(p + d) % n] for d in range(-half, half + 1) if d) for p in range(n)}


def connected(graph: Mapping[int, Iterable[int]], nodes: Iterable[int]) -> bool:
    """Whether ``nodes`` form one connected piece of ``graph`` (edges between them only)."""
    keep = set(nodes)
    if not keep:
        return False
    start = next(iter(keep))
    seen, todo = {start}, [start]
    while todo:
        u = todo.pop()
        for v in graph[u]:
            if v in keep and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == keep


def neighbourhood_threshold(degree: int) -> int:
    """The smallest majority of a closed neighbourhood (degree + 1 holders)."""
    return (degree + 1) // 2 + 1


def failure_bound(n: int, degree: int, dropout_rate: float) -> float:
    """Union bound on the probability that some neighbourhood keeps fewer than its threshold of holders when each
    site drops independently with probability ``dropout_rate``."""
    m, t = degree + 1, neighbourhood_threshold(degree)
    tail = sum(math.comb(m, j) * dropout_rate**j * (1 - dropout_rate) ** (m - j) for j in range(m - t + 1, m + 1))
    return n * tail


def choose_degree(n: int, dropout_rate: float = 0.1, eta: float = 20.0) -> int:
    """The smallest even degree whose :func:`failure_bound` is <= 2^-eta; 0 (the complete graph) when none below
    n - 1 is."""
    if not 0 <= dropout_rate < 0.5:
        raise ValueError(f"dropout rate must be in [0, 0.5), got {dropout_rate}")
    for k in range(2, n - 1, 2):
        if failure_bound(n, k, dropout_rate) <= 2.0**-eta:
            return k
    return 0
