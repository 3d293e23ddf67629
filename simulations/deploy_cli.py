"""``magnet-fl deploy ACTION``: the coordinator's actions (``server/deploy_cli.py``: superlink, connection, register)
and the site's (``client/deploy_site.py``: supernode) under one command; each side's code stays on its side."""

from __future__ import annotations

import argparse

from client import deploy_site
from server import deploy_cli as deploy_coordinator


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    deploy_coordinator.add_actions(sub)
    deploy_site.add_actions(sub)


def run(args: argparse.Namespace) -> int:
    side = deploy_site if args.deploy_command in deploy_site.ACTIONS else deploy_coordinator
    return side.run(args)
