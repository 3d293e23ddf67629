"""``magnet-fl report RUN_DIR [--site NAME]``: the run's self-contained HTML report (coordinator's or a site's view)."""

from __future__ import annotations

import argparse
from pathlib import Path

from magnet_core.artefacts.report import write_report

from .cli import existing_dir
from .reporting import console


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=existing_dir,
                   help="a run directory (simulate --out, flwr run out-dir) or a site's log directory")
    p.add_argument("--site", default=None,
                   help="write this site's view (what it sent and received) instead of the coordinator's")
    p.add_argument("--out", type=Path, default=None,
                   help="HTML file to write (default: RUN_DIR/report.html, or RUN_DIR/report-site-NAME.html)")


def run(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir, site=args.site, out=args.out)
    console.print(f"report: {path}")
    return 0
