"""Two engines for the same ClientApp/ServerApp code: Flower's simulation engine (Ray) and an in-process one."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Callable, Iterable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from server.config import ENV_OVERRIDE, FederatedConfig


class InProcessGrid(Grid):
    """A Grid that delivers each message by calling the ClientApp directly (no transport, no Ray).

    Node ids are 1..N; node i+1 has node_config {"partition-id": i, "num-partitions": N}, like Flower's
    simulation engine. Messages are handled in node-id order, synchronously, when pushed.
    """

    def __init__(self, client_app, num_nodes: int, run_config: dict | None = None,
                 node_configs: dict[int, dict] | None = None):
        self.client_app = client_app
        extra = node_configs or {}
        self.contexts = {
            i + 1: Context(run_id=1, node_id=i + 1,
                           node_config={"partition-id": i, "num-partitions": num_nodes, **extra.get(i, {})},
                           state=RecordDict(), run_config=dict(run_config or {}))
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        pass

    @property
    def run(self):  # pragma: no cover - not used in-process
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(cfg: FederatedConfig, num_sites: int, on_round: Callable[[dict], None] | None = None,
                  node_configs: dict[int, dict] | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Drive the very same ServerApp body and ClientApp handlers in this process (``node_configs``: extra
    node_config per partition id)."""
    from client.app import app as client_app
    from server.app import server_main

    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    run_config = cfg.to_run_config()
    grid = InProcessGrid(client_app, num_sites, run_config, node_configs)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    return server_main(grid, ctx, on_round=on_round)


def run_flower(cfg: FederatedConfig, num_sites: int, verbose: bool = False, ray_address: str | None = None,
               cpus_per_site: float = 1.0) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Run through Flower's simulation engine (Ray); results are read back from the run's output directory.

    ``ray_address`` ("HOST:PORT" or "auto") joins an existing Ray cluster instead of starting a local one; the
    ClientApp actors are then spread over the cluster's nodes (``cpus_per_site`` CPUs each)."""
    import torch
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ[ENV_OVERRIDE] = json.dumps(cfg.to_run_config())
    try:
        t0 = time.perf_counter()
        init_args = {"log_to_driver": verbose}
        if ray_address:
            init_args["address"] = ray_address
        else:
            init_args["include_dashboard"] = False
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                       backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
                                       "init_args": init_args},
                       verbose_logging=verbose)
        _ = time.perf_counter() - t0
    finally:
        os.environ.pop(ENV_OVERRIDE, None)
    out = cfg.out_dir
    history_path = os.path.join(out, "history.json")
    if not os.path.exists(history_path):
        raise RuntimeError(f"Flower simulation ended without writing {history_path}; see the log above")
    params = {k: v.numpy() for k, v in torch.load(os.path.join(out, "model.pt")).items()}
    with open(history_path) as fh:
        return params, json.load(fh)
