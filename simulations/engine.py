"""Two engines for the same ClientApp/ServerApp code: Flower's simulation engine (Ray) and an in-process one."""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Callable, Iterable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from flower_compat.simulation import enter_task_identity, run_simulation, set_message_id
from flower_compat.wire import NodeInfo  # what Grid.get_nodes returns in Flower 1.41
from server.config import FederatedConfig


class InProcessGrid(Grid):
    """A Grid that delivers each message by calling the ClientApp directly (no transport, no Ray).

    Node ids are 1..N; node i+1 has node_config {"partition-id": i, "num-partitions": N}, like Flower's
    simulation engine. Messages are handled in node-id order, synchronously, when pushed.
    """

    def __init__(self, client_app, num_nodes: int, run_config: dict | None = None,
                 node_configs: dict[int, dict] | None = None):
        enter_task_identity(1)  # messages created outside a SuperLink need a task identity
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

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Like Flower's simulation engine, partition i is the i-th node registered (the coordinator binds names
        to partition ids by registration order: server/names.py)."""
        return [NodeInfo(node_id=n, registered_at=f"1970-01-01T00:00:00.{i:06d}+00:00")
                for i, n in enumerate(self.contexts)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            set_message_id(msg, str(uuid.uuid4()))
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

    run_config = cfg.to_run_config()
    grid = InProcessGrid(client_app, num_sites, run_config, node_configs)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    return server_main(grid, ctx, on_round=on_round)


def run_flower(cfg: FederatedConfig, num_sites: int, verbose: bool = False, ray_address: str | None = None,
               cpus_per_site: float = 1.0, on_round: Callable[[dict], None] | None = None
               ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Run through Flower's simulation engine (Ray); results are read back from the run's output directory.

    The ServerApp gets ``cfg`` as its Flower run config (the ClientApps get everything they need in each round's
    message). ``on_round`` is called with each new round record, read from the run's history.json as the
    ServerApp writes it. ``ray_address`` ("HOST:PORT" or "auto") joins an existing Ray cluster instead of
    starting a local one; the ClientApp actors are then spread over the cluster's nodes (``cpus_per_site`` CPUs
    each)."""
    start_ray(verbose, ray_address, cpus_per_site)  # first: Ray starts while torch is imported
    import torch

    from client.app import app as client_app
    from server.app import app as server_app

    history_path = os.path.join(cfg.out_dir, "history.json")
    watcher = _HistoryWatcher(history_path, on_round) if on_round is not None else None
    try:
        run_flower_app(server_app, client_app, cfg.to_run_config(), num_sites, verbose, ray_address, cpus_per_site)
    finally:
        if watcher is not None:
            watcher.stop()
    if not os.path.exists(os.path.join(cfg.out_dir, "model.pt")):
        raise RuntimeError(f"Flower simulation ended without writing {cfg.out_dir}/model.pt; see the log above")
    state = torch.load(os.path.join(cfg.out_dir, "model.pt"), weights_only=True)
    params = {k: v.numpy() for k, v in state.items()}
    with open(history_path) as fh:
        return params, json.load(fh)


def run_flower_app(server_app, client_app, run_config: dict, num_sites: int, verbose: bool = False,
                   ray_address: str | None = None, cpus_per_site: float = 1.0) -> None:
    """Run a ServerApp/ClientApp pair on Flower's simulation engine with ``run_config`` as the ServerApp's Flower
    run config (no environment variables, no module globals)."""
    # a no-op if Ray is running (run_flower started it); federated preparation needs no torch in the driver
    init_args = start_ray(verbose, ray_address, cpus_per_site, warm_imports=False)
    run_simulation(server_app, client_app, run_config, num_sites,
                   {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}, "init_args": init_args},
                   verbose)


def _import_training_stack() -> None:
    """Import what the ServerApp's first round needs (torch, PyG, the model) ahead of time."""
    import magnet_core.model.network  # noqa: F401  (torch and torch_geometric: about 3 s on this project's machines)
    import server.loop  # noqa: F401


def start_ray(verbose: bool = False, ray_address: str | None = None, cpus_per_site: float = 1.0,
              warm_imports: bool = True) -> dict:
    """Start (or join) Ray as Flower's simulation backend would, while another thread imports the training stack;
    returns the ``init_args`` for Flower's backend config.

    Flower's ``RayBackend.init_ray`` starts Ray only if it is not running yet and hands the workers the driver's
    ``sys.path`` as PYTHONPATH; this does the same, earlier: Ray's start-up (processes, mostly waiting) and the
    driver's imports of torch and torch_geometric (CPU) then overlap instead of following each other. Measured on a
    2-core machine (``benchmarks/engines.py``): the first round about 5 s instead of 9 s, the whole 20-round run
    under 1 s faster (median 32.9 s vs 33.6 s). Ray's worker processes inherit
    OMP_NUM_THREADS as set here and the ClientApp's thread policy caps torch's threads by it, so each actor's
    threads equal the CPUs it reserves (``client_resources`` num_cpus = ``cpus_per_site``)."""
    import threading

    import ray

    init_args: dict = {"log_to_driver": verbose}
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["include_dashboard"] = False
    if ray.is_initialized():
        return init_args
    warm = threading.Thread(target=_import_training_stack if warm_imports else lambda: None,
                            name="import-training-stack", daemon=True)
    warm.start()
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus_per_site)))
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
        warm.join()
    return init_args


class _HistoryWatcher:
    """Calls ``on_round`` for each round record that appears in a history.json written atomically per round."""

    def __init__(self, path: str, on_round: Callable[[dict], None], interval: float = 0.2):
        import threading

        self.path, self.on_round, self.interval, self.seen = path, on_round, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            with open(self.path) as fh:
                history = json.load(fh)
        except (OSError, ValueError):
            return
        for record in history[self.seen:]:
            self.on_round(record)
        self.seen = max(self.seen, len(history))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
