"""A site's audit log as an append-only hash chain: every JSON line carries its sequence number, the hash of the
line before it and its own hash; a changed, removed, inserted or reordered line breaks the chain."""

# Format (one JSON object per line, file ``audit.jsonl`` in the site's state folder):
#   seq   0, 1, 2, ...                      position in the log
#   prev  hash of entry seq - 1 (GENESIS for the first)
#   hash  sha256 of the canonical JSON of the entry without "hash" (sorted keys, no spaces)
# plus what the site recorded (client/audit.py). ``audit.head`` beside it holds the last seq and hash, rewritten
# after every append, so that lines cut from the end are detected too. What this cannot detect: someone with the
# site's own file rights rewriting the whole log and its head consistently (the chain proves order and integrity
# against a later edit, not authorship); copying the head elsewhere (e.g. `magnet-fl site audit` output kept by the
# data-protection officer) closes that.

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, Field

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
GENESIS = "0" * 64


def canonical(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(entry), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """sha256 of the entry's canonical JSON without its own "hash"."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def chained(entry: Mapping[str, Any], seq: int, prev: str) -> dict:
    """``entry`` as line ``seq`` of a chain whose last line hashes to ``prev``."""
    out = {**{k: v for k, v in entry.items() if k not in ("seq", "prev", "hash")}, "seq": seq, "prev": prev}
    out["hash"] = entry_hash(out)
    return out


class ChainCheck(BaseModel):
    """The result of checking one audit log."""

    path: str
    entries: int = 0
    ok: bool = True
    head: str = GENESIS
    problems: list[str] = Field(default_factory=list)


def read_entries(path: Path) -> tuple[list[dict], list[str]]:
    """The entries of an audit log and the problems of lines that are not JSON objects (``file, line n: ...``)."""
    entries, problems = [], []
    text = path.read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}, line {i}: not valid JSON ({exc.msg}, column {exc.colno})")
            continue
        if not isinstance(e, dict):
            problems.append(f"{path}, line {i}: expected a JSON object, got {type(e).__name__}")
            continue
        entries.append(e)
    return entries, problems


def verify_chain(path: str | Path) -> ChainCheck:
    """Check every line of the log at ``path`` (and its head file): each names the previous line's hash, hashes
    to what it says, and numbers follow; every problem names the line."""
    path = Path(path)
    check = ChainCheck(path=str(path))
    if not path.exists():
        check.ok, check.problems = False, [f"{path}: no audit log"]
        return check
    prev, seq = GENESIS, 0
    text = path.read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        where = f"{path}, line {i}"
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            check.problems.append(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})")
            prev, seq = "unknown", seq + 1
            continue
        if not isinstance(e, dict):
            check.problems.append(f"{where}: not a JSON object")
            prev, seq = "unknown", seq + 1
            continue
        if e.get("seq") != seq:
            check.problems.append(f"{where}: entry number {e.get('seq')!r}, expected {seq} (a line was removed, "
                                  "inserted or moved)")
        if e.get("prev") != prev and prev != "unknown":
            check.problems.append(f"{where}: names previous hash {str(e.get('prev'))[:16]}..., but line {i - 1} "
                                  f"hashes to {prev[:16]}... (a line before it was changed, removed or inserted)")
        try:
            own = entry_hash(e)
        except ValueError as exc:
            own = f"unhashable: {exc}"
        if e.get("hash") != own:
            check.problems.append(f"{where}: its content does not hash to the hash it carries (the line was "
                                  "changed after it was written)")
        prev, seq = str(e.get("hash")), seq + 1
    check.entries, check.head = seq, prev
    head_path = path.with_name(HEAD_FILE)
    if head_path.exists():
        try:
            head = json.loads(head_path.read_text(encoding="utf-8"))
            if head.get("entries") != seq or head.get("hash") != prev:
                check.problems.append(f"{head_path}: records {head.get('entries')} entries ending in "
                                      f"{str(head.get('hash'))[:16]}..., the log holds {seq} ending in {prev[:16]}... "
                                      "(lines were cut from the end or the log was replaced)")
        except (json.JSONDecodeError, AttributeError) as exc:
            check.problems.append(f"{head_path}: unreadable ({exc})")
    elif seq:
        check.problems.append(f"{head_path}: missing (the log's last entry cannot be confirmed)")
    check.ok = not check.problems
    return check


class RunSummary(BaseModel):
    """What crossed a site's boundary in one run, from its audit log."""

    run: int | str
    requests: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    bytes_received: int = 0
    bytes_released: int = 0
    released_by_kind: dict[str, int] = Field(default_factory=dict, description="message kind -> releases")
    refused_by_rule: dict[str, int] = Field(default_factory=dict, description="policy rule -> refusals")
    rounds: list[int] = Field(default_factory=list)


def summarise_runs(entries: list[dict]) -> list[RunSummary]:
    """Per run: requests, decisions, bytes in and out, releases by kind and refusals by policy rule."""
    runs: dict[Any, RunSummary] = {}
    for e in entries:
        run = e.get("run", "?")
        s = runs.setdefault(run, RunSummary(run=run if isinstance(run, (int, str)) else str(run)))
        s.requests += 1
        decision = e.get("decision")
        if decision in ("answered", "refused", "failed"):
            setattr(s, decision, getattr(s, decision) + 1)
        req, rel = e.get("request") or {}, e.get("release") or {}
        s.bytes_received += int(req.get("bytes", 0) or 0)
        if decision == "answered":
            s.bytes_released += int(rel.get("bytes", 0) or 0)
            kind = str(e.get("kind", ""))
            s.released_by_kind[kind] = s.released_by_kind.get(kind, 0) + 1
        if decision == "refused":
            rule = str(e.get("rule") or "unreadable request")
            s.refused_by_rule[rule] = s.refused_by_rule.get(rule, 0) + 1
        rnd = e.get("round")
        if isinstance(rnd, int) and rnd not in s.rounds:
            s.rounds.append(rnd)
    return list(runs.values())
