"""``magnet-fl validate-site``: check a site's data against the consortium manifest before any training."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.validation import SiteReport, validate_site


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="the site's data folder (labels.csv + one matrix per modality, "
                                          "optional split.csv)")
    p.add_argument("--manifest", type=Path, required=True, help="the consortium manifest (TOML)")
    p.add_argument("--enrol", metavar="SITE_NAME", default=None,
                   help="also print this site's enrolment entry for the manifest ([sites.SITE_NAME]: patient "
                        "counts the coordinator bounds the site's replies by; counts only, no patient data)")
    p.add_argument("--policy", type=Path, default=None,
                   help="with --enrol: this site's policy file, whose preparation lines split a folder without "
                        "split.csv (the split the site will train on); without it, the default split")


def summary_table(report: SiteReport, manifest: ConsortiumManifest, title: str) -> Table:
    """Patients, class counts, per-modality availability and missingness patterns as a rich table."""
    s = report.summary
    table = Table(title=escape(title))
    table.add_column("what")
    table.add_column("patients", justify="right")
    table.add_row("used (labelled, >= 1 modality)", str(s["patients"]))
    table.add_row("labelled", str(s["labelled"]))
    for name, n in s["classes"].items():
        table.add_row(f"class {name}", str(n))
    for m in manifest.modalities:
        n = s["modalities"].get(m.name, 0)
        share = f" ({100 * n / s['patients']:.0f}%)" if s["patients"] else ""
        table.add_row(f"with {m.name}", f"{n}{share}")
    for pattern, n in s["patterns"].items():
        table.add_row(f"pattern {pattern}", str(n))
    for name, n in s.get("split", {}).items():
        table.add_row(f"split {name} (split.csv)", str(n))
    return table


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True)
    manifest = ConsortiumManifest.load(args.manifest)
    report, _ = validate_site(args.dir, manifest)
    if report.summary:
        console.print(summary_table(report, manifest, f"site {args.dir} against consortium {manifest.name!r}"))
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    for e in report.errors:
        console.print(f"[red]error:[/] {escape(e)}")
    if report.errors:
        console.print(f"[red]{len(report.errors)} problem(s) would corrupt training: fix them before joining.[/]")
        return 1
    console.print("[green]site data are consistent with the manifest[/]")
    if args.enrol:
        split = None
        if args.policy is not None:
            from .policy import load_policy

            split = load_policy(str(args.policy)).preparation.split()
        console.print(enrolment_entry(args.dir, manifest, args.enrol, split), markup=False)
    return 0


def enrolment_entry(folder: Path, manifest: ConsortiumManifest, name: str, split: dict | None = None) -> str:
    """The manifest lines that enrol this site: training/test sizes (of the split the site trains on: its
    split.csv, else ``split``, the keyword arguments of ``load_site_cohort`` from its policy, else the default
    ratios) and per-modality bounds, valid for any seed."""
    import tomli_w

    from magnet_core.cohort.validation import load_site_cohort
    from magnet_core.consortium.simulated import enrolled_site
    from magnet_core.protocol.messages import SITE_NAME

    if not SITE_NAME.match(name):
        raise ValueError(f"--enrol: site name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
                         "(starting alphanumeric)")
    facts = enrolled_site(load_site_cohort(folder, manifest, **(split or {"seed": 0})), any_seed=True)
    return "# add to the consortium manifest:\n" + tomli_w.dumps({"sites": {name: facts.model_dump()}})
