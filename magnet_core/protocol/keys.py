"""Every key a message, a site's node config or a site's own state uses, named once; and the protocol version.

A Flower message is a RecordDict of named records (``*_KEY`` below); each record holds named fields (the typed
message classes of this package encode and decode them: ``messages``, ``secagg``, ``prepare``). client/, server/
and simulations/ use these names, never the strings (tests/test_boundaries.py checks it).
"""

from __future__ import annotations

# The protocol version: the coordinator sends it in every round, secure-aggregation and preparation message, the
# site refuses any other; a site's replies carry it back and the coordinator refuses any other. The site worker
# link (client/worker_link.py) carries it in every frame. Raise it whenever a message changes.
PROTOCOL_VERSION = "magnet-fl/6"
VERSION_KEY = "protocol"  # the field that carries PROTOCOL_VERSION in a record / a worker frame header

# ------------------------------------------------------------------------------------ records of a message
ARRAYS_KEY = "arrays"  # ArrayRecord: the flat model (server -> site, site -> server)
CONFIG_KEY = "config"  # ConfigRecord: the round / preparation config (server -> site)
METRICS_KEY = "metrics"  # MetricRecord: a train / evaluation reply's counts (site -> server)
SITE_KEY = "site"  # ConfigRecord: who replies (site -> server)
LAYOUT_KEY = "layout"  # ConfigRecord: the flat model's layout / the statistics' layout (server -> site)
SECAGG_KEY = "secagg"  # ConfigRecord: a secure-aggregation stage's message (both ways)
MASKED_KEY = "masked"  # ArrayRecord (and its one array): a site's masked vector (site -> server)
FEATURES_KEY = "features"  # ConfigRecord: modality -> feature names (preparation, site -> server)
STATS_KEY = "stats"  # ArrayRecord: k-released statistics, "<modality>/<field>" (preparation, site -> server)
MODEL_KEY = "model"  # the one array of a model ArrayRecord (both ways)

# ------------------------------------------------------------------------------------ fields every side reads
NAME_FIELD = "name"  # site record: the site's name (a label; the coordinator decides by node id)

# ------------------------------------------------------------------------------------ message types
TRAIN = "train"  # Flower message categories
EVALUATE = "evaluate"
QUERY = "query"
SECAGG_ACTION = "secagg"  # train.secagg / evaluate.secagg: stage 0 of a secure training / evaluation round
SECAGG_SHARE = "secagg_share"  # query.secagg_share / secagg_mask / secagg_unmask: stages 1-3 of any secure sum
SECAGG_MASK = "secagg_mask"
SECAGG_UNMASK = "secagg_unmask"
SECAGG_CONSISTENCY = "secagg_consistency"  # query.secagg_consistency: stage 3a, authenticated only: sign U3
SECAGG_EXCLUDE = "secagg_exclude"  # query.secagg_exclude: stage 4b, only after a dealer's shares were refuted
PREPARE_STATS = "prepare_stats"  # query.prepare_*: federated preparation
PREPARE_SECAGG = "prepare_secagg"
PREPARE_APPLY = "prepare_apply"


def message_type(category: str, action: str = "") -> str:
    """Flower's message type: ``category`` alone, or ``category.action``."""
    return f"{category}.{action}" if action else category


# ------------------------------------------------------------------------------------ a site's node config
# Set by the site's operator (SuperNode --node-config) or by the simulation engine; never by the coordinator.
NODE_DATA_DIR = "data-dir"  # deployment: the site's prepared data folder
NODE_MANIFEST = "manifest"  # deployment: the consortium manifest (TOML)
NODE_SITE_NAME = "site-name"
NODE_PARTITION_ID = "partition-id"  # simulation: which simulated site this node is
NODE_NUM_PARTITIONS = "num-partitions"  # simulation: how many simulated sites there are
NODE_WORKER_SOCKET = "worker-socket"  # deployment: the site worker's Unix socket
NODE_WORKER_TIMEOUT = "worker-timeout"  # seconds the worker may take per message
NODE_WORKER_CONNECT_TIMEOUT = "worker-connect-timeout"  # seconds to reach the worker
NODE_SITE_LOG_DIR = "site-log-dir"  # where the site keeps site_log.jsonl
NODE_DP_FLOOR = "dp-min-noise-multiplier"  # the site trains only under secagg + DP with at least this multiplier
NODE_RAW_DIR = "raw-dir"  # preparation: the site's raw data folder
NODE_PREPARED_DIR = "prepared-dir"  # preparation: where the site writes its prepared data
NODE_PREPARE_REQUIRE_SECAGG = "prepare-require-secagg"  # preparation: answer only a secure preparation
NODE_SECAGG_ROSTER = "secagg-roster"  # the consortium roster (registered_sites.csv): authenticated secure aggregation
NODE_SECAGG_IDENTITY_KEY = "secagg-identity-key"  # the site's enrolled identity private key (signs its secagg keys)
WORKER_LINK_KEYS = (NODE_WORKER_SOCKET, NODE_WORKER_TIMEOUT, NODE_WORKER_CONNECT_TIMEOUT)  # not sent to the worker
DEPLOYED_KEYS = frozenset({NODE_DATA_DIR, NODE_WORKER_SOCKET})  # a site holding its own data (not a simulation)
# What the site worker takes only from its own configuration (its command line, its policy), never from the node
# config the coordinator's bundle forwards: the forwarded values of these keys are dropped by the worker.
WORKER_OWNED_KEYS = frozenset({NODE_SITE_LOG_DIR, NODE_PREPARE_REQUIRE_SECAGG, NODE_RAW_DIR, NODE_PREPARED_DIR,
                               NODE_PARTITION_ID, NODE_NUM_PARTITIONS})

# ------------------------------------------------------------------------------------ a site's own state
# context.state records (private to the site; never sent)
STATE_SECAGG = "secagg"  # ConfigRecord: round id + the serialised SecAggSite (private keys)
STATE_SECAGG_SITE = "site"  # its field holding the SecAggSite
STATE_SECAGG_IDENTITY = "identity"  # its field: the site name it signs as ("" = unauthenticated sum)
STATE_VECTOR = "secagg-vector"  # ArrayRecord: the site's vector until it is masked
STATE_VECTOR_ARRAY = "vector"  # its one array
STATE_PREPARE_SUMMED = "prepare-secure-sum"  # ConfigRecord: this site already contributed to a secure sum
STATE_DONE = "done"  # its one field
