"""Every message a site answers in a training run, by message type: the table of the ClientApp (client/app.py, in
simulation) and of the site's own worker (client/worker.py, in deployment)."""

from __future__ import annotations

from . import rounds, secure
from .site_path import Handler

HANDLERS: dict[str, Handler] = {**rounds.HANDLERS, **secure.HANDLERS}
