"""A site's own record of what crossed its boundary: one JSON line per message, names/kinds/sizes, never values."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Message, RecordDict

from magnet_core.protocol.keys import (
    CONFIG_KEY,
    NAME_FIELD,
    NODE_PARTITION_ID,
    NODE_SITE_LOG_DIR,
    NODE_SITE_NAME,
    SITE_KEY,
)
from magnet_core.protocol.messages import round_of

LOG_KEY = NODE_SITE_LOG_DIR  # where the site keeps site_log.jsonl (read by `magnet-fl report --site`)


def items(content: RecordDict) -> list[dict]:
    """What a message carries: each array's name, shape and bytes; each metric/config entry's name and length."""
    out = []
    for name, rec in content.array_records.items():
        for key, arr in rec.items():
            out.append({"name": f"{name}/{key}", "kind": "array", "shape": list(arr.shape), "bytes": len(arr.data)})
    for kind, records in (("metric", content.metric_records), ("config", content.config_records)):
        for name, rec in records.items():
            for key, value in rec.items():
                n = len(value) if isinstance(value, (list, bytes, str)) else 1
                out.append({"name": f"{name}/{key}", "kind": kind, "shape": [n], "bytes": 8 * n})
    return out


def record(msg: Message, reply: Message, node_config: Mapping[str, Any]) -> None:
    """Append the message/reply pair to ``<site-log-dir>/site_log.jsonl`` when the node config names a folder."""
    folder = node_config.get(LOG_KEY)
    if not folder:
        return
    config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
    site = reply.content[SITE_KEY].get(NAME_FIELD) if not reply.has_error() and SITE_KEY in reply.content else None
    simulated = f"site{node_config[NODE_PARTITION_ID]}" if NODE_PARTITION_ID in node_config else None  # as simulated
    entry = {"site": site or node_config.get(NODE_SITE_NAME) or simulated or "unnamed site",
             "round": round_of(config),
             "kind": msg.metadata.message_type.split(".")[0], "time": time.time(),
             "received": items(msg.content) if msg.has_content() else [],
             "sent": [] if reply.has_error() else items(reply.content)}
    if reply.has_error():
        entry["error"] = reply.error.reason
    path = Path(str(folder)) / "site_log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
