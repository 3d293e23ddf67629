"""``magnet-fl site-worker``: the site's own long-lived process, installed and started by the hospital. It alone
reads the site's data, keys and state: it keeps the data, graphs and libraries loaded and answers every message the
per-message ClientApp (the coordinator's bundle) forwards over a Unix socket that only this user can open, as an
untrusted request checked against the contract and the site's policy (``--policy``, the worker's own command line),
audited in the site's audit log."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context, Message, RecordDict
from google.protobuf.message import DecodeError

from flower_compat.wire import message_of, recorddict_bytes
from magnet_core.artefacts.processes import process_alive
from magnet_core.federation.secagg_auth import Roster, SiteAuth, SiteIdentity
from magnet_core.protocol.errors import CONTRACT_ERROR_CODE, WORKER_ERROR_CODE, ContractError
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    NODE_DATA_DIR,
    NODE_DP_FLOOR,
    NODE_MANIFEST,
    NODE_PREPARE_REQUIRE_SECAGG,
    NODE_PREPARED_DIR,
    NODE_RAW_DIR,
    NODE_SECAGG_IDENTITY_KEY,
    NODE_SECAGG_ROSTER,
    NODE_SITE_LOG_DIR,
    NODE_SITE_NAME,
    WORKER_OWNED_KEYS,
)
from magnet_core.protocol.messages import round_of
from magnet_core.protocol.worker import (
    CONTENT_PAYLOAD,
    MESSAGE_PAYLOAD,
    PING,
    WorkerAnswer,
    WorkerRequest,
    WorkerStatus,
)

from .guard import refused_before_screening
from .policy import POLICY_KEY, load_policy
from .prepare_app import HANDLERS as PREPARE_HANDLERS
from .site_handlers import HANDLERS
from .site_path import serve
from .worker_link import MAX_PAYLOAD_BYTES, FrameError, check_private_dir, encode_frame, recv_frame

log = logging.getLogger("magnet_fl.site_worker")
LOG_FORMAT = "%(asctime)s %(levelname)s site-worker[%(process)d]: %(message)s"
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request / read the answer
MAX_RUNS = 8  # runs whose state (secure-aggregation secrets between stages) the worker keeps in memory
# every message a site answers: training / evaluation and the secure sums' stages, and the preparation queries
WORKER_HANDLERS = {**HANDLERS, **PREPARE_HANDLERS}


# ------------------------------------------------------------------------------------------------ the socket


def bind_private_socket(path: Path, wait: float = 0.0) -> tuple[socket.socket, int]:
    """Listen on ``path`` (mode 0600) inside a directory only this user can open (created 0700 if absent).

    One worker per socket: a lock file next to the socket is held for the worker's life. If another live worker
    still holds it after ``wait`` seconds, FileExistsError; a socket file left by a dead worker is removed (only
    if it is this user's socket).
    Returns the listening socket and the lock's file descriptor (keep it open)."""
    path = Path(path).absolute()
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes (a Unix socket limit); "
                         f"choose a shorter one")
    directory = path.parent
    if not os.path.lexists(directory):
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)
    check_private_dir(directory)
    lock_path = directory / f"{path.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"another site worker (pid {other}) is serving {path}; stop it first or give "
                                  f"another --socket") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
                raise FileExistsError(f"{path} exists and is not a socket of this user; remove it by hand")
            os.unlink(path)  # we hold the lock, so no live worker owns it
            log.warning("removed the stale socket %s left by a worker that is gone", path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window in which others could connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        os.close(fd)
        raise
    return sock, fd


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user id (Linux SO_PEERCRED), or None where the platform cannot tell."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


# ------------------------------------------------------------------------------------------------ stale data


def fingerprint(data: Path, manifest: Path) -> str:
    """Every file under the data folder (relative path, size, mtime) and the manifest (size, mtime, SHA-256)."""
    h = hashlib.sha256()
    try:
        files = sorted(p for p in data.rglob("*") if p.is_file())
    except OSError as exc:
        files = []
        h.update(f"unreadable {exc}".encode())
    for p in files:
        try:
            st = p.stat()
            h.update(f"{p.relative_to(data)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p.relative_to(data)}\0gone\n".encode())
    try:
        st = manifest.stat()
        h.update(f"manifest\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        h.update(hashlib.sha256(manifest.read_bytes()).digest())
    except OSError:
        h.update(b"manifest missing")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the worker


class NodeConfigRefused(Exception):
    """A request whose node config names another folder, manifest, site name or policy than this worker's own."""


class SiteWorker:
    """One site's data folder, manifest and policy, served for many messages. Every message takes the site's one
    path (client/site_path.py ``serve``) in this process: the policy check, the privacy accountant and the audit log
    run here, under the policy of the worker's own command line; the secure-aggregation state of each run is kept
    here, in this process's memory. The site (cohort, graphs, model) is built by client.handlers on the first
    message of each (seed, preset) and rebuilt when the data change."""

    def __init__(self, data: Path, manifest: Path, site_name: str = "", policy: Path | None = None,
                 max_payload: int = MAX_PAYLOAD_BYTES, max_runs: int = MAX_RUNS,
                 secagg_roster: Path | None = None, identity_key: Path | None = None,
                 dp_floor: float | None = None, raw_dir: Path | None = None, site_log_dir: Path | None = None,
                 prepare_require_secagg: bool = False):
        self.data, self.manifest = Path(data).resolve(), Path(manifest).resolve()
        # preparation (its raw data folder; it writes the prepared cohort to --data), the site's message log and
        # its preparation rule: held here, from the worker's own command line; forwarded values are dropped
        self.raw_dir = None if raw_dir is None else Path(raw_dir).resolve()
        self.site_log_dir = None if site_log_dir is None else Path(site_log_dir).resolve()
        self.prepare_require_secagg = bool(prepare_require_secagg)
        self.policy = None if policy is None else Path(policy).resolve()
        if (secagg_roster is None) != (identity_key is None):
            raise ValueError("authenticated secure aggregation needs both --secagg-roster and --identity-key")
        # the site's identity key and its roster: held here, from the worker's own command line, never a request's
        self.secagg = {} if secagg_roster is None else {NODE_SECAGG_ROSTER: str(Path(secagg_roster).resolve()),
                                                        NODE_SECAGG_IDENTITY_KEY: str(Path(identity_key).resolve())}
        self.site_name, self.max_payload, self.max_runs = site_name, max_payload, max_runs
        if dp_floor is not None and not dp_floor >= 0:
            raise ValueError(f"--dp-min-noise-multiplier must be >= 0, got {dp_floor}")
        self.dp_floor = dp_floor  # the site's DP floor from its own command line: a request's value cannot lower it
        self.fingerprint = fingerprint(self.data, self.manifest)
        self.requests = 0
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.states: OrderedDict[int, RecordDict] = OrderedDict()  # run id -> the site's state for that run

    # -- requests

    def own(self) -> dict[str, str]:
        """The node config keys this worker holds itself (its command line), never the request's."""
        out = {NODE_DATA_DIR: str(self.data), NODE_MANIFEST: str(self.manifest)}
        if self.site_name:
            out[NODE_SITE_NAME] = self.site_name
        if self.policy is not None:
            out[POLICY_KEY] = str(self.policy)
        out.update(self.secagg)
        if self.dp_floor is not None:
            out[NODE_DP_FLOOR] = self.dp_floor
        if self.raw_dir is not None:
            out[NODE_RAW_DIR], out[NODE_PREPARED_DIR] = str(self.raw_dir), str(self.data)
        if self.site_log_dir is not None:
            out[NODE_SITE_LOG_DIR] = str(self.site_log_dir)
        if self.prepare_require_secagg:
            out[NODE_PREPARE_REQUIRE_SECAGG] = True
        return out

    def node_config(self, given: Mapping[str, Any]) -> dict:
        """The request's node config with this worker's own folder, manifest, site name and policy. A request that
        names others is refused: NodeConfigRefused (the bundle cannot choose the site's data or its policy)."""
        for key, own in ((NODE_DATA_DIR, self.data), (NODE_MANIFEST, self.manifest)):
            if key in given and Path(str(given[key])).resolve() != own:
                raise NodeConfigRefused(f"the SuperNode's node config {key}={str(given[key])!r} is not the "
                                        f"{'folder' if key == NODE_DATA_DIR else 'manifest'} this site worker "
                                        f"serves ({own}); start the worker on the same --data and --manifest")
        if self.site_name and given.get(NODE_SITE_NAME, self.site_name) != self.site_name:
            raise NodeConfigRefused(f"the SuperNode's site-name {given[NODE_SITE_NAME]!r} is not the worker's "
                                    f"--site-name {self.site_name!r}")
        if POLICY_KEY in given and (self.policy is None or Path(str(given[POLICY_KEY])).resolve() != self.policy):
            mine = f"the policy {self.policy}" if self.policy else "no policy"
            raise NodeConfigRefused(f"the request names the site policy {str(given[POLICY_KEY])!r}; this site "
                                    f"worker enforces {mine} (its --policy): a site's policy is given to its "
                                    f"worker, never chosen by the request")
        for key in (NODE_SECAGG_ROSTER, NODE_SECAGG_IDENTITY_KEY):
            if key in given and Path(str(given[key])).resolve() != Path(self.secagg.get(key, "/nonexistent")):
                raise NodeConfigRefused(f"the request names {key}={str(given[key])!r}; this site worker signs with "
                                        f"{'its own --secagg-roster / --identity-key' if self.secagg else 'no key'}: "
                                        "a site's identity key and roster are given to its worker, never chosen by "
                                        "the request")
        dropped = sorted(set(given) & WORKER_OWNED_KEYS)
        if dropped:  # the site's own settings: a forwarded value neither sets nor lifts them
            log.warning("ignored the forwarded node config %s: this site worker takes them from its own command "
                        "line only", ", ".join(dropped))
        return {**{k: v for k, v in given.items() if k not in WORKER_OWNED_KEYS}, **self.own()}

    def context(self, run_id: int, node_id: int, node_config: dict) -> Context:
        """The site's context for a message of run ``run_id``: its state is this worker's memory of that run (the
        last ``max_runs`` runs are kept)."""
        state = self.states.pop(run_id, None)
        self.states[run_id] = RecordDict() if state is None else state
        while len(self.states) > self.max_runs:
            self.states.popitem(last=False)
        return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=self.states[run_id],
                       run_config={})

    def refresh(self) -> None:
        """Forget the built site when the data folder or the manifest changed since the last message."""
        now = fingerprint(self.data, self.manifest)
        if now != self.fingerprint:
            from .handlers import forget_sites

            log.warning("data or manifest changed (fingerprint %s -> %s): reloading and revalidating the site",
                        self.fingerprint, now)
            forget_sites()
            self.fingerprint = now

    def status(self) -> WorkerStatus:
        return WorkerStatus(pid=os.getpid(), data=str(self.data), manifest=str(self.manifest), site=self.site_name,
                            policy=None if self.policy is None else str(self.policy), fingerprint=self.fingerprint,
                            requests=self.requests, started=self.started)

    def answer(self, request: WorkerRequest, payloads: Mapping[str, bytes]) -> tuple[WorkerAnswer, dict[str, bytes]]:
        """The answer to one request; never raises (an error becomes an error answer)."""
        if request.kind == PING:
            return WorkerAnswer(ok=True, status=self.status()), {}
        try:
            msg = decode_message(payloads.get(MESSAGE_PAYLOAD))
        except ContractError as exc:
            log.warning("request refused: %s", exc)
            return WorkerAnswer(ok=False, code=CONTRACT_ERROR_CODE, reason=str(exc)), {}
        t0, kind = time.monotonic(), msg.metadata.message_type[:64]
        config = msg.content.config_records.get(CONFIG_KEY) if msg.has_content() else None
        what = (f"{kind} message (run {msg.metadata.run_id}, round {round_of(config)}, node {request.node_id})")
        try:
            try:
                node_config = self.node_config(request.node_config)
            except NodeConfigRefused as exc:
                ctx = self.context(int(msg.metadata.run_id), request.node_id, self.own())
                reply = refused_before_screening(msg, ctx, WORKER_ERROR_CODE, str(exc), "site-worker.node_config")
            else:
                self.refresh()
                reply = serve(msg, self.context(int(msg.metadata.run_id), request.node_id, node_config),
                              WORKER_HANDLERS)
        except Exception as exc:  # noqa: BLE001 - the worker outlives any one message
            log.exception("%s failed", what)
            return WorkerAnswer(ok=False, code=WORKER_ERROR_CODE,
                                reason=f"site worker failed on this message ({type(exc).__name__}: {exc})"), {}
        self.requests += 1
        if reply.has_error():
            log.warning("%s -> error %s in %.2f s: %s", what, reply.error.code, time.monotonic() - t0,
                        reply.error.reason.splitlines()[0] if reply.error.reason else "")
            return WorkerAnswer(ok=False, code=int(reply.error.code), reason=str(reply.error.reason)), {}
        log.info("%s answered in %.2f s", what, time.monotonic() - t0)
        return WorkerAnswer(ok=True), {CONTENT_PAYLOAD: recorddict_bytes(reply.content)}

    # -- serving

    def serve_one(self, conn: socket.socket, timeout: float = REQUEST_TIMEOUT) -> None:
        """Read one request from ``conn``, answer it. Malformed input gets an error answer; nothing raises."""
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from user id %s (this worker serves user id %s only)", uid,
                        os.getuid())
            return
        conn.settimeout(timeout)
        out: dict[str, bytes] = {}
        try:
            request, payloads = recv_frame(conn, WorkerRequest, "request to the site worker", self.max_payload)
        except FrameError as exc:
            log.warning("malformed request: %s", exc)
            reply = WorkerAnswer(ok=False, code=WORKER_ERROR_CODE, reason=f"malformed request to the site worker: "
                                                                          f"{exc}")
        except ContractError as exc:  # another protocol version, or a header of the wrong shape
            log.warning("request refused: %s", exc)
            reply = WorkerAnswer(ok=False, code=WORKER_ERROR_CODE,
                                 reason=f"{exc}; run the SuperNode and the site worker on the same magnet-fl")
        except (socket.timeout, OSError) as exc:
            log.warning("request not received: %s", exc or type(exc).__name__)
            return
        else:
            reply, out = self.answer(request, payloads)
        try:
            frame = encode_frame(reply, out)
        except (FrameError, ValueError) as exc:
            log.error("cannot encode the answer: %s", exc)
            frame = encode_frame(WorkerAnswer(ok=False, code=WORKER_ERROR_CODE,
                                              reason=f"site worker cannot encode its answer: {exc}"))
        try:
            conn.settimeout(timeout)
            conn.sendall(frame)
        except (socket.timeout, OSError) as exc:
            log.warning("the answer could not be sent (the ClientApp gave up or died?): %s",
                        exc or type(exc).__name__)

    def serve(self, listener: socket.socket, stop: Callable[[], bool]) -> None:
        """Answer connections one at a time until ``stop()`` (checked at least every second)."""
        listener.settimeout(1.0)
        while not stop():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                log.error("accept failed: %s", exc)
                time.sleep(0.5)
                continue
            with conn:
                self.serve_one(conn)


def decode_message(data: bytes | None) -> Message:
    """The Flower message a request carries (Flower's protobuf); ContractError when absent or unreadable."""
    if data is None:
        raise ContractError(f"the request carries no message (payload {MESSAGE_PAYLOAD!r})")
    try:
        msg = message_of(data)
    except (DecodeError, ValueError, TypeError, KeyError) as exc:
        raise ContractError(f"the request's message is not a Flower message ({type(exc).__name__}: {exc})") \
            from None
    if msg.has_error():
        raise ContractError("the request's message is an error message, not a request")
    return msg


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, required=True,
                   help="Unix socket path; its folder must be this user's only (created with mode 0700)")
    p.add_argument("--data", type=Path, required=True, help="the site's prepared data folder")
    p.add_argument("--manifest", type=Path, required=True, help="the consortium manifest (TOML)")
    p.add_argument("--site-name", default="", help="the site's name (default: the SuperNode's node config)")
    p.add_argument("--policy", type=Path, default=None,
                   help="the site's policy file (`magnet-fl site policy init`): every message is checked against "
                        "it and recorded in the site's audit log, here; a request that names another is refused")
    p.add_argument("--dp-min-noise-multiplier", type=float, default=None, metavar="Z",
                   help="the site's DP floor: train only under secure aggregation with distributed DP of at least this "
                        "noise multiplier; held here, so the SuperNode's forwarded node config cannot lower or drop it")
    p.add_argument("--secagg-roster", type=Path, default=None,
                   help="the consortium roster (registered_sites.csv from the PKI): authenticated secure "
                        "aggregation, every other site's keys checked against it (with --identity-key)")
    p.add_argument("--identity-key", type=Path, default=None,
                   help="this site's enrolled private key (BUNDLE/node_auth_key): signs its secure-aggregation keys, "
                        "shares and transcript (with --secagg-roster)")
    p.add_argument("--raw-dir", type=Path, default=None,
                   help="the site's raw data folder: this worker answers the federated preparation from it and writes "
                        "the prepared cohort to --data (which may then be empty at start)")
    p.add_argument("--prepare-require-secagg", action="store_true",
                   help="send preparation statistics only through a secure sum (also the policy's "
                        "secure_aggregation.prepare); held here, a forwarded node config cannot lift it")
    p.add_argument("--site-log-dir", type=Path, default=None,
                   help="keep the site's own message log (site_log.jsonl) here; a forwarded node config cannot "
                        "move or drop it")
    p.add_argument("--exit-with", type=int, default=None, metavar="PID",
                   help="exit when this process (e.g. the SuperNode) is gone")
    p.add_argument("--takeover-wait", type=float, default=5.0, metavar="SECONDS",
                   help="if a previous worker still holds the socket, wait this long for it to exit (default 5)")
    p.add_argument("--log-file", type=Path, default=None, help="also append the log to this file")
    p.add_argument("--max-message-mb", type=int, default=MAX_PAYLOAD_BYTES >> 20,
                   help=f"largest array payload accepted per message (default {MAX_PAYLOAD_BYTES >> 20})")


def check_secagg_identity(roster: Path | None, key: Path | None, site_name: str) -> None:
    """The worker's roster and identity key load and belong together (the roster's key for ``site_name`` is this
    key); a clear error naming the option otherwise."""
    if roster is None or key is None:
        raise ValueError("authenticated secure aggregation needs both --secagg-roster and --identity-key")
    if not site_name:
        raise ValueError("--secagg-roster / --identity-key need --site-name (the name the roster lists)")
    SiteAuth(SiteIdentity.from_key_file(site_name, key), Roster.from_file(roster))


def setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_file)
    if args.max_message_mb < 1:
        raise ValueError(f"--max-message-mb must be at least 1, got {args.max_message_mb}")
    t0 = time.monotonic()
    data, manifest = args.data.resolve(), args.manifest.resolve()
    # the socket first: a refused directory or a live worker on it stops here, before seconds of imports;
    # a ClientApp that connects meanwhile waits in the backlog and is answered once the site is ready
    listener, lock = bind_private_socket(args.socket, max(0.0, args.takeover_wait))
    path = Path(args.socket).absolute()
    inode = os.stat(path).st_ino
    stopping: list[str] = []
    worker: SiteWorker | None = None

    def on_signal(signum, _frame):
        stopping.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def stop() -> bool:
        if args.exit_with is not None and not process_alive(args.exit_with) and not stopping:
            stopping.append(f"process {args.exit_with} exited")
        return bool(stopping)

    try:
        import torch  # the libraries, once for the worker's life

        from magnet_core.cohort.manifest import ConsortiumManifest
        from magnet_core.cohort.validation import validate_site

        from . import handlers  # noqa: F401 - imports magnet_core.model.site (training)

        policy = None
        if args.policy is not None:  # a policy the worker cannot read stops it here, not at the first message
            policy = args.policy.resolve()
            loaded = load_policy(policy)
            log.info("enforcing the site policy %s (consortium %r, state folder %s)", policy, loaded.consortium,
                     loaded.state_path())
        unprepared = args.raw_dir is not None and not (data / "labels.csv").exists()
        if unprepared:  # a worker for the preparation: the prepared cohort (and perhaps the manifest) come later
            log.warning("%s holds no prepared cohort yet: preparation is answered from %s; rounds are refused "
                        "until it is written", data, args.raw_dir.resolve())
        report, _ = (None, None) if unprepared else validate_site(data, ConsortiumManifest.load(manifest))
        if report is not None and not report.ok:
            for e in report.errors:
                log.error("site data: %s", e)
            log.error("site data in %s failed validation; the worker does not start", data)
            return 1
        if args.secagg_roster is not None or args.identity_key is not None:  # unreadable: stop here, not mid-round
            check_secagg_identity(args.secagg_roster, args.identity_key, args.site_name)
        worker = SiteWorker(data, manifest, args.site_name, policy, args.max_message_mb << 20,
                            secagg_roster=args.secagg_roster, identity_key=args.identity_key,
                            dp_floor=args.dp_min_noise_multiplier, raw_dir=args.raw_dir,
                            site_log_dir=args.site_log_dir, prepare_require_secagg=args.prepare_require_secagg)
        log.info("serving %s on %s (pid %d, torch %s, %d thread(s), data fingerprint %s; ready after %.1f s)",
                 data, path, os.getpid(), torch.__version__, torch.get_num_threads(), worker.fingerprint,
                 time.monotonic() - t0)
        worker.serve(listener, stop)
    finally:
        listener.close()
        try:
            if os.lstat(path).st_ino == inode:  # still ours (not a successor's)
                os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(lock)
        if worker is None:
            log.info("stopped before serving")
        else:
            log.info("stopped (%s) after %d message(s)", ", ".join(stopping) or "error", worker.requests)
    return 0
