"""MAGNET reference vs magnet-fl from IDENTICAL weights, step by step: where do the trajectories part?

Per split and mode, one worker process (the reference's interpreter, ``--reference-python``; the reference's modules
imported from ``--reference PATH`` via ``sys.path``, nothing of it copied here) builds

- the reference: its ``MultiomicsDataset`` (cached by ``reference_draws._reference_dataset``), ``MLPEncoder``,
  ``MultiHeadAttentionLayer``, ``GNNDecoder`` and ``MAGNETTrainer`` (OV config values), trained by a plain loop equal
  to Lightning's fit (one batch per epoch: ``training_step``, backward, Adam step, StepLR step per epoch), tested by
  its ``forward(mode="test")`` in eval mode;
- ours: ``build_model`` + ``split_sets`` + the arithmetic of ``train._step`` (``forward``, ``magnet_loss``,
  backward, Adam step, StepLR step), tested by ``forward`` in eval mode,

copies our initial weights into the reference (by role, ``reference_init_and_modes.ROLE``; asserts every parameter
copied and the shapes equal), and trains both in lock-step, recording per epoch CE, KL and total loss of each, the
largest gradient difference and, after the step, the largest weight difference (mapped parameters). Epoch 0 also
records each block's forward output (encoders, attention, both convolutions, head, logits; rows matched by patient
id), every parameter's gradient difference and the Adam state after the first step. At the end: test logits of both
(matched by patient id), predictions and MCC.

Modes (all dropout handled by one tap on ``torch.nn.functional.dropout``, which ``nn.Dropout`` and both codes call):

- ``off``: dropout p = 0 in both (the modules' p set to 0; the tap checks every call saw p = 0): the deterministic
  computation. A control runs ours a second time with the training patients in reversed order (graph relabelled),
  to show what float rounding alone does to a trajectory of this model;
- ``off64``: as ``off`` with both models and all data in float64, and our graph given the reference's similarity
  values (each code computes them in float32 by its own formula); ``off64_ownw``: the same with our own values;
- ``ref_native``: no shared randomness: ours starts from the reference's initial weights (at the same seed the
  codes draw the GNN layers' weights in a different order) and each code draws its own masks from its own stream,
  as its own run does (the reference: its stream after its model is built; ours: ``torch.manual_seed(split)``).
  With ``ref_masks`` (our initial weights, the reference's masks) and ``our_masks`` this makes the 2 x 2 of
  initial weights x masks; the reference's MCC here must equal its stored one;
- ``ref_masks``: dropout on (p = 0.2); the reference draws its masks natively (``seed_everything(split)`` before its
  model is built, as ``main_inference.py``), ours replays exactly those masks, row by row matched by patient id;
- ``our_masks``: ours draws natively (``build_model(seed)`` then ``torch.manual_seed(seed)``, as ``fit_and_predict``),
  the reference replays them (its rows of test patients, which reach no loss in training, get mask 1).

The two dropout modes also check the harness: the natively drawing side must reproduce its stored 200-epoch MCC
(``reference_comparison.json`` ``same_seed``).

    python benchmarks/reference_trajectory.py --reference /tmp/ref --reference-python /tmp/refvenv/bin/python \\
        --work /tmp/href_work --splits 10 --modes off,ref_masks,our_masks --epochs 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reference_trajectory.json"
COMPARISON = ROOT / "benchmarks" / "results" / "reference_comparison.json"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MAGNET_FL_THREADS": "1",
              "FLWR_TELEMETRY_ENABLED": "0"}
P_DROP = 0.2


# ------------------------------------------------------------------------------------------------ worker


class DropoutTap:
    """Stands in for ``F.dropout``: records each training-mode call, draws natively, replays given masks, or checks
    that p is 0. ``queue`` holds masks to replay (one per call, in call order)."""

    def __init__(self, real):
        self.real = real
        self.mode = "native"  # native | replay
        self.record = False
        self.recorded: list = []
        self.queue: list = []
        self.calls: list = []

    def __call__(self, input, p=0.5, training=True, inplace=False):
        import torch

        self.calls.append((bool(training), float(p), tuple(input.shape)))
        if not training or p == 0:
            return self.real(input, p, training, inplace)
        if self.mode == "replay":
            mask = self.queue.pop(0)
            assert mask.shape == input.shape, (mask.shape, input.shape)
            return input * mask
        # torch's CPU dropout is input * (bernoulli(1 - p) / (1 - p)): the same draws and the same product here
        mask = self.real(torch.ones_like(input), p, True, False)
        if self.record:
            self.recorded.append(mask)
        return input * mask


def _maxdiff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def worker(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import matthews_corrcoef

    torch.set_num_threads(1)
    sys.path.insert(0, str(args.reference))
    sys.path.insert(1, str(ROOT / "benchmarks"))
    for extra in args.extra_path:
        sys.path.append(extra)  # only what the reference interpreter lacks (pydantic) comes from here
    from reference_draws import _reference_dataset, _stub_lightning
    from reference_init_and_modes import _our_name

    _stub_lightning()
    from model.base_models import GNNDecoder, MLPEncoder, MultiHeadAttentionLayer
    from trainer.trainer import MAGNETTrainer
    from utils import seed_everything

    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from magnet_core.model.loss import magnet_loss
    from magnet_core.model.network import build_model
    from magnet_core.model.train import forward, make_optimizer, split_sets

    split, mode, epochs = args.split, args.mode, args.epochs
    tap = DropoutTap(F.dropout)
    F.dropout = tap
    torch.nn.modules.dropout.F.dropout = tap

    # ---------------- data
    ds = _reference_dataset(args.reference, args.work / "reference-data", split, args.work)
    cohort = load_for_seed(args.data, split, log=lambda *a, **k: None)
    preset = get_preset("ov")
    no_drop = mode.startswith("off")
    model_cfg = preset.model if not no_drop else preset.model.model_copy(update={"dropout": 0.0})
    train_set, test_set = split_sets(cohort, preset.graph.sparsity, "auto")
    tr_ids = cohort.sample_ids[cohort.split_indices("train", "val")]
    te_ids = cohort.sample_ids[cohort.split_indices("test")]
    ref_ids = np.asarray(ds.labels.index, dtype=str)
    ref_pos = {p: i for i, p in enumerate(ref_ids)}
    tr_in_ref = torch.as_tensor([ref_pos[p] for p in tr_ids])  # our train row i = reference row tr_in_ref[i]
    te_in_ref = torch.as_tensor([ref_pos[p] for p in te_ids])
    assert bool(ds.train_mask[tr_in_ref].all()) and bool(ds.test_mask[te_in_ref].all())
    assert int(ds.train_mask.sum()) == len(tr_ids) and int(ds.test_mask.sum()) == len(te_ids)
    # the graphs: same edge sets? how far apart are the similarity weights (each code computes them in float32)?
    graph_check = {}
    for name, pset, rows in (("train", train_set, tr_in_ref), ("test", test_set, te_in_ref)):
        ei = pset.graph.edge_index
        ref_adj = ds.adj_mat[rows][:, rows]  # the reference's sparsified similarities in our row order
        ref_w = ref_adj[ei[0], ei[1]]
        graph_check[name] = {"edges_ours": int(ei.size(1)), "edges_ref": int((ref_adj > 0).sum()),
                             "every_our_edge_in_ref": bool((ref_w > 0).all()),
                             "max_abs_weight_diff": _maxdiff(pset.graph.edge_weight, ref_w),
                             "max_rel_weight_diff": float(((pset.graph.edge_weight.double() - ref_w.double()).abs()
                                                           / ref_w.double()).max())}
        if mode == "off64":  # isolate the training computation: ours gets the reference's similarity values
            pset.graph.edge_weight = ref_w.clone()
    # rows of each reference encoder's input (patients holding that modality, in label order)
    enc_rows = [{str(p): r for r, p in enumerate(idx)} for idx in ds.data_indices]
    n_ref = len(ref_ids)

    # ---------------- models (RNG order as each code's own run: the natively drawing side is built last)
    def build_ref():
        dims = [ds.get_data(omics_idx=i).shape[1] for i in range(2)]
        enc = [MLPEncoder(in_dims=d, hid_dims=256, dropout_rate=P_DROP) for d in dims]
        return MAGNETTrainer(dataset=ds, unimodal_encoders=enc,
                             attention_layer=MultiHeadAttentionLayer(hid_dims=256, num_heads=8),
                             gnn_decoder=GNNDecoder(hid_dims=256, out_dims=2, num_layers=2, dropout_rate=P_DROP,
                                                    negative_slope=0.2),
                             loss_fn=torch.nn.CrossEntropyLoss(), lr=0.000212, wd=0.001)

    in_dims = {m: int(cohort.X[m].shape[1]) for m in cohort.modalities}
    assert list(in_dims) == ["mRNA", "miRNA"], list(in_dims)
    rng = {}
    if mode in ("ref_masks", "ref_native"):
        ours = build_model(in_dims, cohort.num_classes, model_cfg, split)
        seed_everything(split)
        ref = build_ref()
        if mode == "ref_native":  # two RNG streams, each as its own code's run: swapped in around each step
            rng["ref"] = torch.get_rng_state()
            torch.manual_seed(split)
            rng["ours"] = torch.get_rng_state()
    else:
        seed_everything(split)
        ref = build_ref()
        ours = build_model(in_dims, cohort.num_classes, model_cfg, split)
        torch.manual_seed(split)  # as fit_and_predict, before training
    ours_p = dict(ours.named_parameters())
    mapping = {}
    init_differs_before_copy = []
    with torch.no_grad():
        for name, p in ref.named_parameters():
            q = ours_p[_our_name(name)]
            assert p.shape == q.shape, (name, p.shape, q.shape)
            if not torch.equal(p, q):
                init_differs_before_copy.append(_our_name(name))
            if mode == "ref_native":
                q.copy_(p)  # ours starts from the reference's initial weights
            else:
                p.copy_(q)
            mapping[name] = _our_name(name)
    assert sorted(mapping.values()) == sorted(ours_p), "not every parameter mapped"
    assert all(torch.equal(p, ours_p[mapping[n]]) for n, p in ref.named_parameters())
    if no_drop:  # dropout p = 0 in both codes' modules
        for enc in ref.unimodal_encoders:
            enc.encoder_layers[2].p = 0.0
        ref.gnn_decoder.dropout_rate = 0.0
        ref.gnn_decoder.decoder_layers[2].p = 0.0
        for enc in ours.encoders.values():
            enc.net[2].p = 0.0
        assert ours.cfg.dropout == 0.0

    control = None
    if mode == "off":  # ours again, training patients in reversed order (same weights): the float-rounding floor
        perm = torch.arange(train_set.n - 1, -1, -1)
        g = train_set.graph.subgraph(perm.numpy())
        train_rev = train_set.subset(perm, g)
        control = build_model(in_dims, cohort.num_classes, model_cfg, split)
        control.load_state_dict(ours.state_dict())
        for enc in control.encoders.values():
            enc.net[2].p = 0.0

    if mode.startswith("off64"):  # everything in float64: what is left of a difference is then not float32 rounding
        ds.data = [x.double() for x in ds.data]
        ds.adj_mat = ds.adj_mat.double()
        ds.modality_mask = ds.modality_mask.double()
        for s_ in (train_set, test_set) + ((train_rev,) if control is not None else ()):
            s_.xs = [x.double() for x in s_.xs]
            s_.graph.edge_weight = s_.graph.edge_weight.double()
        for m_ in (ref, ours, control):
            if m_ is not None:
                m_.double()
    opt_r = ref.configure_optimizers()
    opt_r, sched_r = opt_r["optimizer"], opt_r["lr_scheduler"]["scheduler"]
    opt_o, sched_o = make_optimizer(ours, preset.train)
    if control is not None:
        opt_c, sched_c = make_optimizer(control, preset.train)
    logged: dict = {}
    ref.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    batch = ds[0]
    ref_params = dict(ref.named_parameters())

    def weight_diff(model_p) -> tuple[float, str]:
        worst, at = 0.0, ""
        for n, p in ref_params.items():
            d = _maxdiff(p, model_p[mapping[n]])
            if d > worst:
                worst, at = d, mapping[n]
        return worst, at

    def grad_diffs(model_p) -> dict[str, list[float]]:
        out = {}
        for n, p in ref_params.items():
            q = model_p[mapping[n]]
            if p.grad is None or q.grad is None:
                out[mapping[n]] = [float("nan"), float("nan")]
                continue
            out[mapping[n]] = [_maxdiff(p.grad, q.grad), float(q.grad.abs().max())]
        return out

    # ---------------- dropout replay maps (call order: encoder mRNA, encoder miRNA, conv 0, conv 1, head)
    def ours_from_ref(masks):
        """Reference masks (its row order) -> masks for our training rows."""
        out = []
        for k, m in enumerate(masks):
            if k < 2:
                rows = [enc_rows[k].get(str(p), -1) for p in tr_ids]
                full = torch.ones(len(tr_ids), m.size(1))
                have = torch.as_tensor([r >= 0 for r in rows])
                full[have] = m[torch.as_tensor([r for r in rows if r >= 0])]
                out.append(full)
            else:
                out.append(m[tr_in_ref])
        return out

    def ref_from_ours(masks):
        out = []
        for k, m in enumerate(masks):
            if k < 2:
                idx = ds.data_indices[k]
                full = torch.ones(len(idx), m.size(1))
                pos = {str(p): i for i, p in enumerate(tr_ids)}
                for r, p in enumerate(idx):
                    if str(p) in pos:
                        full[r] = m[pos[str(p)]]
                out.append(full)
            else:
                full = torch.ones(n_ref, m.size(1))
                full[tr_in_ref] = m
                out.append(full)
        return out

    # ---------------- epoch-0 block outputs (forward hooks)
    blocks: dict[str, dict] = {"ref": {}, "ours": {}}

    def hook(side, name):
        def fn(module, inp, out):
            blocks[side][name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return fn

    handles = []
    for k, m in enumerate(["mRNA", "miRNA"]):
        handles.append(ref.unimodal_encoders[k].register_forward_hook(hook("ref", f"encoder.{m}")))
        handles.append(ours.encoders[m].register_forward_hook(hook("ours", f"encoder.{m}")))
    handles.append(ref.attention_layer.register_forward_hook(hook("ref", "attention")))
    handles.append(ours.attention.register_forward_hook(hook("ours", "attention")))
    for i in range(2):
        handles.append(ref.gnn_decoder.conv_layers[i].register_forward_hook(hook("ref", f"conv.{i}")))
        handles.append(ours.convs[i].register_forward_hook(hook("ours", f"conv.{i}")))
    handles.append(ref.gnn_decoder.decoder_layers[0].register_forward_hook(hook("ref", "head_hidden")))
    handles.append(ours.head_hidden.register_forward_hook(hook("ours", "head_hidden")))
    handles.append(ref.gnn_decoder.final_layer.register_forward_hook(hook("ref", "logits")))
    handles.append(ours.head_out.register_forward_hook(hook("ours", "logits")))

    def block_diffs() -> dict:
        out = {}
        for name, r in blocks["ref"].items():
            o = blocks["ours"][name]
            if name.startswith("encoder."):
                k = 0 if name.endswith("mRNA") else 1
                rows = [(i, enc_rows[k][str(p)]) for i, p in enumerate(tr_ids) if str(p) in enc_rows[k]]
                a = o[torch.as_tensor([i for i, _ in rows])]
                b = r[torch.as_tensor([j for _, j in rows])]
            else:
                a, b = o, r[tr_in_ref]
            out[name] = {"max_abs_diff": _maxdiff(a, b), "max_abs": float(a.abs().max()), "rows": int(a.size(0))}
        return out

    # ---------------- lock-step training
    ref.train()
    ours.train()
    if control is not None:
        control.train()
    per_epoch = []
    first = {}
    t0 = time.process_time()
    for epoch in range(epochs):
        # reference: its training_step
        tap.calls.clear()
        tap.mode, tap.record, tap.recorded = ("native", mode == "ref_masks", [])
        if mode == "our_masks":  # ours draws first, the reference replays its masks
            tap.mode, tap.record, tap.recorded = "native", True, []
            opt_o.zero_grad(set_to_none=True)
            logits, fused = forward(ours, train_set)
            loss_o, st_o = magnet_loss(logits, train_set.y, train_set.graph.edge_index, train_set.graph.edge_weight,
                                       fused, preset.train.kl_weight)
            loss_o.backward()
            ours_calls = list(tap.calls)
            tap.calls.clear()
            tap.mode, tap.record, tap.queue = "replay", False, ref_from_ours(tap.recorded)
            opt_r.zero_grad()
            loss_r = ref.training_step(batch, 0)
            loss_r.backward()
            assert not tap.queue
            ref_calls = list(tap.calls)
        else:
            if rng:
                torch.set_rng_state(rng["ref"])
            opt_r.zero_grad()
            loss_r = ref.training_step(batch, 0)
            loss_r.backward()
            ref_calls = list(tap.calls)
            if rng:
                rng["ref"] = torch.get_rng_state()
                torch.set_rng_state(rng["ours"])
            if mode == "ref_masks":
                tap.mode, tap.record, tap.queue = "replay", False, ours_from_ref(tap.recorded)
            tap.calls.clear()
            opt_o.zero_grad(set_to_none=True)
            logits, fused = forward(ours, train_set)
            loss_o, st_o = magnet_loss(logits, train_set.y, train_set.graph.edge_index, train_set.graph.edge_weight,
                                       fused, preset.train.kl_weight)
            loss_o.backward()
            assert not tap.queue
            ours_calls = list(tap.calls)
            if rng:
                rng["ours"] = torch.get_rng_state()
            if no_drop:
                assert all(p == 0.0 for tr, p, _ in ref_calls + tap.calls if tr), "a dropout call with p > 0"
        gd = grad_diffs(ours_p)
        if epoch == 0:
            first["dropout_calls"] = {"ref": ref_calls, "ours": ours_calls}
            first["blocks_forward"] = block_diffs()
            first["gradients"] = {k: {"max_abs_diff": v[0], "max_abs_ours": v[1]} for k, v in gd.items()}
            for h in handles:
                h.remove()
        st_c = None
        if control is not None:
            opt_c.zero_grad(set_to_none=True)
            lc, fc = forward(control, train_rev)
            loss_c, st_c = magnet_loss(lc, train_rev.y, train_rev.graph.edge_index, train_rev.graph.edge_weight, fc,
                                       preset.train.kl_weight)
            loss_c.backward()
            opt_c.step()
            sched_c.step()
        opt_r.step()
        sched_r.step()
        opt_o.step()
        sched_o.step()
        if epoch == 0:
            adam = {}
            for n, p in ref_params.items():
                sr, so = opt_r.state[p], opt_o.state[ours_p[mapping[n]]]
                adam[mapping[n]] = {"exp_avg": _maxdiff(sr["exp_avg"], so["exp_avg"]),
                                    "exp_avg_sq": _maxdiff(sr["exp_avg_sq"], so["exp_avg_sq"])}
            first["adam_state_after_step"] = {"max_exp_avg_diff": max(v["exp_avg"] for v in adam.values()),
                                              "max_exp_avg_sq_diff": max(v["exp_avg_sq"] for v in adam.values()),
                                              "per_parameter": adam}
        wd, wat = weight_diff(ours_p)
        row = {"epoch": epoch,
               "ref": {"ce": logged["train_cls_loss"], "kl": logged["train_kl_loss"],
                       "loss": logged["train_total_loss"]},
               "ours": {k: st_o[k] for k in ("ce", "kl", "loss")},
               "max_grad_diff": max(v[0] for v in gd.values()),
               "max_weight_diff": wd, "max_weight_diff_at": wat,
               "lr": [opt_r.param_groups[0]["lr"], opt_o.param_groups[0]["lr"]]}
        if control is not None:
            cp = dict(control.named_parameters())
            row["control_max_weight_diff_vs_ours"] = max(_maxdiff(p, cp[k]) for k, p in ours_p.items())
            row["control_loss"] = st_c["loss"]
        per_epoch.append(row)
        if epoch % 10 == 9:  # a partial record, for a run stopped before its end (--merge-partial)
            part = {"split": split, "mode": mode, "epochs": epochs, "epochs_done": epoch + 1, "partial": True,
                    "graphs": graph_check, "epoch0": first, "per_epoch": per_epoch,
                    "cpu_seconds": round(time.process_time() - t0, 1)}
            (args.work / f"partial-{split}-{mode}-{epochs}.json").write_text(json.dumps(part))
        if epoch < 3 or epoch % 20 == 19 or epoch == epochs - 1:
            print(json.dumps({k: row[k] for k in ("epoch", "ref", "ours", "max_grad_diff", "max_weight_diff")}),
                  file=sys.stderr, flush=True)

    # ---------------- test
    ref.eval()
    ours.eval()
    with torch.no_grad():
        out_r, graph_r, *_ = ref(batch, mode="test")
        logits_r = out_r[te_in_ref]
        logits_o, _ = forward(ours, test_set)
        y = test_set.y.numpy()
        assert np.array_equal(np.asarray(graph_r.y)[te_in_ref.numpy()], y)
        pred_r, pred_o = logits_r.argmax(1).numpy(), logits_o.argmax(1).numpy()
        test = {"n_test": int(len(y)), "max_abs_logit_diff": _maxdiff(logits_r, logits_o),
                "predictions_differ": int((pred_r != pred_o).sum()),
                "mcc_ref": float(matthews_corrcoef(y, pred_r)), "mcc_ours": float(matthews_corrcoef(y, pred_o))}
        if control is not None:
            control.eval()
            lc, _ = forward(control, test_set)
            test["control_max_abs_logit_diff_vs_ours"] = _maxdiff(lc, logits_o)
            test["control_predictions_differ_vs_ours"] = int((lc.argmax(1).numpy() != pred_o).sum())
            test["mcc_control"] = float(matthews_corrcoef(y, lc.argmax(1).numpy()))
    return {"split": split, "mode": mode, "epochs": epochs, "init_differs_before_copy": init_differs_before_copy,
            "parameters_copied": len(mapping), "n_train": len(tr_ids), "n_reference_nodes": n_ref,
            "train_edges": [int((ds.adj_mat[ds.train_mask][:, ds.train_mask] > 0).sum()), train_set.graph.num_edges],
            "graphs": graph_check, "epoch0": first, "per_epoch": per_epoch, "test": test,
            "cpu_seconds": round(time.process_time() - t0, 1), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------ driver


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="a checkout of SinaTabakhi/MAGNET")
    ap.add_argument("--reference-python", default=sys.executable, help="an interpreter with the reference's deps")
    ap.add_argument("--work", type=Path, required=True,
                    help="reference layout + dataset cache (reference_draws.py's work folder; made if absent)")
    default_data = Path(os.environ.get("MAGNET_FL_DATA", str(ROOT.parent / "shared" / "data"))) / "tcga-ov-magnet"
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--splits", default="10")
    ap.add_argument("--modes", default="off,ref_masks,our_masks")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=1, help="worker processes at a time")
    ap.add_argument("--merge-partial", action="store_true",
                    help="store the partial records of stopped workers (--splits/--modes/--epochs) and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--split", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--extra-path", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # the result goes to a file (a pipe would block a large result until the driver reads it)
        (args.work / f"result-{args.split}-{args.mode}-{args.epochs}.json").write_text(json.dumps(worker(args)))
        return
    if args.merge_partial:
        parts = []
        for s_ in args.splits.split(","):
            for m in args.modes.split(","):
                done, part = (args.work / f"{k}-{s_}-{m}-{args.epochs}.json" for k in ("result", "partial"))
                if done.exists():
                    parts.append(json.loads(done.read_text()))
                elif part.exists():
                    parts.append(json.loads(part.read_text()))
        _store(parts, [round(x, 2) for x in os.getloadavg()])
        return
    if not (args.work / "reference-data").exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from reference_side_by_side import prepare_reference_data

        prepare_reference_data(args.data, [int(s) for s in args.splits.split(",")], args.work / "reference-data")
    jobs = [(int(s), m) for s in args.splits.split(",") for m in args.modes.split(",")]
    env = {**os.environ, **ONE_THREAD,
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    load_before = [round(x, 2) for x in os.getloadavg()]
    running, results = [], []
    for split, mode in jobs:
        while len(running) >= args.parallel:
            running = _reap(running, results)
        cmd = [args.reference_python, str(Path(__file__).resolve()), "--worker", "--split", str(split), "--mode", mode,
               "--epochs", str(args.epochs), "--reference", str(args.reference), "--work", str(args.work),
               "--data", str(args.data), "--extra-path", sysconfig.get_paths()["purelib"]]
        log = open(args.work / f"trajectory-{split}-{mode}.log", "w")  # noqa: SIM115
        running.append((split, mode, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log),
                        log, time.perf_counter(), args.work / f"result-{split}-{mode}-{args.epochs}.json"))
    while running:
        running = _reap(running, results)
    _store(results, load_before)
    for r in results:
        last = r["per_epoch"][-1]
        print(f"split {r['split']} {r['mode']:9s} {r['epochs']} epochs: max weight diff {last['max_weight_diff']:.2e}, "
              f"test logits diff {r['test']['max_abs_logit_diff']:.2e}, predictions differ "
              f"{r['test']['predictions_differ']}, MCC ref {r['test']['mcc_ref']:.4f} ours {r['test']['mcc_ours']:.4f}"
              f" ({r['cpu_seconds']} CPU s)")


def _store(results: list[dict], load_before: list[float]) -> None:
    record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    record.setdefault("runs", {})
    for r in results:
        key = f"{r['split']}/{r['mode']}/{r['epochs']}" + ("/partial" if r.get("partial") else "")
        record["runs"][key] = r
    record["summary"] = {key: _summary(r) for key, r in sorted(record["runs"].items())}
    stored = json.loads(COMPARISON.read_text()).get("same_seed", {}) if COMPARISON.exists() else {}
    record["stored_same_seed_mcc"] = {k: stored.get(k) for k in ("splits", "reference_mcc", "ours_mcc")}
    record.setdefault("invocations", []).append({
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": _git_commit(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": [f"{r['split']}/{r['mode']}/{r['epochs']}" + ("/partial" if r.get("partial") else "")
                 for r in results]})
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")



def _summary(r: dict) -> dict:
    """Per run: the first epoch at which the largest weight difference exceeds 1e-6, 1e-4, 1e-2 (and the same for
    the control), the differences at the last recorded epoch, the largest loss difference, the test outcome."""
    pe = r["per_epoch"]

    def first_above(key: str, t: float):
        return next((row["epoch"] for row in pe if row.get(key, 0.0) > t), None)

    out = {"epochs_recorded": len(pe),
           "first_epoch_weight_diff_above": {str(t): first_above("max_weight_diff", t) for t in (1e-6, 1e-4, 1e-2)},
           "last_max_weight_diff": pe[-1]["max_weight_diff"],
           "max_abs_loss_diff": max(abs(row["ref"]["loss"] - row["ours"]["loss"]) for row in pe),
           "max_abs_loss_diff_first_20_epochs": max(abs(row["ref"]["loss"] - row["ours"]["loss"]) for row in pe[:20])}
    if "control_max_weight_diff_vs_ours" in pe[0]:
        out["control_first_epoch_weight_diff_above"] = {
            str(t): first_above("control_max_weight_diff_vs_ours", t) for t in (1e-6, 1e-4, 1e-2)}
        out["control_last_max_weight_diff"] = pe[-1]["control_max_weight_diff_vs_ours"]
    if "test" in r:
        out["test"] = r["test"]
    return out


def _reap(running, results):
    still = []
    for split, mode, proc, log, t0, out in running:
        if proc.poll() is None:
            still.append((split, mode, proc, log, t0, out))
            continue
        log.close()
        if proc.returncode != 0:
            raise SystemExit(f"error: worker split {split} mode {mode} failed (exit {proc.returncode}); see "
                             f"{log.name}")
        res = json.loads(out.read_text())
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
    if len(still) == len(running):
        time.sleep(2)
    return still


if __name__ == "__main__":
    main()
