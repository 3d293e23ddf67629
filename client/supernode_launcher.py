"""The site's SuperNode process: ``python -m client.supernode_launcher [--pull-interval=S]
[--clientapp-start=fork|spawn] FLOWER-SUPERNODE-ARGS`` runs Flower's ``flower-supernode`` (its own entry point and
argument parsing) with faster polling (``flower_compat.supernode.fast_polling``) and, with "fork", a SuperExec that
forks its ClientApps. ``magnet-fl deploy supernode`` builds this command (``client/deploy_site.py``)."""

from __future__ import annotations

import os
import sys

from flower_compat import FLOWER_ENV, FLOWER_IDLE_PULL
from flower_compat.supernode import (
    OBJECT_CONCURRENCY,
    fast_polling,
    run_supernode,
    superexec_command,
    superexec_through,
)

from .deploy_site import ACTIVE_WINDOW, CLIENTAPP_STARTS, DEFAULT_PULL_INTERVAL


def launcher_options(argv: list[str], names: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``--name=value`` options of the launcher (``names``: name -> default); the rest is Flower's."""
    values = dict(names)
    while argv and argv[0].startswith("--") and argv[0][2:].split("=", 1)[0] in names and "=" in argv[0]:
        name, value = argv[0][2:].split("=", 1)
        values[name], argv = value, argv[1:]
    return values, argv


def main(argv: list[str]) -> int:
    options, argv = launcher_options(argv, {"pull-interval": str(DEFAULT_PULL_INTERVAL), "clientapp-start": "fork"})
    try:
        interval = float(options["pull-interval"])
    except ValueError:
        print(f"error: --pull-interval={options['pull-interval']}: not a number of seconds", file=sys.stderr)
        return 2
    if options["clientapp-start"] not in CLIENTAPP_STARTS:
        print(f"error: --clientapp-start must be one of {', '.join(CLIENTAPP_STARTS)}", file=sys.stderr)
        return 2
    os.environ.update({k: os.environ.get(k, v) for k, v in {**FLOWER_ENV, **OBJECT_CONCURRENCY}.items()})
    if interval < FLOWER_IDLE_PULL and not fast_polling(interval, ACTIVE_WINDOW):
        print("warning: this Flower version's SuperNode loop is not the one magnet-fl knows; polling at Flower's "
              "own interval", file=sys.stderr)
    if options["clientapp-start"] == "fork":
        superexec_through(superexec_command(fork=True))  # the SuperNode starts a SuperExec that forks ClientApps
    return run_supernode(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
