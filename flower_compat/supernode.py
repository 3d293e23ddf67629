"""Flower 1.41's SuperNode and SuperExec, started through their own entry points with magnet-fl's hooks (site side).

* ``fast_polling``: the SuperNode's fixed waits (3 s after an empty pull, 0.5 s between checks for its ClientApp's
  reply) and the SuperExec's task poll shortened while a run is active;
* ``forking_superexec``: the SuperExec forks a child per ClientApp that runs Flower's own ``flwr-clientapp`` entry
  point, instead of starting a new interpreter that imports Flower again (and the task's token never appears on a
  command line);
* ``refuse_unapproved_apps``: the SuperNode checks every app bundle (FAB) a run brings against the site's own rule
  before storing it; a refused bundle is never stored, so no ClientApp can run it, and the coordinator gets an
  error reply naming the check;
* ``start_superexec``: the SuperExec as a process of the site's own (Flower's ``process`` isolation), sharing the
  Runtime API's authentication secret with the SuperNode: without the secret no local process can claim a task.

``python -m flower_compat.supernode --superexec [--fork] FLOWER-SUPEREXEC-ARGS`` runs Flower's SuperExec (with
``forking_superexec`` when ``--fork``). The site's launcher (``client/deploy_site.py``) decides which hooks to use.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import signal
import subprocess
import sys
import time
import traceback
import types
from logging import ERROR
from typing import Callable

# (importing this module runs flower_compat/__init__.py first: the Flower version is checked before these imports)
from flwr.app import Error, Message
from flwr.common.constant import ISOLATION_MODE_PROCESS, ErrorCode
from flwr.supercore import log as flower_log
from flwr.supercore.cli import flower_superexec
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supernode import start_client_internal as sci
from flwr.supernode.cli import flower_supernode, flwr_clientapp

from . import FLOWER_IDLE_PULL, FlowerVersionError

FLOWER_REPLY_CHECK = 0.5  # seconds between the SuperNode's checks for its ClientApp's reply (Flower 1.41, fixed)
REPLY_CHECK_INTERVAL, TASK_POLL_INTERVAL = 0.05, 0.1
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own variable; an explicit setting wins
# Objects (arrays) a SuperNode moves to/from the SuperLink at once (Flower's FLWR_PRIVATE_* variables; default 2)
OBJECT_CONCURRENCY = {"FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "4", "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "4"}
# A ClientApp pulls its message's objects from the SuperNode, which may still be downloading them from the SuperLink;
# Flower retries with a back-off of 1 s doubling to 10 s. Forked ClientApps retry this local call at 0.05-0.5 s
# (more tries, so that Flower's overall limit of 2 hours per pull still decides, not the number of tries).
CLIENTAPP_PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": 20_000}
# What a forking SuperExec imports once (every forked ClientApp starts with these loaded). The app's own modules
# (from the run's FAB) are not preloaded: each ClientApp imports them from the bundle it runs.
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp", "flwr.clientapp",
           "flwr.clientapp.mod", "numpy", "pandas", "pydantic")
SUPEREXEC_MODULE = "flower_compat.supernode"


def fast_polling(pull_interval: float, active_window: float) -> bool:
    """Make this process's SuperNode poll the SuperLink every ``pull_interval`` seconds while a run is active (a
    message handled in the last ``active_window`` seconds; Flower's 3 s otherwise), check for its ClientApp's reply
    every REPLY_CHECK_INTERVAL s instead of 0.5 s, and its SuperExec ask for tasks every TASK_POLL_INTERVAL s.
    Returns False, changing nothing, if this Flower's SuperNode loop is not the one this was written for."""
    try:
        source = inspect.getsource(sci.start_client_internal) + inspect.getsource(sci._push_messages)
    except (AttributeError, OSError, TypeError):
        return False
    if sci.time is not time or "time.sleep(3)" not in source or "time.sleep(0.5)" not in source:
        return False
    last = [float("-inf")]
    push = sci._push_messages

    def push_messages(*args, **kwargs):  # called once per message pulled: the run is active
        last[0] = time.monotonic()
        try:
            return push(*args, **kwargs)
        finally:
            last[0] = time.monotonic()

    def sleep(seconds: float) -> None:
        if seconds == FLOWER_IDLE_PULL:  # the idle poll after an empty pull
            active = time.monotonic() - last[0] < active_window
            time.sleep(pull_interval if active else FLOWER_IDLE_PULL)
        elif seconds == FLOWER_REPLY_CHECK:  # waiting for the local ClientApp's reply (an in-memory check)
            time.sleep(REPLY_CHECK_INTERVAL)
        else:
            time.sleep(seconds)

    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    clock.sleep = sleep
    sci.time, sci._push_messages = clock, push_messages
    os.environ.setdefault(TASK_POLL_ENV, f"{min(TASK_POLL_INTERVAL, pull_interval):g}")
    return True


def forking_superexec() -> bool:
    """In this (SuperExec) process: preload PRELOAD and make Flower's subprocess executor fork a child per
    ``flwr-clientapp`` launch instead of starting a new interpreter. The child runs Flower's ``flwr_clientapp``
    entry point with the same arguments and exits with its code; children are reaped by the kernel (SIGCHLD
    ignored here, restored in the child). Returns False, changing nothing, if the executor is not the one known."""
    if getattr(subprocess_executor, "subprocess", None) is not subprocess:
        return False
    for name in PRELOAD:
        importlib.import_module(name)
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = getattr(fn, "__kwdefaults__", None) or {}  # keyword-only defaults (Flower 1.41)
        defaults.update({k: v for k, v in CLIENTAPP_PULL_BACKOFF.items() if k in defaults})

    def popen(args, **kwargs):
        if not args or args[0] != "flwr-clientapp":
            return subprocess.Popen(args, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return types.SimpleNamespace(pid=pid, args=args)
        code = 1
        try:  # the child: Flower's flwr-clientapp, as if started as a program
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if kwargs.get("stdout") == subprocess.DEVNULL:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            sys.argv = list(args)
            flwr_clientapp()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - report and exit; never return into the SuperExec's loop
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked ClientApps are reaped by the kernel
    subprocess_executor.subprocess = types.SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL)
    return True


class UnapprovedApp(Exception):
    """An app bundle the site's rule refused; the text is the reason sent back to the coordinator."""


def refuse_unapproved_apps(check: Callable[[str], str | None]) -> None:
    """Make this process's SuperNode check every app bundle (FAB) before it stores it: ``check(sha256)`` gets the
    sha256 of the bundle's bytes as received (computed here: Flower does not check that the bytes match the hash the
    SuperLink announces) and returns None to accept or the reason to refuse. A refused bundle is not stored, no task
    is created, and the message gets Flower's own INVALID_FAB error reply with that reason (the run's next message
    is checked again). Raises FlowerVersionError, changing nothing, if this Flower's SuperNode does not fetch
    bundles the way this was written for (the check must never silently not apply)."""
    pull = getattr(sci, "_pull_and_store_message", None)
    insert = getattr(sci, "_insert_message", None)
    params = set(inspect.signature(pull).parameters) if callable(pull) else set()
    if not callable(insert) or not {"state", "object_store", "receive", "get_fab"} <= params:
        raise FlowerVersionError("this Flower's SuperNode does not pull app bundles as Flower 1.41.0 does; "
                                 "magnet-fl cannot check them and refuses to start the SuperNode")

    def pull_and_store(**kwargs):
        received, get_fab = [], kwargs["get_fab"]

        def receive():
            got = kwargs["receive"]()
            received[:] = [got[0]] if got else []
            return got

        def checked_get_fab(fab_hash: str, run_id: int):
            fab = get_fab(fab_hash, run_id)
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest != fab_hash or fab.hash_str != fab_hash:
                raise UnapprovedApp(f"app bundle refused by this site: its bytes hash to sha256 {digest}, not the "
                                    f"{fab_hash} announced for run {run_id}")
            reason = check(digest)
            if reason is not None:
                raise UnapprovedApp(reason)
            return fab

        try:
            return pull(**{**kwargs, "receive": receive, "get_fab": checked_get_fab})
        except UnapprovedApp as exc:
            message = received[0]
            flower_log(ERROR, "%s (run %s)", exc, message.metadata.run_id)
            insert(Message(Error(code=ErrorCode.INVALID_FAB, reason=str(exc)), reply_to=message),
                   kwargs["state"], kwargs["object_store"])
            return message.metadata.run_id

    sci._pull_and_store_message = pull_and_store


def start_superexec(runtime_address: str, secret_file: str, fork: bool) -> subprocess.Popen:
    """Start Flower's SuperExec for this process's SuperNode (``process`` isolation: the SuperNode does not start
    one itself): it claims tasks on the loopback Runtime API signing each claim with the secret in ``secret_file``,
    and exits with this process."""
    return subprocess.Popen([*superexec_command(fork), "--runtime-api-address", runtime_address, "--insecure",
                             "--parent-pid", str(os.getpid()), "--superexec-auth-secret-file", secret_file])


def supernode_isolation_args(host: str, port: int, secret_file: str) -> list[str]:
    """flower-supernode's flags for a Runtime API on ``host:port`` that only holders of the secret can claim tasks
    from (Flower 1.41 applies the secret in ``process`` isolation only; in ``subprocess`` it ignores it)."""
    return ["--isolation", ISOLATION_MODE_PROCESS, "--host", host, "--port", str(port),
            "--superexec-auth-secret-file", secret_file]


def superexec_command(fork: bool) -> list[str]:
    """The program that runs Flower's SuperExec in this environment (forking its ClientApps when ``fork``)."""
    return [sys.executable, "-m", SUPEREXEC_MODULE, "--superexec", *(["--fork"] if fork else [])]


def run_supernode(flower_args: list[str]) -> int:
    """Flower's ``flower-supernode`` (its own entry point and argument parsing) in this process."""
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


def run_superexec(flower_args: list[str], fork: bool) -> int:
    """Flower's ``flower-superexec`` in this process, forking its ClientApps when ``fork``."""
    if fork and not forking_superexec():
        print("warning: this Flower version's SuperExec is not the one magnet-fl knows; starting ClientApps as new "
              "processes", file=sys.stderr)
    sys.argv = ["flower-superexec", *flower_args]
    flower_superexec()
    return 0


def main(argv: list[str]) -> int:
    """``--superexec [--fork] FLOWER-SUPEREXEC-ARGS``: see the module's docstring."""
    if argv[:1] != ["--superexec"]:
        print("usage: python -m flower_compat.supernode --superexec [--fork] FLOWER-SUPEREXEC-ARGS", file=sys.stderr)
        return 2
    fork = argv[1:2] == ["--fork"]
    return run_superexec(argv[2 if fork else 1:], fork)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
