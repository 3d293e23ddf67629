"""Flower 1.41's SuperNode and SuperExec, started through their own entry points with magnet-fl's hooks (site side).

* ``fast_polling``: the SuperNode's fixed waits (3 s after an empty pull, 0.5 s between checks for its ClientApp's
  reply) and the SuperExec's task poll shortened while a run is active;
* ``forking_superexec``: the SuperExec forks a child per ClientApp that runs Flower's own ``flwr-clientapp`` entry
  point, instead of starting a new interpreter that imports Flower again.

``python -m flower_compat.supernode --superexec [--fork] FLOWER-SUPEREXEC-ARGS`` runs Flower's SuperExec (with
``forking_superexec`` when ``--fork``). The site's launcher (``client/deploy_site.py``) decides which hooks to use.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import subprocess
import sys
import time
import traceback
import types

# (importing this module runs flower_compat/__init__.py first: the Flower version is checked before these imports)
from flwr.supercore.cli import flower_superexec
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supernode import start_client_internal as sci
from flwr.supernode.cli import flower_supernode, flwr_clientapp

from . import FLOWER_IDLE_PULL

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


def superexec_through(command: list[str]) -> bool:
    """Make this process's SuperNode start its SuperExec as ``command + <flower-superexec's arguments>`` instead of
    Flower's ``flower-superexec`` program. Returns False, changing nothing, if the SuperNode does not start it so."""
    if getattr(sci, "subprocess", None) is not subprocess:
        return False

    def popen(args, **kwargs):
        if args and args[0] == "flower-superexec":
            args = [*command, *args[1:]]
        return subprocess.Popen(args, **kwargs)

    sci.subprocess = types.SimpleNamespace(Popen=popen)
    return True


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
