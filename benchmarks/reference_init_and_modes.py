"""Two checks, by experiment, of what the dropout-off comparison could not see (MAGNET reference vs magnet-fl).

1. Distribution of the initial weights: for N seeds, build both models and record each parameter's std and mean;
   parameters are matched by role (the graph layers' names differ: reference ``lin`` = our ``lin_src``; its
   encoders/decoder layers are indexed). Reports the mean over seeds per parameter for both codes.
2. Dropout calls: every ``torch.nn.functional.dropout`` call (``nn.Dropout`` calls it too) is recorded with its
   ``training`` flag, ``p`` and tensor shape, during one training step and during the test forward of each code
   (split 10), to see where dropout acts and which passes run in train or eval mode.

Writes key ``init_and_dropout_checks`` of ``benchmarks/results/reference_comparison.json``.

    python benchmarks/reference_init_and_modes.py --reference /path/to/MAGNET --work /tmp/href_work --seeds 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reference_draws import RESULTS, _reference_dataset, _stub_lightning  # noqa: E402

ROLE = {  # reference name -> our name
    "unimodal_encoders.0.encoder_layers.0": "encoders.mRNA.net.0", "unimodal_encoders.0.encoder_layers.3":
    "encoders.mRNA.net.3", "unimodal_encoders.1.encoder_layers.0": "encoders.miRNA.net.0",
    "unimodal_encoders.1.encoder_layers.3": "encoders.miRNA.net.3", "attention_layer.lin_proj":
    "attention.lin_proj", "attention_layer.out_proj": "attention.out_proj", "attention_layer.att_lin":
    "attention.att", "gnn_decoder.decoder_layers.0": "head_hidden", "gnn_decoder.final_layer": "head_out",
}
for i in range(2):
    for a, b in (("lin", "lin_src"), ("lin_msg", "lin_msg"), ("lin_l", "lin_l"), ("lin_r", "lin_r")):
        ROLE[f"gnn_decoder.conv_layers.{i}.{a}"] = f"convs.{i}.{b}"


def _our_name(ref_name: str) -> str:
    for a, b in sorted(ROLE.items(), key=lambda kv: -len(kv[0])):
        if ref_name == a or ref_name.startswith(a + "."):
            return b + ref_name[len(a):]
    raise KeyError(ref_name)


def reference_model(ds):
    from model.base_models import GNNDecoder, MLPEncoder, MultiHeadAttentionLayer
    from trainer.trainer import MAGNETTrainer

    dims = [ds.get_data(omics_idx=i).shape[1] for i in range(2)]
    enc = [MLPEncoder(in_dims=d, hid_dims=256, dropout_rate=0.2) for d in dims]
    return MAGNETTrainer(dataset=ds, unimodal_encoders=enc, attention_layer=MultiHeadAttentionLayer(256, 8),
                         gnn_decoder=GNNDecoder(256, 2, 2, dropout_rate=0.2, negative_slope=0.2),
                         loss_fn=torch.nn.CrossEntropyLoss(), lr=0.000212, wd=0.001)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="the work folder of reference_draws.py")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MAGNET_FL_DATA", "/work/shared/data"))
                    / "tcga-ov-magnet")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.reference))
    _stub_lightning()
    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from magnet_core.model.network import build_model
    from magnet_core.model.train import predict_proba, split_sets

    ds = _reference_dataset(args.reference, args.work / "reference-data", 10, args.work)
    cohort = load_for_seed(args.data, 10, log=lambda *a, **k: None)
    preset = get_preset("ov")
    in_dims = {m: int(cohort.X[m].shape[1]) for m in cohort.modalities}

    # 1. initial-weight distribution
    stats: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        ref = reference_model(ds)
        ours = build_model(in_dims, 2, preset.model, seed)
        ours_p = dict(ours.named_parameters())
        for name, p in ref.named_parameters():
            q = ours_p[_our_name(name)]
            assert p.shape == q.shape, (name, p.shape, q.shape)
            s = stats.setdefault(name, {"ref_std": [], "ours_std": [], "ref_mean": [], "ours_mean": []})
            s["ref_std"].append(float(p.detach().std()) if p.numel() > 1 else 0.0)
            s["ours_std"].append(float(q.detach().std()) if q.numel() > 1 else 0.0)
            s["ref_mean"].append(float(p.detach().mean()))
            s["ours_mean"].append(float(q.detach().mean()))
    init = {}
    for name, s in stats.items():
        rs, os_ = np.array(s["ref_std"]), np.array(s["ours_std"])
        init[name] = {"ours_name": _our_name(name), "ref_std_mean": float(rs.mean()),
                      "ours_std_mean": float(os_.mean()),
                      "std_ratio_ours_over_ref": float(os_.mean() / rs.mean()) if rs.mean() > 0 else None,
                      "ref_mean_mean": float(np.mean(s["ref_mean"])),
                      "ours_mean_mean": float(np.mean(s["ours_mean"]))}
    ratios = [v["std_ratio_ours_over_ref"] for v in init.values() if v["std_ratio_ours_over_ref"] is not None]

    # 2. dropout calls in one training step and in the test forward
    calls: list[tuple] = []
    real = F.dropout

    def spy(input, p=0.5, training=True, inplace=False):
        calls.append((bool(training), float(p), list(input.shape)))
        return real(input, p, training, inplace)

    F.dropout = spy
    torch.nn.modules.dropout.F.dropout = spy
    try:
        torch.manual_seed(10)
        ref = reference_model(ds)
        batch = ds[0]
        ref.train()
        calls.clear()
        ref.training_step(batch, 0).backward()
        ref_train = list(calls)
        ref.eval()
        calls.clear()
        with torch.no_grad():
            ref.test_step(batch, 0)
        ref_test = list(calls)

        train_set, test_set = split_sets(cohort, preset.graph.sparsity, "dense")
        ours = build_model(in_dims, 2, preset.model, 10)
        from magnet_core.model.train import _step, make_optimizer

        opt, _ = make_optimizer(ours, preset.train)
        ours.train()
        calls.clear()
        _step(ours, train_set, preset.train, opt)
        ours_train = list(calls)
        calls.clear()
        predict_proba(ours, test_set)
        ours_test = list(calls)
    finally:
        F.dropout = real
        torch.nn.modules.dropout.F.dropout = real

    record = {
        "init_seeds": args.seeds,
        "init_max_abs_log_std_ratio": float(np.max(np.abs(np.log(ratios)))),
        "init_per_parameter": init,
        "dropout_calls": {"reference_training_step": ref_train, "reference_test": ref_test,
                          "ours_training_step": ours_train, "ours_test": ours_test,
                          "n_train_reference": int(ds.train_mask.sum()), "n_test_reference": int(ds.test_mask.sum()),
                          "n_train_ours": train_set.n, "n_test_ours": test_set.n},
        "test_labels_equal": sorted(ds.labels.values[ds.test_mask.numpy()].ravel().tolist())
        == sorted(test_set.y.tolist()),
    }
    d = json.loads(RESULTS.read_text())
    d["init_and_dropout_checks"] = record
    RESULTS.write_text(json.dumps(d, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "init_per_parameter"}, indent=1))
    for name, v in init.items():
        print(f"{name:50s} ref std {v['ref_std_mean']:.5f} ours {v['ours_std_mean']:.5f}")


if __name__ == "__main__":
    main()
