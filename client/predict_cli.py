"""``magnet-fl predict``: score new patients at a site with a verified consortium model package."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.artefacts.model_package import ModelPackage, PackageError, PackageStamp, read_package, require_identity
from magnet_core.cohort import tables
from magnet_core.cohort.data import (
    LABEL_FILE_RE,
    MODALITY_SUFFIXES,
    Cohort,
    DataError,
    load_magnet_split,
    read_modality,
)
from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.validation import load_site_cohort, manifest_fill_values
from magnet_core.model.graph_topk import DENSE_MAX_PATIENTS
from magnet_core.model.inductive import AttachRule, Reference, default_attach_rule, predict_new
from magnet_core.model.metrics import confusion_counts, metrics_from_confusion

from .private_files import open_to_others, write_private

PROGRESS_FROM = 2000  # show a progress bar from this many patients on


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--package", type=Path, required=True, help="the consortium's signed model package")
    p.add_argument("--ca", type=Path, required=True, help="the consortium CA certificate (ca.crt of the site bundle)")
    p.add_argument("--reference", type=Path, required=True,
                   help="this site's prepared data folder (as validate-site reads it, or a MAGNET split seed folder): "
                        "its training patients are the reference patients new patients are attached to")
    p.add_argument("--patients", type=Path, required=True,
                   help="new patients: a folder of per-modality tables <modality>.csv[.gz] (any subset of the "
                        "modalities), one such file, or a prepared site folder (use --split to pick patients)")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV with one row per patient (written 0600; missing folders are made 0700)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    p.add_argument("--require-run", metavar="RUN",
                   help="refuse a package that is not from this run (the run its metadata names)")
    p.add_argument("--require-round", type=int, metavar="N", help="refuse a package that is not from round N")
    p.add_argument("--require-latest", type=Path, metavar="RECORD",
                   help="refuse a package older than the newest this site used (written earlier, or an earlier "
                        "round of the same run), as kept in RECORD (JSON, 0600; created at the first use), and "
                        "record this one")
    p.add_argument("--manifest", type=Path, help="this site's manifest; the package must have been trained for it")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="score only the patients of this split of a labelled --patients folder (e.g. test)")
    p.add_argument("--policy", type=Path, help="this site's policy file: its preparation lines (split seed, ratios, "
                                              "split.csv rule) give the split the site trained with, as its site "
                                              "worker applied them")
    p.add_argument("--seed", type=int, help="split seed of a site without split.csv and without --policy (default: "
                                            "the package's run seed, the split of a site that ran without a policy)")
    p.add_argument("--attach", choices=("auto", "quantile", "topk"), default="auto",
                   help="how new patients are linked to reference patients: quantile (MAGNET's rule with the "
                        "reference graph's threshold), topk (--k most similar); auto = quantile up to "
                        f"{DENSE_MAX_PATIENTS} reference patients, topk above (as training builds graphs)")
    p.add_argument("--k", type=int, default=10, help="reference neighbours per patient for --attach topk")
    p.add_argument("--link-new", action="store_true",
                   help="also link the new patients among themselves (then a prediction depends on the batch)")
    p.add_argument("--batch-size", type=int, default=512, help="patients scored at a time (without --link-new)")


@dataclasses.dataclass
class NewPatients:
    """Patients to score, in the package manifest's modality order and feature order."""

    ids: np.ndarray
    X: dict[str, np.ndarray]
    mask: np.ndarray
    labels: np.ndarray | None = None  # true class index, when the input has labels


def _is_magnet_split(folder: Path) -> bool:
    return folder.is_dir() and any(LABEL_FILE_RE.match(p.name) for p in folder.iterdir())


def _has_labels(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f"labels{s}").exists() for s in MODALITY_SUFFIXES)


def align_to_manifest(cohort: Cohort, manifest: ConsortiumManifest, source: Path) -> Cohort:
    """A cohort read by modality name, re-ordered to the manifest's modalities and features."""
    X, mask = {}, np.zeros((cohort.n, len(manifest.modalities)), dtype=bool)
    for j, spec in enumerate(manifest.modalities):
        if spec.name not in cohort.modalities:
            X[spec.name] = np.zeros((cohort.n, len(spec.features)), np.float32)
            continue
        have = cohort.features[spec.name]
        pos = {f: i for i, f in enumerate(have)}
        lacking = [f for f in spec.features if f not in pos]
        if lacking:
            raise DataError(f"{source}: modality {spec.name!r} lacks {len(lacking)} feature(s) of the package's "
                            f"manifest, e.g. {lacking[:5]} (the package was trained on other features)")
        X[spec.name] = cohort.X[spec.name][:, [pos[f] for f in spec.features]]
        mask[:, j] = cohort.mask[:, cohort.modalities.index(spec.name)]
    return dataclasses.replace(cohort, modalities=[s.name for s in manifest.modalities],
                               features={s.name: list(s.features) for s in manifest.modalities}, X=X, mask=mask,
                               paired=mask.all(axis=1))


def site_split_rule(args: argparse.Namespace, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """How a labelled site folder is split: by the site's policy (``--policy``; ``--seed`` cannot override it), by
    ``--seed``, or by the package's run seed (a site that ran without a policy split by it)."""
    if args.policy is not None:
        from .policy import load_policy

        if args.seed is not None:
            raise ValueError("--seed and --policy both name the split: the policy's preparation lines are the split "
                             "the site trained with; pass one of them")
        return load_policy(str(args.policy)).preparation.split()
    return dict(seed=args.seed if args.seed is not None else int(run_config.get("seed", 0)))


def load_labelled(folder: Path, manifest: ConsortiumManifest, split_rule: Mapping[str, Any]) -> Cohort:
    """A site folder (labels.csv, validated like validate-site; split by ``split_rule``, the keyword arguments of
    ``load_site_cohort``) or a MAGNET split seed folder, in manifest order."""
    if _has_labels(folder):
        return load_site_cohort(folder, manifest, **split_rule)
    if _is_magnet_split(folder):
        if not folder.name.isdigit():
            raise DataError(f"{folder}: a MAGNET split folder must be named by its seed (e.g. .../10)")
        names = [s.name for s in manifest.modalities]
        present = [m for m in names if any((folder / f"{m}{s}").exists() for s in MODALITY_SUFFIXES)]
        if not present:
            raise DataError(f"{folder}: none of the package's modalities {names} has a file here")
        cohort = load_magnet_split(folder.parent, int(folder.name), modalities=present, log=lambda *a, **k: None,
                                   limits=manifest.input_limits)
        return align_to_manifest(cohort, manifest, folder)
    raise DataError(f"{folder}: not a site folder (labels.csv + one file per modality) nor a MAGNET split folder")


def load_reference(folder: Path, manifest: ConsortiumManifest, split_rule: Mapping[str, Any]) -> Cohort:
    """The site's reference patients: its training patients (train + val) with the split it trained with."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory (--reference is the site's prepared data folder)")
    return reference_patients(load_labelled(folder, manifest, split_rule), folder)


def reference_patients(cohort: Cohort, source: Path | str = "site") -> Cohort:
    """A site's reference patients: its training patients (train + val, in cohort order, as training uses them)."""
    train = cohort.split_indices("train", "val")
    if len(train) == 0:
        raise DataError(f"{source}: no training patients to attach new patients to")
    return cohort.subset(train)


def split_patients(cohort: Cohort, split: str | None = None) -> NewPatients:
    """A labelled cohort's patients (optionally one split) as patients to score."""
    if split is not None:
        cohort = cohort.subset(cohort.split_indices(split))
    return NewPatients(cohort.sample_ids, cohort.X, cohort.mask, cohort.labels)


def _modality_of(path: Path) -> str | None:
    for suffix in MODALITY_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def read_tables(paths: list[Path], manifest: ConsortiumManifest, log) -> NewPatients:
    """Per-modality tables (samples x features, first column the sample id) in the manifest's feature order.

    Columns are matched by name (their order does not matter); manifest features a table lacks are an error unless
    the manifest allows imputation; extra columns are ignored with a note."""
    names = [s.name for s in manifest.modalities]
    frames: dict[str, pd.DataFrame] = {}
    for path in paths:
        m = _modality_of(path)
        if m not in names:
            raise DataError(f"{path}: the file name must be <modality>.csv[.gz] with modality one of {names} "
                            f"(the package's manifest)")
        if m in frames:
            raise DataError(f"{path}: modality {m!r} is given twice")
        frame = read_modality(path, manifest.input_limits)
        spec = manifest.modality(m)
        lacking = [f for f in spec.features if f not in frame.columns]
        if lacking:
            where = [f"{f!r}" for f in lacking[:5]]
            msg = (f"{path}: {len(lacking)} of the {len(spec.features)} {m} features the model expects are not "
                   f"columns of this file, e.g. {', '.join(where)}")
            if manifest.missing_feature == "impute" and spec.impute_means is not None:
                log(f"note: {msg}; filled with the consortium mean, as the manifest allows")
            else:
                raise DataError(msg + " (write the manifest's features as columns; names must match exactly)")
        extra = [c for c in frame.columns if c not in set(spec.features)]
        if extra:
            log(f"note: {path}: {len(extra)} column(s) are not {m} features of the model and are ignored, "
                f"e.g. {extra[:3]}")
        x = frame.reindex(columns=spec.features).to_numpy(dtype=np.float64)
        frames[m] = pd.DataFrame(np.where(np.isnan(x), manifest_fill_values(spec), x), index=frame.index)
    if not frames:
        raise DataError(f"no modality table given (expected files named {', '.join(n + '.csv' for n in names)})")
    ids = list(dict.fromkeys(i for f in frames.values() for i in f.index))
    X, mask = {}, np.zeros((len(ids), len(names)), dtype=bool)
    for j, spec in enumerate(manifest.modalities):
        if spec.name in frames:
            f = frames[spec.name]
            mask[:, j] = pd.Index(ids).isin(f.index)
            X[spec.name] = np.nan_to_num(f.reindex(ids).to_numpy(dtype=np.float32), nan=0.0)
        else:
            X[spec.name] = np.zeros((len(ids), len(spec.features)), np.float32)
    return NewPatients(np.asarray(ids, dtype=str), X, mask)


def load_patients(path: Path, manifest: ConsortiumManifest, split_rule: Mapping[str, Any], split: str | None,
                  log) -> NewPatients:
    """New patients from a labelled site/split folder (optionally one split), a folder of tables, or one table."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir() and (_has_labels(path) or _is_magnet_split(path)):
        cohort = load_labelled(path, manifest, split_rule)
        unscored = _labelled_without_data(path, cohort, manifest)
        if unscored:
            log(f"note: {len(unscored)} labelled patient(s) of {path} have no value for any modality and are not "
                f"scored: {', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}")
        return split_patients(cohort, split)
    if split is not None:
        raise DataError(f"{path}: --split needs a labelled folder (labels.csv and split.csv, or a MAGNET split)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _modality_of(p) is not None)
        if not files:
            raise DataError(f"{path}: no table named <modality>.csv[.gz] for the modalities "
                            f"{[s.name for s in manifest.modalities]}")
        return read_tables(files, manifest, log)
    return read_tables([path], manifest, log)


def _labelled_without_data(folder: Path, cohort: Cohort, manifest: ConsortiumManifest) -> list[str]:
    """Ids in the folder's labels.csv that the loaded cohort does not hold (no modality: nothing to score); the file
    is read again through the one bounded reader, within the manifest's input limits."""
    label_file = next((folder / f"labels{s}" for s in MODALITY_SUFFIXES if (folder / f"labels{s}").exists()), None)
    if label_file is None:
        return []
    ids = tables.read_table(label_file, manifest.input_limits).index
    return sorted(set(ids) - {"", "nan"} - set(cohort.sample_ids.tolist()))


def predictions_frame(pkg: ModelPackage, patients: NewPatients, probs: np.ndarray, neighbours: np.ndarray,
                      lonely: np.ndarray) -> pd.DataFrame:
    """One row per patient: id, predicted class, class probabilities, modalities used, flags."""
    classes = pkg.metadata.classes
    names = [s.name for s in pkg.manifest.modalities]
    out = pd.DataFrame({"sample_id": patients.ids,
                        "predicted_class": [classes[k] for k in probs.argmax(axis=1)]})
    for k, c in enumerate(classes):
        out[f"prob_{c}"] = probs[:, k]
    out["modalities_used"] = ["+".join(m for m, h in zip(names, row) if h) for row in patients.mask]
    out["reference_neighbours"] = neighbours
    out["no_shared_modality"] = lonely
    if patients.labels is not None:
        out["true_class"] = [classes[k] for k in patients.labels]
    return out


def attach_rule(attach: str, k: int = 10, link_new: bool = False, n_reference: int = 0) -> AttachRule:
    """The --attach choice as a rule: "auto" = the rule evaluation uses for this many reference patients
    (:func:`magnet_core.model.inductive.default_attach_rule`)."""
    if attach == "auto":
        return default_attach_rule(n_reference, k).model_copy(update={"link_new": link_new})
    return AttachRule(rule=attach, k=k, link_new=link_new)


@dataclasses.dataclass
class Scored:
    """Probabilities of scored patients and how they were placed (see :class:`InductivePrediction`)."""

    probs: np.ndarray
    reference_neighbours: np.ndarray
    no_shared_modality: np.ndarray
    rule: str


def score_patients(pkg: ModelPackage, ref: Cohort, patients: NewPatients, rule: AttachRule, batch_size: int = 512,
                   log=lambda text: None, console: Console | None = None) -> Scored:
    """Score ``patients`` with a verified package, attached to the site's reference patients ``ref`` (its
    training patients, in the manifest's modality order) by ``rule``: what `magnet-fl predict` writes."""
    meta = pkg.metadata
    model = pkg.build_model()
    names = [s.name for s in pkg.manifest.modalities]
    reference = Reference.build([ref.X[m] for m in names], ref.mask, meta.graph.sparsity, ref.sample_ids)
    overlap = np.isin(patients.ids, ref.sample_ids)
    if overlap.any():
        log(f"note: {int(overlap.sum())} patient(s) are also reference (training) patients of this site; each is "
            f"scored without a link to its own reference copy")
    n = len(patients.ids)
    xs = [patients.X[m] for m in names]
    if n >= PROGRESS_FROM:
        columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console or Console(stderr=True)) as bar:
            task = bar.add_task("scoring", total=n)
            pred = predict_new(model, reference, xs, patients.mask, rule, patients.ids, batch_size,
                               on_batch=lambda done: bar.update(task, completed=done))
    else:
        pred = predict_new(model, reference, xs, patients.mask, rule, patients.ids, batch_size)
    return Scored(pred.probs, pred.reference_neighbours, pred.no_shared_modality, rule.rule)


def used_packages(record: Path) -> list[PackageStamp]:
    """The packages this site scored with, as ``--require-latest`` keeps them (absent file: none)."""
    if not record.exists():
        return []
    try:
        return [PackageStamp.model_validate(e) for e in json.loads(record.read_text())]
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{record}: not this site's record of used packages ({str(exc).splitlines()[0]})") \
            from None


def newest(stamps: list[PackageStamp]) -> PackageStamp | None:
    """The most recently written package (latest round among equals)."""
    return max(stamps, key=lambda s: (dt.datetime.fromisoformat(s.created), s.round or 0), default=None)


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True, stderr=True)
    log = lambda text: console.print(escape(text))  # noqa: E731
    if os.path.lexists(args.out) and not args.overwrite:  # before any work; checked again when writing
        raise FileExistsError(f"{args.out} exists; refusing to overwrite it (pass --overwrite to replace it)")
    site_manifest = ConsortiumManifest.load(args.manifest) if args.manifest else None
    pkg = read_package(args.package, ca_cert=args.ca, manifest=site_manifest)
    meta = pkg.metadata
    used = used_packages(args.require_latest) if args.require_latest else []
    require_identity(meta, args.require_run, args.require_round, newest(used))
    stamp = PackageStamp.of(meta, hashlib.sha256(Path(args.package).read_bytes()).hexdigest())
    log(f"package {args.package}: {meta.method} model, signed by {pkg.signer!r} (verified against {args.ca}); "
        f"{stamp.describe()}; run settings {meta.run_fingerprint[:12]}")
    split_rule = site_split_rule(args, meta.run_config)
    unsplit = [f for f in (args.reference, args.patients) if f.is_dir() and _has_labels(f)
               and not (f / "split.csv").exists()]
    if args.policy is None and unsplit:
        log(f"note: {', '.join(map(str, unsplit))} has no split.csv: split by seed {split_rule['seed']} "
            "(--seed, else the package's run seed); a site that trained under a policy trained on its policy's "
            "split: pass --policy")
    pkg.build_model()  # the weights must fit the described model before any data is read
    ref = load_reference(args.reference, pkg.manifest, split_rule)
    patients = load_patients(args.patients, pkg.manifest, split_rule, args.split, log)
    if len(patients.ids) == 0:
        raise DataError(f"{args.patients}: no patient to score" + (f" in split {args.split!r}" if args.split else ""))
    no_data = ~patients.mask.any(axis=1)
    if no_data.any():
        raise DataError(f"{args.patients}: {int(no_data.sum())} patient(s) have no value for any modality, e.g. "
                        f"{list(patients.ids[no_data][:5])}")
    pred = score_patients(pkg, ref, patients, attach_rule(args.attach, args.k, args.link_new, ref.n),
                          args.batch_size, log, console)
    frame = predictions_frame(pkg, patients, pred.probs, pred.reference_neighbours, pred.no_shared_modality)
    try:  # patient-level: 0600, new folders 0700
        write_private(args.out, frame.to_csv(index=False, float_format="%.6g").encode(), overwrite=args.overwrite)
    except FileExistsError:
        raise FileExistsError(f"{args.out} exists; refusing to overwrite it (pass --overwrite to replace it)") \
            from None
    if open_to_others(args.out.parent):
        log(f"note: {args.out} is readable by this user only, but its folder {args.out.parent} is open to others "
            f"(they see the file's name); keep patient-level outputs in a folder only you can open (chmod 700)")
    if args.require_latest and stamp not in used:
        write_private(args.require_latest, json.dumps([e.model_dump() for e in [*used, stamp]], indent=1).encode())
    counts = frame["predicted_class"].value_counts().reindex(meta.classes, fill_value=0)
    n = len(patients.ids)
    log(f"{n} patient(s) scored against {ref.n} reference patients ({pred.rule} rule): "
        + ", ".join(f"{c} {k}" for c, k in counts.items()) + f" -> {args.out}")
    if pred.no_shared_modality.any():
        console.print(f"[yellow]warning:[/] {int(pred.no_shared_modality.sum())} patient(s) share no modality with "
                      f"any reference patient: scored from their own data alone (column no_shared_modality)")
    if patients.labels is not None:
        cm = confusion_counts(patients.labels, pred.probs.argmax(axis=1), len(meta.classes))
        m = metrics_from_confusion(cm)
        log(f"these patients have labels: accuracy {m['acc']:.3f}, MCC {m['mcc']:.3f}, F1 {m['f1']:.3f}")
    return 0
