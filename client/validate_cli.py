"""``magnet-fl validate-site``: check a site's data against the consortium manifest before any training."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from magnet_core.manifest import ConsortiumManifest

from magnet_core.site_validation import SiteReport, validate_site


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="the site's data folder (labels.csv + one matrix per modality, "
                                          "optional split.csv)")
    p.add_argument("--manifest", type=Path, required=True, help="the consortium manifest (TOML)")


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
    return 0
