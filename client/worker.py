"""``magnet-fl site-worker``: a site's long-lived process that keeps its data, graphs and libraries loaded and
answers the per-message ClientApp over a Unix socket that only this user can open."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import logging
import os
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    EVALUATE,
    LAYOUT_KEY,
    METRICS_KEY,
    NODE_DATA_DIR,
    NODE_MANIFEST,
    NODE_SITE_NAME,
    SITE_KEY,
    TRAIN,
)
from magnet_core.protocol.version import check_version

from .worker_link import MAX_PAYLOAD_BYTES, Blob, FrameError, check_private_dir, encode_frame, flat_record, recv_frame

log = logging.getLogger("magnet_fl.site_worker")
LOG_FORMAT = "%(asctime)s %(levelname)s site-worker[%(process)d]: %(message)s"
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request / read the answer


class RequestError(Exception):
    """A request the worker answers with an error: ``kind`` is "request", "contract", "data" or "worker"."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


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


def _array(blob: Blob) -> np.ndarray:
    """A received .npy array, exactly as Flower's Array.numpy() builds it."""
    try:
        arr = np.load(io.BytesIO(blob.data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any broken bytes are the sender's error
        raise RequestError("contract", f"round message rejected: array {blob.name!r} is not a valid .npy array "
                                       f"({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray) or str(arr.dtype) != blob.dtype or tuple(arr.shape) != blob.shape:
        raise RequestError("contract", f"round message rejected: array {blob.name!r} does not match its declared "
                                       f"dtype {blob.dtype} and shape {list(blob.shape)}")
    return arr


def _blob(name: str, arr: np.ndarray) -> Blob:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return Blob(name, str(arr.dtype), tuple(arr.shape), buf.getvalue())


class SiteWorker:
    """One site's data folder and manifest, served for many messages; the site (cohort, graphs, model) is built
    by client.handlers on the first message of each (seed, preset) and rebuilt when the data change."""

    def __init__(self, data: Path, manifest: Path, site_name: str = "", max_payload: int = MAX_PAYLOAD_BYTES):
        self.data, self.manifest = Path(data).resolve(), Path(manifest).resolve()
        self.site_name, self.max_payload = site_name, max_payload
        self.fingerprint = fingerprint(self.data, self.manifest)
        self.requests = 0
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # -- requests

    def node_config(self, given: Any) -> dict:
        """The SuperNode's node config, with this worker's folder and manifest (which it must agree with)."""
        if not isinstance(given, dict):
            raise RequestError("request", "'node_config' must be an object")
        for key, own in ((NODE_DATA_DIR, self.data), (NODE_MANIFEST, self.manifest)):
            if key in given and Path(str(given[key])).resolve() != own:
                raise RequestError("worker", f"the SuperNode's node config {key}={given[key]!r} is not the "
                                             f"{'folder' if key == NODE_DATA_DIR else 'manifest'} this site worker "
                                             f"serves ({own}); start the worker on the same --data and --manifest")
        if self.site_name and given.get(NODE_SITE_NAME, self.site_name) != self.site_name:
            raise RequestError("worker", f"the SuperNode's site-name {given[NODE_SITE_NAME]!r} is not the worker's "
                                         f"--site-name {self.site_name!r}")
        out = {**given, NODE_DATA_DIR: str(self.data), NODE_MANIFEST: str(self.manifest)}
        if self.site_name:
            out[NODE_SITE_NAME] = self.site_name
        return out

    def refresh(self) -> None:
        """Forget the built site when the data folder or the manifest changed since the last message."""
        now = fingerprint(self.data, self.manifest)
        if now != self.fingerprint:
            from .handlers import forget_sites

            log.warning("data or manifest changed (fingerprint %s -> %s): reloading and revalidating the site",
                        self.fingerprint, now)
            forget_sites()
            self.fingerprint = now

    def status(self) -> dict:
        return {"ok": True, "pid": os.getpid(), "data": str(self.data), "manifest": str(self.manifest),
                "site": self.site_name, "fingerprint": self.fingerprint, "requests": self.requests,
                "started": self.started}

    def answer(self, header: dict, blobs: list[Blob]) -> tuple[dict, list[Blob]]:
        """The reply to one request; never raises (an error becomes an error answer)."""
        kind = header.get("kind")
        try:
            check_version(header, "request to the site worker")
        except ContractError as exc:
            log.warning("%s request refused: %s", str(kind)[:40], exc)
            return {"ok": False, "error": "request", "reason": f"{exc}; restart the site worker with the "
                                                              f"SuperNode's magnet-fl"}, []
        if kind == "ping":
            return self.status(), []
        t0 = time.monotonic()
        what = f"{str(kind)[:40]} message"
        try:
            if kind not in (TRAIN, EVALUATE):
                raise RequestError("request", f"unknown request kind {str(kind)[:40]!r} (train, evaluate or ping)")
            out, what = self._run(kind, header, blobs)
        except RequestError as exc:
            log.warning("%s -> %s error: %s", what, exc.kind, exc.reason.splitlines()[0])
            return {"ok": False, "error": exc.kind, "reason": exc.reason}, []
        except Exception as exc:  # noqa: BLE001 - the worker outlives any one message
            log.exception("%s failed", what)
            return {"ok": False, "error": "worker",
                    "reason": f"site worker failed on this message ({type(exc).__name__}: {exc})"}, []
        self.requests += 1
        log.info("%s answered in %.2f s", what, time.monotonic() - t0)
        return out

    def _run(self, kind: str, header: dict, blobs: list[Blob]) -> tuple[tuple[dict, list[Blob]], str]:
        from magnet_core.cohort.data import DataError
        from magnet_core.protocol.messages import RoundConfig
        from magnet_core.protocol.wire import MODEL_KEY, check_model_keys

        from .handlers import evaluate_site, site_for, train_site

        config, node_id = header.get(CONFIG_KEY), header.get("node_id")
        if not isinstance(config, dict):
            raise RequestError("request", "'config' must be an object")
        if not isinstance(node_id, int) or isinstance(node_id, bool):
            raise RequestError("request", "'node_id' must be an integer")
        try:
            cfg = RoundConfig.decode(config)
        except ContractError as exc:
            raise RequestError("contract", f"round config rejected: {exc}") from None
        what = f"{kind} message (round {cfg.server_round}, seed {cfg.seed}, node {node_id})"
        node_config = self.node_config(header.get("node_config", {}))
        self.refresh()
        try:
            site_for(cfg, node_config, node_id)  # loads and validates the site's data once (per seed, preset)
            if not header.get("has_arrays"):
                raise RequestError("contract", "round message rejected: no model weights ('arrays')")
            layout = header.get(LAYOUT_KEY)
            if not isinstance(layout, dict):
                raise RequestError("contract", f"round message rejected: no model layout ({LAYOUT_KEY!r})")
            check_model_keys([b.name for b in blobs])
            flat = _array(blobs[0])
            if kind == TRAIN:
                metrics, site, new = train_site(cfg, node_config, node_id, flat, layout)
                out = [_blob(MODEL_KEY, new)]
            else:
                metrics, site = evaluate_site(cfg, node_config, node_id, flat, layout)
                out = []
        except DataError as exc:
            raise RequestError("data", f"site data rejected: {exc}") from None
        except ContractError as exc:
            raise RequestError("contract", f"round message rejected: {exc}") from None
        try:
            answer = {"ok": True, METRICS_KEY: flat_record(metrics, "metrics"), SITE_KEY: flat_record(site, "site"),
                      "has_arrays": kind == TRAIN}
        except FrameError as exc:
            raise RequestError("worker", f"site worker cannot send its reply: {exc}") from None
        return (answer, out), what

    # -- serving

    def serve_one(self, conn: socket.socket, timeout: float = REQUEST_TIMEOUT) -> None:
        """Read one request from ``conn``, answer it. Malformed input gets an error answer; nothing raises."""
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from user id %s (this worker serves user id %s only)", uid,
                        os.getuid())
            return
        conn.settimeout(timeout)
        try:
            header, blobs = recv_frame(conn, self.max_payload)
        except FrameError as exc:
            log.warning("malformed request: %s", exc)
            reply, out = {"ok": False, "error": "request", "reason": f"malformed request to the site worker: {exc}"}, []
        except (socket.timeout, OSError) as exc:
            log.warning("request not received: %s", exc or type(exc).__name__)
            return
        else:
            reply, out = self.answer(header, blobs)
        try:
            frame = encode_frame(reply, out)
        except (FrameError, ValueError) as exc:
            log.error("cannot encode the answer: %s", exc)
            frame = encode_frame({"ok": False, "error": "worker", "reason": f"site worker cannot encode its "
                                                                             f"answer: {exc}"})
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


# ------------------------------------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, required=True,
                   help="Unix socket path; its folder must be this user's only (created with mode 0700)")
    p.add_argument("--data", type=Path, required=True, help="the site's prepared data folder")
    p.add_argument("--manifest", type=Path, required=True, help="the consortium manifest (TOML)")
    p.add_argument("--site-name", default="", help="the site's name (default: the SuperNode's node config)")
    p.add_argument("--exit-with", type=int, default=None, metavar="PID",
                   help="exit when this process (e.g. the SuperNode) is gone")
    p.add_argument("--takeover-wait", type=float, default=5.0, metavar="SECONDS",
                   help="if a previous worker still holds the socket, wait this long for it to exit (default 5)")
    p.add_argument("--log-file", type=Path, default=None, help="also append the log to this file")
    p.add_argument("--max-message-mb", type=int, default=MAX_PAYLOAD_BYTES >> 20,
                   help=f"largest array payload accepted per message (default {MAX_PAYLOAD_BYTES >> 20})")


def setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        if args.exit_with is not None and not _alive(args.exit_with) and not stopping:
            stopping.append(f"process {args.exit_with} exited")
        return bool(stopping)

    try:
        import torch  # the libraries, once for the worker's life

        from magnet_core.cohort.manifest import ConsortiumManifest
        from magnet_core.cohort.validation import validate_site

        from . import handlers  # noqa: F401 - imports magnet_core.model.site, torch_geometric

        report, _ = validate_site(data, ConsortiumManifest.load(manifest))
        if not report.ok:
            for e in report.errors:
                log.error("site data: %s", e)
            log.error("site data in %s failed validation; the worker does not start", data)
            return 1
        worker = SiteWorker(data, manifest, args.site_name, args.max_message_mb << 20)
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
