"""Per-round cost of secure aggregation vs plain aggregation for the OV model: seconds and bytes per site."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from magnet_core.federation.aggregate import SiteUpdate, aggregate_updates
from magnet_core.federation.secagg import MaskedInput, SecAggServer, SecAggSetup, SecAggSite, UpdateLayout
from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity, context_digest
from magnet_core.model.config import get_preset
from magnet_core.model.network import build_model

OV_DIMS = {"mRNA": 1000, "miRNA": 448}  # tcga-ov-magnet feature counts


def _record_bytes(record: dict) -> int:
    """Payload bytes of a ConfigRecord-style dict (8 per int, raw length of bytes / str)."""
    total = 0
    for v in record.values():
        for x in (v if isinstance(v, list) else [v]):
            total += len(x) if isinstance(x, (bytes, str)) else 8
    return total


def consortium_identities(n: int) -> tuple[Roster, dict[int, SiteAuth]]:
    """n sites with identity keys of the consortium PKI's type (EC P-384, as `magnet-fl pki site-key` makes them)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    idents = {i: SiteIdentity(f"site{i}", ec.generate_private_key(ec.SECP384R1())) for i in range(1, n + 1)}
    roster = Roster(sites={x.name: x.public_text() for x in idents.values()})
    return roster, {i: SiteAuth(x, roster) for i, x in idents.items()}


def one_round(glob: dict, updates: list[SiteUpdate], max_dropouts: int, dropped: int = 0,
              auth: tuple[Roster, dict[int, SiteAuth]] | None = None) -> dict:
    """One secure round; the last ``dropped`` sites share their secrets but never send their vector. ``auth``:
    authenticated (roster + each site's identity); each site also hashes the global model it received."""
    layout = UpdateLayout.from_params(glob)
    n = len(updates)
    ids = list(range(1, n + 1))
    site_s = {i: 0.0 for i in ids}
    up = {i: 0 for i in ids}
    down = {i: 0 for i in ids}
    keep = ids[:n - dropped]
    server_s = 0.0

    def timed_site(i, fn):
        t0 = time.perf_counter()
        out = fn()
        site_s[i] += time.perf_counter() - t0
        return out

    def timed_server(fn):
        nonlocal server_s
        t0 = time.perf_counter()
        out = fn()
        server_s += time.perf_counter() - t0
        return out

    setup = SecAggSetup.for_sites("bench", ids, layout.length, max_dropouts=max_dropouts)
    for i in ids:
        down[i] += _record_bytes(setup.to_record())
    if auth is None:
        sites = {i: SecAggSite(setup, i) for i in ids}
    else:
        ctx = {i: timed_site(i, lambda: context_digest(glob, {"round": 1})) for i in ids}
        sites = {i: SecAggSite(setup, i, auth[1][i], ctx[i]) for i in ids}
    server = SecAggServer(setup, auth[0] if auth else None)
    adverts = [timed_site(i, sites[i].advertise) for i in ids]
    for a in adverts:
        up[a.site_id] += _record_bytes(a.to_record())
    book = timed_server(lambda: server.collect_keys(adverts))
    bundles = [timed_site(i, lambda i=i: sites[i].share(book)) for i in ids]
    for i, b in zip(ids, bundles):
        down[i] += _record_bytes(book.to_record())
        up[i] += _record_bytes(b.to_record())
    inboxes = timed_server(lambda: server.route_shares(bundles))
    for i in ids:
        down[i] += _record_bytes(inboxes[i].to_record())
        if i not in keep:
            continue
        vec = timed_site(i, lambda i=i: layout.encode_update(updates[i - 1].params, updates[i - 1].num_train,
                                                             updates[i - 1].modality_counts))
        masked = timed_site(i, lambda i=i, vec=vec: sites[i].mask(inboxes[i], vec))
        up[i] += masked.masked.nbytes + _record_bytes(masked.to_record())
        masked = MaskedInput(masked.site_id, masked.masked, masked.transcript_signature)
        timed_server(lambda m=masked: server.add_masked(m))
    # stage 3a (authenticated only): the consistency check; its own bytes and CPU seconds are recorded apart
    cons_up = {i: 0 for i in keep}
    cons_down = {i: 0 for i in keep}
    cons_cpu = {i: 0.0 for i in keep}
    cons_server_cpu = 0.0
    if auth is not None:
        c0 = time.process_time()
        lst = timed_server(server.survivor_list)
        cons_server_cpu += time.process_time() - c0
        for i in keep:
            c0 = time.process_time()
            sig = timed_site(i, lambda i=i: sites[i].sign_survivors(lst))
            cons_cpu[i] += time.process_time() - c0
            cons_down[i] += _record_bytes(lst.to_record())
            cons_up[i] += _record_bytes(sig.to_record())
            c0 = time.process_time()
            timed_server(lambda s=sig: server.add_survivor_signature(s))
            cons_server_cpu += time.process_time() - c0
        for i in keep:
            down[i] += cons_down[i]
            up[i] += cons_up[i]
    req = timed_server(server.unmask_request)
    if auth is not None:  # the signatures the unmask request carries, and each site's check of them
        extra = _record_bytes(req.to_record()) - _record_bytes(dataclasses.replace(req, survivor_signatures={})
                                                               .to_record())
        for i in keep:
            cons_down[i] += extra
            c0 = time.process_time()
            sites[i]._check_consistency(set(req.survivors), set(req.dropped), req.survivor_signatures)
            cons_cpu[i] += time.process_time() - c0
    replies = []
    for i in keep:
        down[i] += _record_bytes(req.to_record())
        r = timed_site(i, lambda i=i: sites[i].unmask(req))
        up[i] += _record_bytes(r.to_record())
        replies.append(r)
    total = timed_server(lambda: server.finish(replies))
    secure = timed_server(lambda: layout.decode_mean(total, glob))
    t0 = time.perf_counter()
    plain = aggregate_updates(glob, updates[:n - dropped], modality_aware=True, robust="mean")
    plain_server = time.perf_counter() - t0
    worst = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in glob)
    params = sum(v.size for v in glob.values())
    return {
        "mode": "authenticated" if auth else "plain-secagg", "sites": n, "max_dropouts": max_dropouts,
        "dropped_before_masking": dropped, "parameters": int(params),
        "vector_length": layout.length,
        "secure_site_seconds": statistics.mean(site_s[i] for i in keep), "secure_server_seconds": server_s,
        "plain_server_seconds": plain_server,
        "secure_upload_bytes_per_site": statistics.mean(up[i] for i in keep),
        "secure_extra_download_bytes_per_site": statistics.mean(down[i] for i in keep),
        "plain_upload_bytes_per_site": int(sum(v.nbytes for v in glob.values())) + 8 * (1 + len(OV_DIMS)),
        "max_abs_difference_vs_plain": worst,
        # the consistency check (stage 3a; authenticated only, else 0): bytes per site both ways (the survivor list,
        # the signature, the signatures in the unmask request) and CPU seconds (process time) per site signing and
        # checking them, and on the coordinator (list, verifying each signature)
        "consistency_upload_bytes_per_site": statistics.mean(cons_up[i] for i in keep),
        "consistency_download_bytes_per_site": statistics.mean(cons_down[i] for i in keep),
        "consistency_site_cpu_seconds": statistics.mean(cons_cpu[i] for i in keep),
        "consistency_server_cpu_seconds": cons_server_cpu,
    }


def quality(data: str, scenario: str, seeds: list[int], rounds: int, local_epochs: int, clip: float,
            noise: list[float], delta: float, only: list[str] | None = None) -> list[dict]:
    """In-process federated training (magnet_core only, no Flower): plain modality-aware FedAvg vs the same rounds
    through secure aggregation, and uniform-weight DP with distributed noise through secure aggregation at each
    noise multiplier. Returns the final pooled test MCC per method and seed, and epsilon for DP."""
    from magnet_core.cohort.data import load_for_seed
    from magnet_core.consortium.scenarios import build_consortium, load_scenario
    from magnet_core.federation.aggregate import pooled_metrics
    from magnet_core.federation.dp import (
        DPConfig,
        PrivacyAccountant,
        dp_decode,
        dp_site_vector,
        effective_noise_multiplier,
        noise_piece_std,
        noise_rng,
    )
    from magnet_core.federation.secagg import run_local as secure_sum
    from magnet_core.model.site import SiteRuntime
    from magnet_core.model.train import in_dims_of

    preset = get_preset("ov")
    quiet = lambda *_a, **_k: None  # noqa: E731
    out = []
    for seed in seeds:
        cohort = load_for_seed(data, seed, log=quiet)
        sites = build_consortium(cohort, load_scenario(scenario), seed, log=quiet)
        init = build_model(in_dims_of(cohort), cohort.num_classes, preset.model, seed)
        glob0 = {k: v.detach().numpy().copy() for k, v in init.state_dict().items()}
        layout = UpdateLayout.from_params(glob0)
        # "plain-reversed": the same plain aggregate with the sites summed in reverse order, i.e. different float64
        # rounding: the yardstick for how much last-bit differences alone move the final MCC
        # "plain-1ulp": the plain aggregate with 0.05 % of its values (about as many as the fixed point changes)
        # moved by one float32 step: how much last-bit differences alone move the final MCC
        methods: list[tuple[str, float | None]] = [("plain", None), ("plain-reversed", None), ("plain-1ulp", None),
                                                   ("secure", None)]
        methods += [(f"dp-z{z}", z) for z in noise]
        methods = [(m, z) for m, z in methods if not only or m in only]
        for method, z in methods:
            torch.manual_seed(seed)
            runtimes = [SiteRuntime.build(f"site{i}", c, preset.model, preset.graph.sparsity)
                        for i, c in enumerate(sites)]
            glob = {k: v.copy() for k, v in glob0.items()}
            cfg = DPConfig(clip_norm=clip, noise_multiplier=z or 0.0, delta=delta, noise="distributed")
            acc = PrivacyAccountant(delta)
            norms: list[float] = []
            t0 = time.perf_counter()
            for rnd in range(1, rounds + 1):
                fitted = [(rt, {k: np.asarray(v) for k, v in rt.fit(glob, preset.train, local_epochs, rnd,
                                                                     seed)[0].items()}) for rt in runtimes]
                if method.startswith("plain"):
                    ups = [SiteUpdate(rt.name, p, rt.train.n, rt.modality_counts) for rt, p in fitted]
                    glob = aggregate_updates(glob, ups[::-1] if method == "plain-reversed" else ups,
                                             modality_aware=True, robust="mean")
                    if method == "plain-1ulp":
                        bump = np.random.default_rng(seed * 100 + rnd)
                        for k, v in glob.items():
                            hit = bump.random(v.shape) < 5e-4
                            glob[k] = np.where(hit, np.nextafter(v, np.where(bump.random(v.shape) < 0.5, -np.inf,
                                                                             np.inf).astype(v.dtype)), v)
                    continue
                setup = SecAggSetup.for_sites(f"{method}-{seed}-{rnd}", list(range(1, len(fitted) + 1)),
                                              layout.length, max_dropouts=(len(fitted) - 1) // 2)
                if z is None:
                    vecs = {i + 1: layout.encode_update(p, rt.train.n, rt.modality_counts)
                            for i, (rt, p) in enumerate(fitted)}
                    total, _ = secure_sum(setup, vecs)
                    glob = layout.decode_mean(total, glob)
                else:
                    piece = noise_piece_std(cfg, setup.threshold)
                    made = [dp_site_vector(layout, p, glob, rt.modality_counts, cfg, piece,
                                           noise_rng(seed * 1000 + rnd * 10 + i)) for i, (rt, p) in enumerate(fitted)]
                    vecs = {i + 1: v for i, (v, _) in enumerate(made)}
                    norms += [n for _, n in made]
                    total, server = secure_sum(setup, vecs)
                    glob = dp_decode(layout, total, glob)
                    acc.add_round(effective_noise_multiplier(cfg, len(server.u3), setup.threshold))
            metrics = pooled_metrics([rt.evaluate_counts(glob) for rt in runtimes])
            row = {"seed": seed, "method": method, "mcc": metrics.get("mcc"), "seconds": time.perf_counter() - t0}
            if z is not None:
                row.update({"noise_multiplier": z, "clip_norm": clip, "median_update_norm": float(np.median(norms)),
                            **acc.spent()})
            out.append(row)
            print(f"seed {seed} {method}: MCC {row['mcc']:.3f}" + (f", epsilon {row['epsilon']:.3g} "
                  f"(RDP {row['epsilon_rdp']:.3g}) at delta {delta:g}, median update norm "
                  f"{row['median_update_norm']:.3g} (clip {clip:g})" if z is not None else "")
                  + f" [{row['seconds']:.0f} s]", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", default="3,5")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per setting (the median is reported)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--auth", action="store_true", help="also run authenticated secure aggregation (signed keys, "
                    "shares and transcript) beside plain secure aggregation")
    ap.add_argument("--quality", default=None, metavar="DATA",
                    help="also train in-process on DATA (e.g. tcga-ov-magnet): plain vs secure vs DP MCC")
    ap.add_argument("--scenario", default="iid-3")
    ap.add_argument("--seeds", default="10")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=10)
    ap.add_argument("--clip", type=float, default=1.0, help="DP clip norm of each site's update")
    ap.add_argument("--noise", default="0.5,2.0", help="DP noise multipliers ('' for none)")
    ap.add_argument("--methods", default="", help="only these quality methods (comma-separated; '' = all)")
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = get_preset("ov")
    model = build_model(OV_DIMS, 2, preset.model, seed=0)
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    rows = []
    load_before = os.getloadavg()
    for n in [int(s) for s in args.sites.split(",") if s]:
        updates = []
        for i in range(n):
            mc = {"mRNA": int(rng.integers(20, 60)), "miRNA": int(rng.integers(40, 90))}
            updates.append(SiteUpdate(f"site{i}", {k: (g + rng.normal(0, 0.01, g.shape)).astype(g.dtype)
                                                   for k, g in glob.items()}, max(mc.values()), mc))
        ident = consortium_identities(n)
        for dropped, auth in [(d, a) for d in (0, 1) for a in ((None, ident) if args.auth else (None,))]:
            runs = [one_round(glob, updates, (n - 1) // 2, dropped, auth) for _ in range(args.repeats)]
            row = {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k])
                   for k in runs[0]}
            rows.append(row)
            print(f"[{row['mode']}] {n} sites (threshold {n - row['max_dropouts']}, {dropped} dropped before masking), "
                  f"{row['parameters']:,} parameters: site {row['secure_site_seconds']:.3f} s, server "
                  f"{row['secure_server_seconds']:.3f} s (plain server {row['plain_server_seconds']:.3f} s); upload "
                  f"per site {row['secure_upload_bytes_per_site'] / 1e6:.2f} MB secure vs "
                  f"{row['plain_upload_bytes_per_site'] / 1e6:.2f} MB plain, extra download "
                  f"{row['secure_extra_download_bytes_per_site'] / 1e3:.1f} kB; max |secure - plain| = "
                  f"{row['max_abs_difference_vs_plain']:.2e}")
    result: dict = {"cost": rows, "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
                    "command": "python -m benchmarks.secagg_cost " + " ".join(sys.argv[1:])}
    if args.quality:
        result["quality"] = quality(args.quality, args.scenario, [int(x) for x in args.seeds.split(",")],
                                    args.rounds, args.local_epochs, args.clip,
                                    [float(x) for x in args.noise.split(",") if x], args.delta,
                                    [m for m in args.methods.split(",") if m])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if not rows:
        return
    last = rows[-4 if args.auth else -2]
    print(f"secure / plain upload bytes per site ({last['sites']} sites): "
          f"{last['secure_upload_bytes_per_site'] / last['plain_upload_bytes_per_site']:.2f}x")
    for plain, auth in zip(rows[::2], rows[1::2]) if args.auth else ():
        print(f"authenticated vs plain secure aggregation, {plain['sites']} sites, {plain['dropped_before_masking']} "
              f"dropped: site {auth['secure_site_seconds'] - plain['secure_site_seconds']:+.3f} s, server "
              f"{auth['secure_server_seconds'] - plain['secure_server_seconds']:+.3f} s, upload "
              f"{auth['secure_upload_bytes_per_site'] - plain['secure_upload_bytes_per_site']:+,.0f} B, download "
              f"{auth['secure_extra_download_bytes_per_site'] - plain['secure_extra_download_bytes_per_site']:+,.0f} B"
              " per site")


if __name__ == "__main__":
    main()
