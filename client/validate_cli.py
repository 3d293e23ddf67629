"""``magnet-fl validate-site``: check a site's data against the consortium manifest before any training."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from magnet_core.manifest import ConsortiumManifest

from .site_validation import validate_site


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="the site's data folder (labels.csv + one matrix per modality)")
    p.add_argument("--manifest", type=Path, required=True, help="the consortium manifest (TOML)")


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    manifest = ConsortiumManifest.load(args.manifest)
    report, _ = validate_site(args.dir, manifest)
    s = report.summary
    if s:
        table = Table(title=f"site {args.dir} against consortium {manifest.name!r}")
        table.add_column("what")
        table.add_column("value")
        table.add_row("patients", str(s["patients"]))
        table.add_row("classes", ", ".join(f"{k}: {v}" for k, v in s["classes"].items()))
        for m in manifest.modalities:
            table.add_row(f"with {m.name}", str(s["modalities"].get(m.name, 0)))
        for pattern, n in s["patterns"].items():
            table.add_row(f"pattern {pattern}", str(n))
        console.print(table)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    for e in report.errors:
        console.print(f"[red]error:[/] {e}")
    if report.errors:
        console.print(f"[red]{len(report.errors)} problem(s) would corrupt training: fix them before joining.[/]")
        return 1
    console.print("[green]site data are consistent with the manifest[/]")
    return 0
