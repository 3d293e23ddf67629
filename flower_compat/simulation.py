"""Flower 1.41's simulation engine with a run config, and what messages made outside a SuperLink need (simulations)."""

from __future__ import annotations

import os

from flwr.app import Context, Message, RecordDict

# (importing this module runs flower_compat/__init__.py first: the Flower version is checked before these imports)
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import _run_simulation  # the public wrapper takes no run config
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType


def enter_task_identity(run_id: int = 1) -> None:
    """Messages created outside a SuperLink need a task identity (this process acts as the SuperLink's task of run
    ``run_id``), as in Flower's own legacy simulation API."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


def set_message_id(msg: Message, message_id: str) -> None:
    """Give a message the id a SuperLink would (Flower keeps it in a private attribute of the metadata)."""
    msg.metadata.__dict__["_message_id"] = message_id


def run_simulation(server_app, client_app, run_config: dict, num_supernodes: int, backend_config: dict,
                   verbose: bool = False) -> None:
    """Run a ServerApp/ClientApp pair on Flower's simulation engine with ``run_config`` as the ServerApp's Flower
    run config (Flower's public ``run_simulation`` has no run config argument)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    enter_task_identity(run.run_id)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app, server_app=server_app, server_app_context=context, run=run,
                    backend_config=backend_config, verbose_logging=verbose)
