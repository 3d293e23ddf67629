"""``magnet-fl site``: the hospital's side of the trust boundary. ``policy init`` writes a site policy to edit,
``policy check`` reads it back (every rule with its line, what the site has spent), ``audit`` verifies the site's
audit log and summarises what left the site per run."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from magnet_core.artefacts.audit_chain import AUDIT_FILE, read_entries, summarise_runs, verify_chain

from .policy import PolicyError, load_policy, template
from .site_state import SiteState, StateFolderError, private_folder

RULES = ("consortium", "state_dir", "min_count", "secure_aggregation.train", "secure_aggregation.evaluate",
         "secure_aggregation.prepare", "privacy.min_noise_multiplier", "privacy.epsilon_budget", "privacy.delta",
         "privacy.colluding_sites", "privacy.accounting", "ranges.rounds", "ranges.local_epochs",
         "ranges.histogram_bins", "rounds.never_repeat", "rounds.train_once_per_model",
         "evaluation.only_current_round", "evaluation.once_per_model", "evaluation.next_train_from_evaluated",
         "evaluation.max_per_consortium", "preparation.split_seed", "preparation.split_ratios",
         "preparation.use_split_file", "preparation.once_per_consortium")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="site_command", required=True, metavar="{policy,audit}")
    pol = sub.add_parser("policy", help="write or check the site's policy (a TOML file the hospital owns)")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="{init,check}")
    init = psub.add_parser("init", help="write a policy with the safe defaults, to edit")
    init.add_argument("path", type=Path, help="where to write the policy (refused if it exists)")
    init.add_argument("--consortium", required=True, help="the consortium this policy is for (its manifest's name)")
    init.add_argument("--state-dir", default="site-state",
                      help="the site's own folder for its audit log and privacy spent (relative to the policy)")
    init.add_argument("--min-count", type=int, default=None, help="k, the site's minimum count (default 5)")
    init.add_argument("--split-seed", type=int, default=None, help="the seed of the site's own split")
    init.add_argument("--unauthenticated", action="store_true",
                      help="write secure_aggregation.authenticated = false (a consortium without a roster); by default "
                           "the site takes part only in authenticated secure sums")
    check = psub.add_parser("check", help="read a policy back: every rule, its line, what the site has spent")
    check.add_argument("path", type=Path)
    audit = sub.add_parser("audit", help="verify the site's audit log and summarise what left the site per run")
    audit.add_argument("path", type=Path, help="the site policy, its state folder, or the audit log itself")


def _audit_path(path: Path) -> Path:
    if path.is_dir():
        return path / AUDIT_FILE
    if path.suffix == ".toml":
        return load_policy(path).state_path() / AUDIT_FILE
    return path


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True)
    try:
        if args.site_command == "audit":
            return audit(_audit_path(args.path), console)
        if args.policy_command == "init":
            return init(args, console)
        return check(args.path, console)
    except (PolicyError, StateFolderError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1


def init(args: argparse.Namespace, console: Console) -> int:
    if args.path.exists():
        console.print(f"[red]error:[/] {escape(str(args.path))} exists; edit it, or choose another path")
        return 1
    kw = {k: v for k, v in (("min_count", args.min_count), ("split_seed", args.split_seed)) if v is not None}
    text = template(args.consortium, args.state_dir, authenticated=not args.unauthenticated, **kw)
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text, encoding="utf-8")
    args.path.chmod(0o600)
    console.print(f"wrote {escape(str(args.path))}: name it in the SuperNode's node config as "
                  f"site-policy='{escape(str(args.path.resolve()))}'")
    return check(args.path, console)


def check(path: Path, console: Console) -> int:
    policy = load_policy(path)
    table = Table(title=escape(f"site policy {path}"))
    for col in ("rule", "value", "line"):
        table.add_column(col)
    for rule in RULES:
        where = policy.where(rule)
        table.add_row(rule, escape(where.split(" = ", 1)[1]), str(policy.lines.get(rule, "default")))
    console.print(table)
    folder = private_folder(policy.state_path())
    with SiteState(folder) as state:
        p = policy.privacy
        spent = state.accountant.spent(policy.consortium, p.delta, p.accounting)
        rounds = len(state.accountant.rounds(policy.consortium))
        memory = state.memory.consortia.get(policy.consortium)
    budget = "no budget" if p.epsilon_budget is None else f"budget {p.epsilon_budget:g}"
    console.print(f"state folder {escape(str(folder))}: {rounds} DP round(s) charged to consortium "
                  f"{escape(policy.consortium)!r}, epsilon {spent:.4g} at delta {p.delta:g} ({budget}); "
                  f"{memory.evaluations if memory else 0} evaluation(s) answered")
    console.print("[green]policy is valid[/]")
    return 0


def audit(path: Path, console: Console) -> int:
    if not path.exists():
        console.print(f"[red]error:[/] {escape(str(path))}: no audit log (the site has answered no request with "
                      "its policy on, or this is not its state folder)")
        return 1
    result = verify_chain(path)
    if path.exists():
        entries, _ = read_entries(path)
        table = Table(title=escape(f"what crossed the site's boundary ({path})"))
        for col in ("run", "rounds", "requests", "answered", "refused", "failed", "received", "released",
                    "released by kind", "refused by rule"):
            table.add_column(col)
        for s in summarise_runs(entries):
            rounds = f"{min(s.rounds)}-{max(s.rounds)}" if s.rounds else ""
            table.add_row(str(s.run), rounds, str(s.requests), str(s.answered), str(s.refused), str(s.failed),
                          f"{s.bytes_received} B", f"{s.bytes_released} B",
                          escape(", ".join(f"{k} {n}" for k, n in s.released_by_kind.items())),
                          escape(", ".join(f"{k} {n}" for k, n in s.refused_by_rule.items())))
        console.print(table)
    for problem in result.problems:
        console.print(f"[red]tampered:[/] {escape(problem)}")
    if not result.ok:
        console.print(f"[red]the audit log {escape(str(path))} does not verify ({len(result.problems)} "
                      "problem(s))[/]")
        return 1
    console.print(f"[green]audit chain verified: {result.entries} entries, head {result.head}[/]")
    return 0
