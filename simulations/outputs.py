"""Output folders are never silently mixed: one holding results is refused; a new result is built aside, swapped in."""

# A run writes into a hidden sibling ``.<out>.partial-<pid>-<n>``; only when it succeeds is the previous folder moved
# aside and the new one renamed into place (same file system, so each rename is atomic), then the previous one is
# deleted. A failed or interrupted run leaves the previous complete result untouched (and no half-written folder).

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from magnet_core.artefacts.processes import process_alive

MARKER = ".magnet-fl-output.json"  # written into every committed output folder: what produced it
RESULT_FILES = (MARKER, "results.json", "rounds.csv", "manifest.toml", "prepare_report.json", "history.json",
                "model.pt", "checkpoint.pt", "summary.json")
_counter = itertools.count()


class OutputExists(FileExistsError):
    """The output folder already holds results and the user did not ask to replace them."""

    def __str__(self) -> str:  # FileExistsError would prefix an errno
        return str(self.args[0])


def _few(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def check_output(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse ``out`` when it already holds anything, unless ``overwrite`` (a folder of magnet-fl results only)
    or ``resume``. Call it before any work."""
    out = Path(out)
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents or not out.name:
        raise OutputExists(f"{out}: is the current folder or holds it; give --out a folder of its own")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExists(f"{out}: exists and is not a folder; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or resume:
        return
    ours = [e for e in entries if e in RESULT_FILES]
    if not overwrite:
        held = f"results ({_few(ours)})" if ours else f"files ({_few(entries)})"
        raise OutputExists(f"{out}: already holds {held}; pass --overwrite to replace them, or choose another "
                           "--out")
    if not ours:
        raise OutputExists(f"{out}: holds files that are not magnet-fl results ({_few(entries)}); --overwrite "
                           "replaces only a result folder: choose another --out")


def _clean_stale(out: Path) -> None:
    """Partial folders left by runs that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not process_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


class StagedOutput:
    """``staging`` receives the run's files; :meth:`commit` swaps it into ``final``; :meth:`discard` drops it."""

    def __init__(self, final: Path, command: str, overwrite: bool = False) -> None:
        self.final = Path(final)
        self.command = command
        self.overwrite = overwrite
        check_output(self.final, overwrite)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(self.final)
        self.staging = self.final.parent / f".{self.final.name}.partial-{os.getpid()}-{next(_counter)}"
        self.staging.mkdir()

    def commit(self, info: dict[str, Any] | None = None) -> Path:
        """Mark the staged folder complete and put it in place of ``final`` (the previous one is deleted). Should
        another run have filled ``final`` meanwhile (without --overwrite), the new results stay in ``staging``."""
        try:
            check_output(self.final, self.overwrite)
        except OutputExists:
            kept = self.final.parent / f"{self.final.name}.new-{os.getpid()}"
            self.staging.rename(kept)
            raise OutputExists(f"{self.final}: was filled by another run meanwhile; this run's results are kept in "
                               f"{kept}") from None
        (self.staging / MARKER).write_text(json.dumps({"command": self.command, **(info or {})}, indent=1) + "\n")
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}-{next(_counter)}"
            self.final.rename(old)
        self.staging.rename(self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def relocate_paths(obj: Any, old: Path, new: Path) -> Any:
    """``obj`` (JSON-like) with every string path under ``old`` rewritten to lie under ``new``."""
    if isinstance(obj, str):
        return str(new) + obj[len(str(old)):] if obj == str(old) or obj.startswith(str(old) + os.sep) else obj
    if isinstance(obj, dict):
        return {k: relocate_paths(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relocate_paths(v, old, new) for v in obj]
    return obj


def run_staged(args: argparse.Namespace, command: str, run: Callable[[argparse.Namespace], int | None],
               relocate: tuple[str, ...] = ()) -> int:
    """Run ``run`` on a copy of ``args`` whose ``out`` is a fresh staging folder (``out_final`` = the real one,
    ``_staged`` = True); commit it to ``args.out`` when ``run`` returns 0, drop it otherwise (and on any error).
    ``relocate``: JSON files in the output whose staging paths are rewritten to the final folder."""
    staged = StagedOutput(args.out, command, overwrite=getattr(args, "overwrite", False))
    inner = argparse.Namespace(**{**vars(args), "out": staged.staging, "out_final": staged.final, "_staged": True})
    try:
        rc = int(run(inner) or 0)
    except BaseException:
        staged.discard()
        raise
    if rc != 0:
        staged.discard()
        return rc
    for name in relocate:
        path = staged.staging / name
        if path.exists():
            payload = relocate_paths(json.loads(path.read_text()), staged.staging, staged.final)
            path.write_text(json.dumps(payload, indent=1))
    staged.commit()
    return 0
