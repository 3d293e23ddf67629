"""magnet-fl ClientApp: a site loads only its own patients, trains locally and evaluates with counts.

Every message takes the site's one path (client/site_path.py): in simulation this process answers it behind the
site's policy and audit log; in deployment (node config ``worker-socket``) it only forwards the message to the site's
own worker, which decodes, checks, answers and audits it."""

from __future__ import annotations

from flwr.app import Context, Message

from magnet_core.protocol.keys import CONFIG_KEY, LAYOUT_KEY, TRAIN

from .site_handlers import HANDLERS
from .site_path import client_app


def optional_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` when the server asks for clipping (differential privacy on), else a no-op."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    # Flower's mod wants exactly one ConfigRecord: the model layout is set aside for it and handed back to the app
    layout = msg.content.config_records.get(LAYOUT_KEY)
    if layout is not None:
        del msg.content[LAYOUT_KEY]

    def with_layout(m: Message, c: Context) -> Message:
        if layout is not None:
            m.content[LAYOUT_KEY] = layout
        return call_next(m, c)

    return fixedclipping_mod(msg, context, with_layout)


app = client_app(HANDLERS, mods={TRAIN: [optional_clipping_mod]})
