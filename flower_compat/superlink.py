"""Flower 1.41's SuperLink application, built by Flower from its own command-line flags (coordinator side)."""

from __future__ import annotations

import importlib
import sys

# (importing this module runs flower_compat/__init__.py first: the Flower version is checked before these imports)
from flwr.supercore.http_logging import get_uvicorn_log_config
from flwr.supercore.logger import console_handler
from flwr.superlink.main import create_app

# `flwr.superlink.cli` re-exports a *function* named flower_superlink over its module of the same name
superlink_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")


def superlink_app(flower_args: list[str]):
    """(ASGI app, Flower's parsed config) for ``flower-superlink FLOWER_ARGS``: Flower's own parsing and checks
    of its flags, then its own application (Fleet, Control and Runtime APIs)."""
    argv, sys.argv = sys.argv, ["flower-superlink", *flower_args]
    try:
        config = superlink_cli._parse_superlink_lifespan_config()
    finally:
        sys.argv = argv
    return create_app(config, superlink_cli.SuperLinkLifespan), config


def uvicorn_log_config() -> dict:
    """The uvicorn logging configuration Flower's own SuperLink uses, at Flower's console log level."""
    return get_uvicorn_log_config(console_handler.level)
