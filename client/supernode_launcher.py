"""The site's SuperNode process, as ``magnet-fl deploy supernode`` starts it (``client/deploy_site.py`` builds the
command)::

    python -m client.supernode_launcher --approved-apps=FILE --secret-file=FILE [--approved-fab-sha256=H1,H2]
        [--runtime-port=9094] [--pull-interval=S] [--clientapp-start=fork|spawn] FLOWER-SUPERNODE-ARGS

runs Flower's own ``flower-supernode`` (its entry point and argument parsing) so that

* only app bundles the site approved run: every run's bundle (FAB) is hashed when it arrives and refused unless its
  sha256 is in ``--approved-apps`` (read at each new run) or ``--approved-fab-sha256``; a refused bundle is never
  stored, and the coordinator gets an error reply naming the check;
* only the site's own SuperExec can claim its tasks: a fresh secret is written to ``--secret-file`` (0600 in a 0700
  folder) at every start and given to the SuperNode's Runtime API (127.0.0.1:``--runtime-port``) and to the
  SuperExec this launcher starts (Flower's ``process`` isolation); a local process without it cannot claim a task,
  read its context or push a reply. With ``fork`` the task's token never appears on a command line;
* it polls faster while a run is active (``--pull-interval``).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from flower_compat import FLOWER_ENV, FLOWER_IDLE_PULL
from flower_compat.supernode import (
    OBJECT_CONCURRENCY,
    fast_polling,
    refuse_unapproved_apps,
    run_supernode,
    start_superexec,
    supernode_isolation_args,
)

from . import approved_apps
from .deploy_site import ACTIVE_WINDOW, CLIENTAPP_STARTS, DEFAULT_PULL_INTERVAL, RUNTIME_HOST
from .private_files import private_dir, write_private

OPTIONS = {"pull-interval": str(DEFAULT_PULL_INTERVAL), "clientapp-start": "fork", "runtime-port": "9094",
           "approved-apps": "", "approved-fab-sha256": "", "secret-file": ""}
SECRET_BYTES = 32


def launcher_options(argv: list[str], names: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Leading ``--name=value`` options of the launcher (``names``: name -> default); the rest is Flower's."""
    values = dict(names)
    while argv and argv[0].startswith("--") and argv[0][2:].split("=", 1)[0] in names and "=" in argv[0]:
        name, value = argv[0][2:].split("=", 1)
        values[name], argv = value, argv[1:]
    return values, argv


def checked_options(options: dict[str, str]) -> tuple[float, int, Path, set[str], Path]:
    """(pull interval, runtime port, approved-apps file, approved hashes given here, secret file); ValueError
    naming the option otherwise. At least one bundle must be approved."""
    try:
        interval = float(options["pull-interval"])
    except ValueError:
        raise ValueError(f"--pull-interval={options['pull-interval']}: not a number of seconds") from None
    if options["clientapp-start"] not in CLIENTAPP_STARTS:
        raise ValueError(f"--clientapp-start must be one of {', '.join(CLIENTAPP_STARTS)}")
    port = options["runtime-port"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--runtime-port={port}: not a port number (1-65535)")
    for name in ("approved-apps", "secret-file"):
        if not options[name]:
            raise ValueError(f"--{name}=FILE is required")
    listed = Path(options["approved-apps"])
    given = {approved_apps.sha256_text(h, "--approved-fab-sha256") for h in options["approved-fab-sha256"].split(",")
             if h.strip()}
    if not (approved_apps.load(listed).hashes() | given):
        raise ValueError(f"no app bundle is approved for this site ({listed} lists none and no "
                         f"--approved-fab-sha256 was given): the SuperNode would refuse every run; approve the "
                         f"release you reviewed with `magnet-fl deploy approve-app`")
    return interval, int(port), listed, given, Path(options["secret-file"])


def main(argv: list[str]) -> int:
    options, flower_args = launcher_options(argv, OPTIONS)
    try:
        interval, port, listed, given, secret = checked_options(options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.update({k: os.environ.get(k, v) for k, v in {**FLOWER_ENV, **OBJECT_CONCURRENCY}.items()})
    private_dir(secret.parent)
    write_private(secret, secrets.token_bytes(SECRET_BYTES))  # a new secret at every start, 0600 in a 0700 folder
    refuse_unapproved_apps(approved_apps.checker(listed, given))
    if interval < FLOWER_IDLE_PULL and not fast_polling(interval, ACTIVE_WINDOW):
        print("warning: this Flower version's SuperNode loop is not the one magnet-fl knows; polling at Flower's "
              "own interval", file=sys.stderr)
    start_superexec(f"{RUNTIME_HOST}:{port}", str(secret), fork=options["clientapp-start"] == "fork")
    return run_supernode([*flower_args, *supernode_isolation_args(RUNTIME_HOST, port, str(secret))])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
