"""A site's tamper-evident audit log: every request it received and every release it sent (kind, size, sha256,
its policy's decision and the refusal), appended by the site alone to a hash chain in its state folder."""

# The chain itself (hashing, checking) is magnet_core/artefacts/audit_chain.py; `magnet-fl site audit` checks it and
# summarises what left the site per run; the site view of the run report reads it like a site log (client/site_log.py
# keeps its own per-message lines beside it). Values are never written: names, shapes, sizes and hashes only.

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict

from flower_compat.wire import recorddict_bytes
from magnet_core.artefacts.audit_chain import AUDIT_FILE, GENESIS, HEAD_FILE, chained

from .private_files import write_private
from .site_log import items
from .site_state import private_folder

TAIL_BYTES = 1 << 20  # the last entry is found in the log's last MiB (an entry is a few KiB)


def content_digest(content: RecordDict) -> dict[str, Any]:
    """Size and sha256 of a message's content as Flower serialises it (deterministic protobuf)."""
    data = recorddict_bytes(content)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def message_digest(msg: Message) -> dict[str, Any] | None:
    """Digest of a message's content, or None for an error message (nothing released)."""
    return None if msg.has_error() else content_digest(msg.content)


def _last_entry(fd: int) -> dict | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - TAIL_BYTES)
    tail = os.pread(fd, size - start, start).decode("utf-8", errors="replace")
    lines = [line for line in tail.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        last = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ValueError(f"the audit log's last line is not JSON (the log is damaged; `magnet-fl site audit` "
                         f"names the line): {lines[-1][:80]!r}") from None
    return last if isinstance(last, dict) else None


def append(folder: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` to ``<folder>/audit.jsonl`` as the next link of the chain (locked against concurrent
    writers of this site; file 0600 in a 0700 folder of this user); returns the entry as written."""
    folder = private_folder(Path(folder))
    path = folder / AUDIT_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = _last_entry(fd)
        seq, prev = (0, GENESIS) if last is None else (int(last.get("seq", -1)) + 1, str(last.get("hash")))
        line = chained(entry, seq, prev)
        os.write(fd, (json.dumps(line, sort_keys=True, allow_nan=False) + "\n").encode())
        os.fsync(fd)
        write_private(folder / HEAD_FILE, json.dumps({"entries": seq + 1, "hash": line["hash"],
                                                      "time": line.get("time")}).encode())
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return line


def exchange_entry(msg: Message, reply: Message, *, site: str, consortium: str, round_: int | None,
                   decision: str, rule: str | None = None, where: str | None = None) -> dict[str, Any]:
    """One request and its answer: what came in, what went out (or the refusal), and the policy's decision
    ("answered", "refused" by the policy or before it, "failed": accepted, then an error reply)."""
    error = reply.error.reason if reply.has_error() else None
    return {
        "time": time.time(), "site": site, "consortium": consortium, "run": int(msg.metadata.run_id),
        "round": round_, "kind": msg.metadata.message_type, "decision": decision, "rule": rule, "where": where,
        "error": error,
        "request": message_digest(msg) if msg.has_content() else None,
        "release": message_digest(reply),
        "received": items(msg.content) if msg.has_content() else [],
        "sent": [] if reply.has_error() else items(reply.content),
    }
