"""``magnet-fl prepare``: raw site matrices -> consortium-ready cohorts + manifest, in-process or through Flower."""

from __future__ import annotations

import argparse
from pathlib import Path

import tomllib

from magnet_core.cohort.data import DataError
from magnet_core.cohort.manifest import DEFAULT_SEED

from .cli import existing_dir, positive_int
from .outputs import check_output, relocate_paths, run_staged
from .reporting import console

# command-line flag -> PrepareConfig field (a flag given on the command line overrides --config)
_FIELDS = {"name": "name", "seed": "seed", "n_features": "n_features", "max_missing": "max_missing_fraction",
           "variance_ddof": "variance_ddof", "missing_feature": "missing_feature", "orientation": "orientation",
           "label_column": "label_column", "max_absent_features": "max_absent_features"}


def _pairs(kind):
    def parse(text: str) -> dict:
        try:
            return {k.strip(): kind(v) for k, v in (p.split("=", 1) for p in text.split(",") if p.strip())}
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MODALITY=VALUE[,MODALITY=VALUE...], got {text!r}") from None
    return parse


def _ranges(text: str) -> dict:
    try:
        out = {}
        for part in (p for p in text.split(",") if p.strip()):
            name, _, rng = part.partition("=")
            low, high = rng.split(":")
            out[name.strip()] = (float(low), float(high))
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODALITY=LOW:HIGH[,MODALITY=LOW:HIGH...], got {text!r}") from None


def _modality_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--modality expects NAME=FILE, got {text!r}")
    return name.strip(), Path(path.strip()).expanduser()


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("sites (repeat --site for a consortium; or one site from explicit files)")
    src.add_argument("--site", dest="sites", type=existing_dir, action="append", default=[],
                     help="raw site folder: labels.csv + one matrix per modality (CSV/TSV, optionally .gz, either "
                          "orientation) + optional split.csv (train/val/test)")
    src.add_argument("--labels", type=Path, help="labels file of a site given by explicit files")
    src.add_argument("--modality", type=_modality_file, action="append", default=[], metavar="NAME=FILE",
                     help="a raw matrix of that site (repeat per modality)")
    src.add_argument("--split-file", type=Path, help="that site's split file (default: seeded stratified split)")
    src.add_argument("--site-name", default=None, help="that site's name (default: the labels file's folder)")
    p.add_argument("--out", type=Path, required=True,
                   help="writes manifest.toml, prepare_report.json, decisions/ and one prepared folder per site")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the previous preparation in --out as a whole (no stale site folders remain; "
                        "default: refuse a folder that holds results)")
    p.add_argument("--federated", action="store_true",
                   help="run the statistics protocol through Flower's simulation engine (one SuperNode per site); "
                        "default: the same ServerApp/ClientApp code in this process")
    t = p.add_argument_group("thresholds (defaults: MAGNET's; a flag overrides --config)")
    t.add_argument("--config", type=Path, help="TOML file of PrepareConfig fields")
    t.add_argument("--name", default=None, help="consortium name in the manifest")
    t.add_argument("--classes", default=None, help="comma-separated class names (text labels map to their index)")
    t.add_argument("--seed", type=int, default=None,
                   help=f"seed of each site's 70/10/20 split (default {DEFAULT_SEED})")
    t.add_argument("--n-features", type=positive_int, default=None,
                   help="features kept per modality by ANOVA F (1000)")
    t.add_argument("--features-per-modality", type=_pairs(int), default=None, metavar="M=K,...",
                   help="per-modality override of --n-features")
    t.add_argument("--max-missing", type=float, default=None, help="drop features missing in more patients (0.1)")
    t.add_argument("--max-absent-features", type=float, default=None,
                   help="refuse a site lacking more than this share of a modality's kept features (0.1; manifest)")
    t.add_argument("--variance-threshold", type=_pairs(float), default=None, metavar="M=V,...",
                   help="per modality minimum scaled variance, e.g. DNA=0.04,mRNA=0.03 (constant features are "
                        "always dropped)")
    t.add_argument("--variance-ddof", type=int, choices=(0, 1), default=None)
    t.add_argument("--missing-feature", choices=("impute", "error"), default=None,
                   help="a site lacking a kept feature: fill it with the consortium mean, or refuse (manifest)")
    t.add_argument("--orientation", choices=("auto", "samples-x-features", "features-x-samples"), default=None)
    t.add_argument("--label-column", default=None)
    t.add_argument("--no-split-file", action="store_true", help="ignore sites' split.csv; split by --seed")
    t.add_argument("--clip", action="store_true", help="clip scaled test values to [0, 1]")
    t.add_argument("--min-count", type=int, default=None,
                   help="k: sites release statistics only of classes / cells with >= k training patients (5)")
    t.add_argument("--value-range", type=_ranges, default=None, metavar="M=LOW:HIGH,...",
                   help="declared raw value range per modality; --federated scales with it (sites never send "
                        "per-feature minima / maxima); needed for every modality with --federated")
    t.add_argument("--secagg", action="store_true",
                   help="with --federated: the sites' statistics go through secure aggregation (masked sums)")
    t.add_argument("--secagg-roster", type=Path, default=None, metavar="FILE",
                   help="with --federated --secagg: authenticated secure sum: every site signs its keys with its "
                        "enrolled identity (--site-key) and every advert is checked against this consortium roster "
                        "(registered_sites.csv from `magnet-fl pki`, or a TOML [sites] table); a substituted key "
                        "is refused by the site it targets")
    t.add_argument("--site-key", type=_named_file, action="append", default=[], metavar="NAME=FILE",
                   help="with --secagg-roster: a site's identity private key (its node_auth_key), one per site "
                        "(here one party holds every site's data and keys; in a deployment each site's worker holds "
                        "its own: `deploy supernode --worker --secagg-roster`)")
    p.add_argument("--verbose", action="store_true", help="Flower's logs")


def _named_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--site-key expects NAME=FILE, got {text!r}")
    return name.strip(), Path(path.strip()).expanduser()


def secagg_sites(args: argparse.Namespace, specs) -> tuple[str, dict[int, dict]]:
    """With --secagg-roster: the roster's path and, per partition (the order of ``specs``), the node config of
    that simulated site's identity (its own copy of the roster and its key); ("", {}) without. A clear DataError
    naming the file and what is wrong for a roster that does not load, a site it does not list, a site without
    --site-key or whose key is not the roster's."""
    if args.secagg_roster is None:
        if args.site_key:
            raise DataError("--site-key is a site's identity for an authenticated secure sum: give --secagg-roster")
        return "", {}
    if not (args.federated and args.secagg):
        raise DataError("--secagg-roster authenticates the secure sum of a --federated --secagg preparation; add "
                        "--federated --secagg")
    from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity
    from magnet_core.protocol.keys import NODE_SECAGG_IDENTITY_KEY, NODE_SECAGG_ROSTER
    from magnet_core.protocol.secagg import SecAggError

    path = args.secagg_roster.resolve()
    try:
        roster = Roster.from_file(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"--secagg-roster {path}: {str(exc).removeprefix(f'{path}: ')}") from None
    keys: dict[str, Path] = {}
    for name, key in args.site_key:
        if name in keys:
            raise DataError(f"--site-key {name}: given twice")
        keys[name] = key.resolve()
    names = [s.name for s in specs]
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise DataError(f"--site-key {unknown[0]}: no site of this preparation is named {unknown[0]!r} "
                        f"(sites: {', '.join(names)})")
    nodes = {}
    for pid, name in enumerate(names):
        if name not in roster.sites:
            raise DataError(f"--secagg-roster {path}: site {name!r} is not listed (it lists "
                            f"{', '.join(sorted(roster.sites))})")
        if name not in keys:
            raise DataError(f"site {name!r} has no identity key for the authenticated secure sum: give --site-key "
                            f"{name}=FILE (its node_auth_key)")
        try:
            SiteAuth(SiteIdentity.from_key_file(name, keys[name]), roster)
        except (OSError, ValueError, SecAggError) as exc:
            raise DataError(f"--site-key {name}={keys[name]}: {exc}") from None
        nodes[pid] = {NODE_SECAGG_ROSTER: str(path), NODE_SECAGG_IDENTITY_KEY: str(keys[name])}
    return str(path), nodes


def build_config(args: argparse.Namespace):
    from magnet_core.cohort.preprocess import PrepareConfig

    values: dict = {}
    if args.config is not None:
        try:
            values = tomllib.loads(args.config.read_text())
        except FileNotFoundError:
            raise DataError(f"{args.config}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise DataError(f"{args.config}: not valid TOML ({exc})") from None
    for flag, field in _FIELDS.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.classes is not None:
        values["class_names"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.features_per_modality is not None:
        values["n_features_per_modality"] = args.features_per_modality
    if args.variance_threshold is not None:
        values["variance_threshold"] = args.variance_threshold
    if args.no_split_file:
        values["use_split_file"] = False
    if args.clip:
        values["clip"] = True
    if args.min_count is not None:
        values["min_count"] = args.min_count
    if args.value_range is not None:
        values["value_ranges"] = {**values.get("value_ranges", {}), **args.value_range}
    if args.secagg and not args.federated:
        raise DataError("--secagg secures the sites' statistics in a --federated preparation; add --federated")
    return PrepareConfig.model_validate(values)


def build_sites(args: argparse.Namespace):
    from magnet_core.cohort.preprocess import SiteSpec

    from .prepare_federated import site_specs

    specs = site_specs(args.sites, args.out)
    if args.labels is not None or args.modality:
        if args.labels is None or not args.modality:
            raise DataError("a site from explicit files needs --labels and at least one --modality NAME=FILE")
        for path in [args.labels, *(p for _, p in args.modality), *([args.split_file] if args.split_file else [])]:
            if not path.is_file():
                raise DataError(f"{path}: file not found")
        name = args.site_name or args.labels.resolve().parent.name
        if name in {s.name for s in specs}:
            raise DataError(f"two sites are named {name!r}; give --site-name")
        specs.append(SiteSpec(name=name, out_dir=str(args.out / name), labels=str(args.labels),
                              modalities={m: str(p) for m, p in args.modality},
                              split=str(args.split_file) if args.split_file else None))
    elif args.split_file is not None or args.site_name is not None:
        raise DataError("--split-file and --site-name describe a site given by --labels/--modality")
    if not specs:
        raise DataError("no site: give --site FOLDER (repeatable) or --labels FILE --modality NAME=FILE")
    return specs


def run(args: argparse.Namespace) -> int:
    """Check the arguments, the output folder and every site's raw files (one line naming the file on the first
    problem), then run the preparation into a staging folder that replaces ``--out`` only when every site was
    prepared (a refused site or a failure leaves the previous preparation as it was)."""
    cfg = build_config(args)
    check_output(args.out, args.overwrite)
    specs = build_sites(args)
    secagg_sites(args, specs)  # a bad roster or key stops here too
    for spec in specs:  # the door: unreadable or malformed raw data stop here, before any work
        spec.load(cfg, log=lambda *_: None)
    return run_staged(args, "prepare", lambda inner: _prepare(inner, cfg), relocate=("prepare_report.json",))


def _prepare(args: argparse.Namespace, cfg) -> int:
    from rich.table import Table

    from .prepare_federated import make_run, run_flower, run_inprocess

    # without --federated one party holds every site's data: observed minima / maxima may be used
    specs = build_sites(args)
    roster, nodes = secagg_sites(args, specs)
    run_ = make_run(specs, args.out, cfg, observed_ranges=not args.federated, secagg=args.secagg,
                    secagg_roster=roster)
    summary = run_flower(run_, verbose=args.verbose, node_configs=nodes) if args.federated else run_inprocess(run_)
    summary = relocate_paths(summary, args.out, args.out_final)
    table = Table(title=f"consortium preprocessing ({len(run_.sites)} site(s), training patients only)")
    for col in ("modality", "features in", "> missing", "low variance", "below top-k F", "kept", "training patients"):
        table.add_column(col)
    for m, r in summary["modalities"].items():
        table.add_row(m, str(r["features_in"]), str(r["dropped_missing"]), str(r["dropped_variance"]),
                      str(r["dropped_f"]), str(r["features"]), str(r["training_patients"]))
    console.print(table)
    for site in summary["sites"]:
        prepared = site.get("prepared")
        if prepared is None:
            continue
        for m, info in prepared.items():
            if not isinstance(info, dict):
                continue
            if info.get("absent"):
                console.print(f"{site['site']}: no {m} matrix (modality absent at this site, allowed)")
            elif info.get("lacking_features"):
                console.print(f"[yellow]{site['site']}: {m} lacks {len(info['lacking_features'])} consortium "
                              f"feature(s), filled with the consortium mean (missing_feature = 'impute'): "
                              f"{', '.join(info['lacking_features'][:5])}[/]")
        console.print(f"{site['site']}: {site['patients']} patients ({site['training_patients']} training) -> "
                      f"{prepared['out_dir']}")
    for name, reason in summary["refused"].items():
        console.print(f"[red]{name}: not prepared: {reason}[/]")
    if summary["refused"]:
        console.print(f"[red]{len(summary['refused'])} site(s) refused: nothing written to {args.out_final}[/]")
        return 2
    sa = summary.get("secure_aggregation") or {}
    if sa:
        signed = ", authenticated (signed keys checked against the roster)" if sa.get("authenticated") else ""
        console.print(f"secure sum of the statistics over {len(sa.get('sites', []))} site(s){signed}")
    console.print(f"manifest: {summary['manifest']} ({summary['wall_seconds']:.1f} s)")
    return 0
