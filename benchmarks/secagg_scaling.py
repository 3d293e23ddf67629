"""Cost of one secure sum at n sites: complete graph (SecAgg) vs neighbourhood graph (SecAgg+), per stage and site.

The real state machines (magnet_core.federation.secagg) run in one process, one party after another, so each call's
CPU time (time.process_time) is that party's work for that stage. Every message is serialised as it crosses the wire
in a deployment (a Flower RecordDict holding its ConfigRecord under "secagg", the masked vector as an ArrayRecord under
"masked"; Flower 1.41's protobuf, flower_compat.wire) and its bytes are counted up (site -> coordinator) or down.
Authenticated by default (EC P-384 identity keys, as `magnet-fl pki site-key` makes them; --plain: without).
A share of the sites (--dropout, default 10 %) drops after sending its masked vector (they do not answer the unmask
request); the decoded sum is checked bit for bit against the plain sum of the same quantized (fixed-point) updates,
clipped to norm 1. Neighbourhood degree: secagg_graph.choose_degree(n, --dropout) (0 there means the complete graph,
and the row says so). The vector is random, --length long (default 10,000 parameters, not the OV model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flower_compat.wire import recorddict_bytes
from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    SecAggServer,
    SecAggSetup,
    SecAggSite,
    decode_fixed,
    encode_fixed,
)
from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity
from magnet_core.federation.secagg_graph import choose_degree
from magnet_core.protocol.keys import MASKED_KEY, SECAGG_KEY
from magnet_core.protocol.secagg import SecAggStart

STAGES = ("advertise", "share", "mask", "consistency", "unmask")  # consistency: authenticated only (stage 3a)
SERVER_STAGES = ("collect_keys", "route_shares", "add_masked", "consistency", "finish")


def wire(record: dict, masked: np.ndarray | None = None) -> int:
    content = RecordDict({SECAGG_KEY: ConfigRecord(record)})
    if masked is not None:
        content[MASKED_KEY] = ArrayRecord({MASKED_KEY: Array(np.ascontiguousarray(masked))})
    return len(recorddict_bytes(content))


def identities(n: int) -> tuple[Roster, dict[int, SiteAuth]]:
    from cryptography.hazmat.primitives.asymmetric import ec

    idents = {i: SiteIdentity(f"site{i:03d}", ec.generate_private_key(ec.SECP384R1())) for i in range(1, n + 1)}
    roster = Roster(sites={x.name: x.public_text() for x in idents.values()})
    return roster, {i: SiteAuth(x, roster) for i, x in idents.items()}


def one_sum(n: int, graph: str, length: int, dropout: float, auth, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    vectors = {}
    for i in ids:
        x = rng.normal(0, 1, length)
        vectors[i] = x * min(1.0, 1.0 / np.linalg.norm(x))
    degree = choose_degree(n, dropout) if graph == "neighbourhood" else 0
    rid = f"bench/{graph}/{n}/{seed}"
    if degree:
        setup = SecAggSetup.for_neighbourhoods(rid, ids, length, degree)
    else:  # the complete graph with the same dropout tolerance (threshold a majority)
        setup = SecAggSetup.for_sites(rid, ids, length, max_dropouts=min((n - 1) // 2, max(1, round(dropout * n))))
    after = set(ids[::max(1, round(1 / dropout))][:round(dropout * n)]) if dropout else set()
    cpu = {s: {i: 0.0 for i in ids} for s in STAGES}
    srv = dict.fromkeys(SERVER_STAGES, 0.0)
    up, down = dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)

    def site_call(stage, i, fn):
        t0 = time.process_time()
        out = fn()
        cpu[stage][i] += time.process_time() - t0
        return out

    def server_call(stage, fn):
        t0 = time.process_time()
        out = fn()
        srv[stage] += time.process_time() - t0
        return out

    roster, auths = auth if auth else (None, None)
    sites = {i: SecAggSite(setup, i, auths[i], b"ctx") if auths else SecAggSite(setup, i) for i in ids}
    server = SecAggServer(setup, roster)
    for i in ids:
        down[i] += wire(SecAggStart(setup, i).to_record())
    adverts = [site_call("advertise", i, sites[i].advertise) for i in ids]
    for a in adverts:
        up[a.site_id] += wire(a.to_record())
    server_call("collect_keys", lambda: server.collect_keys(adverts))
    bundles = []
    for i in ids:
        book = server_call("collect_keys", lambda i=i: server.book_for(i))
        down[i] += wire(book.to_record())
        bundles.append(site_call("share", i, lambda i=i, book=book: sites[i].share(book)))
        up[i] += wire(bundles[-1].to_record())
    inboxes = server_call("route_shares", lambda: server.route_shares(bundles))
    for i in ids:
        down[i] += wire(inboxes[i].to_record())
        m = site_call("mask", i, lambda i=i: sites[i].mask(inboxes[i], vectors[i]))
        up[i] += wire(m.to_record(), m.masked)
        server_call("add_masked", lambda m=m: server.add_masked(m))
    if auth:  # stage 3a, the consistency check: every survivor answering signs the survivor list
        lst = server_call("consistency", server.survivor_list)
        for i in ids:
            if i in after:
                continue
            down[i] += wire(lst.to_record())
            sig = site_call("consistency", i, lambda i=i: sites[i].sign_survivors(lst))
            up[i] += wire(sig.to_record())
            server_call("consistency", lambda sig=sig: server.add_survivor_signature(sig))
    req = server_call("finish", server.unmask_request)
    replies = []
    for i in ids:
        if i in after:
            continue
        down[i] += wire(req.to_record())
        r = site_call("unmask", i, lambda i=i: sites[i].unmask(req))
        up[i] += wire(r.to_record())
        replies.append(r)
    total = server_call("finish", lambda: server.finish(replies))
    acc = np.zeros(length, dtype=np.uint64)
    for i in server.u3:
        acc += encode_fixed(vectors[i], DEFAULT_FRAC_BITS, n)
    exact = bool(np.array_equal(total, decode_fixed(acc)))
    answering = [i for i in ids if i not in after]
    return {
        "sites": n, "graph": graph, "degree": degree or n - 1, "complete": not degree, "threshold": setup.threshold,
        "authenticated": auth is not None, "vector_length": length, "dropped_after_masking": len(after),
        "sum_equals_plain_sum_of_quantized_updates": exact, "sites_in_sum": len(server.u3),
        "site_cpu_seconds_mean": {s: statistics.mean(cpu[s][i] for i in (answering if s in ("consistency", "unmask")
                                                                         else ids)) for s in STAGES},
        "site_cpu_seconds_max": {s: max(cpu[s].values()) for s in STAGES},
        "site_cpu_seconds_total_mean": statistics.mean(sum(cpu[s][i] for s in STAGES) for i in answering),
        "server_cpu_seconds": srv, "server_cpu_seconds_total": sum(srv.values()),
        "bytes_up_per_site_mean": statistics.mean(up[i] for i in answering),
        "bytes_down_per_site_mean": statistics.mean(down[i] for i in answering),
        "bytes_up_per_site_max": max(up.values()), "bytes_down_per_site_max": max(down.values()),
        "masked_vector_bytes": 8 * length,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[5, 20, 50, 100])
    ap.add_argument("--graphs", nargs="+", default=["full", "neighbourhood"], choices=["full", "neighbourhood"])
    ap.add_argument("--length", type=int, default=10_000)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--plain", action="store_true", help="without authentication (no identity keys)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/secagg_scaling.json"))
    args = ap.parse_args()
    rows = []
    for n in args.sites:
        auth = None if args.plain else identities(n)
        for graph in args.graphs:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            row = one_sum(n, graph, args.length, args.dropout, auth, args.seed)
            row.update({"wall_seconds": time.perf_counter() - t0, "load_average_1min_before": load})
            rows.append(row)
            exact = row["sum_equals_plain_sum_of_quantized_updates"]
            print(f"n={n:4d} {graph:13s} k={row['degree']:3d} t={row['threshold']:3d} exact={exact} "
                  "site cpu s/stage (mean) "
                  + " ".join(f"{s}={row['site_cpu_seconds_mean'][s]:.3f}" for s in STAGES)
                  + f" | server cpu s={row['server_cpu_seconds_total']:.2f} | up={row['bytes_up_per_site_mean']:,.0f}"
                  f" B down={row['bytes_down_per_site_mean']:,.0f} B | wall {row['wall_seconds']:.1f}s load {load:.2f}",
                  flush=True)
    out = {"script": "benchmarks/secagg_scaling.py", "args": {k: (str(v) if isinstance(v, Path) else v)
                                                              for k, v in vars(args).items()},
           "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
           "degree_rule": "secagg_graph.choose_degree(n, dropout): smallest even k with n * P[Bin(k+1, dropout) > "
                          "k+1-t] <= 2^-20, t = floor((k+1)/2)+1; 0 (complete graph) when none below n-1",
           "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
