"""The ``magnet-fl`` command line: one sub-command per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# name -> (module with add_arguments(parser) and run(args) -> int | None, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "centralized": ("simulations.centralized_cli", "train MAGNET on pooled data, per seed (the paper's protocol)"),
    "simulate": ("simulations.simulate", "simulate a federated consortium and compare with centralized/local-only"),
    "study": ("simulations.study", "run a missingness study grid (scenarios x methods x seeds)"),
    "tune": ("simulations.tune", "choose a method's settings on the sites' validation patients (never test)"),
    "defaults": ("simulations.defaults", "derive the tunables' built-in values from studies' per-split choices"),
    "privacy-study": ("simulations.privacy_study", "compare plain / secure aggregation / DP on the same seeds"),
    "validate-site": ("client.validate_cli", "check a site's data against the consortium manifest"),
    "predict": ("client.predict_cli", "score new patients with a consortium model package"),
    "prepare": ("simulations.prepare_cli", "preprocess raw site matrices (locally or federated)"),
    "pki": ("server.pki_cli", "consortium PKI: CA, SuperLink TLS certificate, site bundles"),
    "deploy": ("simulations.deploy_cli", "start a SuperLink (coordinator) or SuperNode (site) with the right flags"),
    "site": ("client.site_cli", "a site's own policy (policy init|check) and audit log (audit)"),
    "site-worker": ("client.worker", "run a site's persistent worker (keeps data, graphs and libraries loaded)"),
    "report": ("simulations.report_cli", "write the HTML report of a run"),
}


def parse_seeds(text: str) -> list[int]:
    """``"10,20,30"`` -> [10, 20, 30]; non-integers, negative seeds, repeats and an empty list are refused."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seed given (got {text!r})")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {negative}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"seed {', '.join(map(str, repeated))} given more than once (it would run "
                                         "twice and count twice in the mean)")
    return seeds


def positive_int(text: str) -> int:
    """An integer >= 1 (epochs, rounds, sites)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def comma_list(choices: tuple[str, ...]):
    """An argparse type: a comma-separated, non-empty subset of ``choices`` (repeats dropped, order kept),
    returned as the same comma-separated text."""
    def parse(text: str) -> str:
        items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        if not items:
            raise argparse.ArgumentTypeError(f"none given (got {text!r}); choose from {','.join(choices)}")
        unknown = [x for x in items if x not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {','.join(choices)}")
        return ",".join(items)
    return parse


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: magnet-fl CMD: ...``) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such directory")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="magnet-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Argument definitions are imported lazily only for the chosen command (keeps --help fast).
        if name == _requested_command():
            importlib.import_module(module).add_arguments(p)
    return parser


def _requested_command() -> str | None:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else None


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    threads = importlib.import_module("magnet_core.model.threads")
    threads.prepare_wait_policy()  # before anything loads torch (OpenMP reads it once); torch itself not loaded yet
    parser = build_parser()
    try:
        args = parser.parse_args()
    except SystemExit as exc:  # --help (0) or a bad argument (2, one line printed)
        return int(exc.code or 0)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    threads.apply_thread_policy()  # a command will run: torch's threads (this imports torch)
    from magnet_core.cohort.data import DataError

    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (DataError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic ValidationError is a ValueError: bad config / scenario / manifest
        if os.environ.get("MAGNET_FL_DEBUG"):
            raise
        print(f"error: {exc} (set MAGNET_FL_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
