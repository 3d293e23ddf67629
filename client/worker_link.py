"""The persistent site worker's wire format and the ClientApp's side of it: forward one message over a Unix socket.

No torch here: the per-message ClientApp process imports only flwr, numpy and this module. A frame is
``MAGIC`` + 4-byte big-endian header length + a JSON header + the raw bytes of each array (numpy ``.npy`` bytes, as
Flower's ``Array.data`` already holds them; read back with ``np.load(allow_pickle=False)``). No pickle anywhere.
Every header carries the protocol version (magnet_core.protocol.keys.PROTOCOL_VERSION): the worker refuses a
request of another version, the ClientApp an answer of another version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from magnet_core.protocol.errors import ContractError
from magnet_core.protocol.keys import (
    CONFIG_KEY,
    LAYOUT_KEY,
    METRICS_KEY,
    NODE_WORKER_CONNECT_TIMEOUT,
    NODE_WORKER_SOCKET,
    NODE_WORKER_TIMEOUT,
    PROTOCOL_VERSION,
    SITE_KEY,
    VERSION_KEY,
    WORKER_LINK_KEYS,
)
from magnet_core.protocol.version import check_version

MAGIC = b"MFLW\x01"  # the frame layout; what the header means is versioned by its PROTOCOL_VERSION
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON: configs, metrics (histograms: a few thousand numbers) and array names
MAX_ARRAYS = 10_000  # arrays in one message
MAX_PAYLOAD_BYTES = 1 << 31  # 2 GiB of array bytes per message (a MAGNET model is a few MB)
NPY = "numpy.ndarray"  # Flower's serialisation type of an Array holding .npy bytes
WORKER_ERROR_CODE = 4003  # the site worker is unreachable, timed out, or failed; the reason says which
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to reach the worker (node config ``worker-connect-timeout``)
DEFAULT_TIMEOUT = 600.0  # seconds the worker may take to answer one message (node config ``worker-timeout``)
SOCKET_KEYS = WORKER_LINK_KEYS  # node config keys of this link (not forwarded to the worker)

log = logging.getLogger("magnet_fl.worker_link")
if not log.handlers:  # the ClientApp's process writes to the SuperNode's output; every line carries its time
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s magnet-fl worker link: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class FrameError(ValueError):
    """A frame that breaks the wire format (bad magic, too large, truncated, malformed header or array)."""


class WorkerFailure(Exception):
    """The worker could not answer (``kind`` "worker") or answered an error (``kind`` "data" / "contract" /
    "request" / "worker"); ``reason`` is the text for the error reply."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Blob:
    """One array on the wire: its name, Flower's dtype/shape/stype, and its .npy bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    stype: str = NPY

    def meta(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "stype": self.stype,
                "nbytes": len(self.data)}


# ------------------------------------------------------------------------------------------------ framing


def encode_frame(header: Mapping[str, Any], blobs: Sequence[Blob] = ()) -> bytes:
    """One frame: the header gets the protocol version and the arrays' metadata under ``"arrays"``; JSON only (no
    NaN/inf in headers)."""
    head = dict(header)
    head[VERSION_KEY] = PROTOCOL_VERSION
    head["arrays"] = [b.meta() for b in blobs]
    text = json.dumps(head, allow_nan=False, separators=(",", ":")).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(text)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([MAGIC, struct.pack(">I", len(text)), text, *(b.data for b in blobs)])


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise FrameError(f"connection closed after {got} of {n} bytes of the {what}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_meta(meta: Any, i: int) -> tuple[str, str, tuple[int, ...], str, int]:
    if not isinstance(meta, dict) or set(meta) != {"name", "dtype", "shape", "stype", "nbytes"}:
        raise FrameError(f"array {i}: metadata must have exactly name, dtype, shape, stype, nbytes")
    name, dtype, shape, stype, nbytes = (meta[k] for k in ("name", "dtype", "shape", "stype", "nbytes"))
    if not isinstance(name, str) or not 0 < len(name) <= 512:
        raise FrameError(f"array {i}: name must be a non-empty string of at most 512 characters")
    if not isinstance(dtype, str) or not 0 < len(dtype) <= 32 or stype != NPY:
        raise FrameError(f"array {name!r}: dtype must be a short string and stype {NPY!r}")
    if not isinstance(shape, list) or len(shape) > 32 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise FrameError(f"array {name!r}: shape must be a list of at most 32 non-negative integers")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise FrameError(f"array {name!r}: nbytes must be a non-negative integer")
    return name, dtype, tuple(shape), stype, nbytes


def recv_frame(sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[dict, list[Blob]]:
    """Read one frame; sizes are checked before anything is allocated. Raises FrameError."""
    prefix = _recv_exact(sock, len(MAGIC) + 4, "frame prefix")
    if prefix[:len(MAGIC)] != MAGIC:
        raise FrameError("not a magnet-fl worker frame (bad magic bytes)")
    (size,) = struct.unpack(">I", prefix[len(MAGIC):])
    if size > MAX_HEADER_BYTES:
        raise FrameError(f"header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_recv_exact(sock, size, "header").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FrameError("header must be a JSON object")
    metas = header.pop("arrays", [])
    if not isinstance(metas, list) or len(metas) > MAX_ARRAYS:
        raise FrameError(f"'arrays' must be a list of at most {MAX_ARRAYS} entries")
    checked = [_check_meta(m, i) for i, m in enumerate(metas)]
    total = sum(c[4] for c in checked)
    if total > max_payload:
        raise FrameError(f"arrays total {total} bytes, more than the limit of {max_payload}")
    names = [c[0] for c in checked]
    if len(set(names)) != len(names):
        raise FrameError("array names repeat")
    blobs = [Blob(name, dtype, shape, _recv_exact(sock, nbytes, f"array {name!r}"), stype)
             for name, dtype, shape, stype, nbytes in checked]
    return header, blobs


def flat_record(record: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A Flower config/metric record's items as JSON-safe values (str keys; scalars or lists of scalars)."""
    out = {}
    for k, v in record.items():
        items = v if isinstance(v, list) else [v]
        if not isinstance(k, str) or not all(isinstance(x, (str, int, float, bool)) for x in items):
            raise FrameError(f"{what}: {k!r} holds a value that cannot cross to the worker ({type(v).__name__})")
        if any(isinstance(x, float) and not math.isfinite(x) for x in items):
            raise FrameError(f"{what}: {k!r} is not finite")
        out[k] = list(v) if isinstance(v, list) else v
    return out


# ------------------------------------------------------------------------------------------------ the channel


def check_private_dir(directory: Path) -> None:
    """The socket's directory must be a real directory of this user that no group or other user can open."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise PermissionError(f"{directory}: no such directory (the site worker creates it, mode 0700)") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{directory} is not a directory (a symbolic link is refused)")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to user id {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o077:
        raise PermissionError(f"{directory} has mode {stat.S_IMODE(st.st_mode):04o}: group or other users can "
                              f"open it; the site worker's socket needs a directory only this user can open "
                              f"(chmod 700 {directory})")


def _connect(path: Path, connect_timeout: float, where: str) -> socket.socket:
    """Connect, retrying for up to ``connect_timeout`` seconds while the socket is absent or refuses (a worker
    starting or restarting); a directory others can open is refused at once."""
    deadline = time.monotonic() + connect_timeout
    while True:
        if not os.path.lexists(path.parent):
            problem = f"no such directory {path.parent} (is `magnet-fl site-worker` running?)"
        else:
            try:
                check_private_dir(path.parent)
            except PermissionError as exc:
                raise WorkerFailure("worker", f"{where}: {exc}") from None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(path))
                return sock
            except FileNotFoundError:
                problem = "no socket there (is `magnet-fl site-worker` running?)"
            except ConnectionRefusedError:
                problem = "connection refused (no worker is running there: it died or has not started; restart it)"
            except socket.timeout:
                problem = "the connection was not accepted in time"
            except OSError as exc:
                sock.close()
                raise WorkerFailure("worker", f"{where}: {exc.strerror or exc}") from None
            sock.close()
        if time.monotonic() >= deadline:
            raise WorkerFailure("worker", f"{where}: {problem} (tried for {connect_timeout:g} s)")
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def exchange(path: str | Path, header: Mapping[str, Any], blobs: Sequence[Blob] = (),
             connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, timeout: float = DEFAULT_TIMEOUT,
             max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[dict, list[Blob]]:
    """Send one request, read one answer. Raises WorkerFailure("worker", ...) when the worker cannot be reached,
    closes the connection, or does not answer within ``timeout`` seconds; never waits longer."""
    path = Path(path)
    where = f"site worker not reachable at {path}"
    frame = encode_frame(header, blobs)
    sock = _connect(path, connect_timeout, where)
    try:
        sock.settimeout(timeout)
        try:
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            answer, out = recv_frame(sock, max_payload)
            check_version(answer, "the site worker's answer")
            return answer, out
        except socket.timeout:
            raise WorkerFailure("worker", f"{where}: no answer within {timeout:g} s (worker-timeout)") from None
        except FrameError as exc:
            raise WorkerFailure("worker", f"{where}: the worker closed the connection or sent a broken answer "
                                          f"({exc}); it may have died (check its log)") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise WorkerFailure("worker", f"{where}: the worker closed the connection ({exc.strerror}); it may "
                                          f"have died (check its log)") from None
        except ContractError as exc:
            raise WorkerFailure("worker", f"{path}: {exc}; restart the site worker with this magnet-fl") from None
        except OSError as exc:
            raise WorkerFailure("worker", f"{where}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def ping(path: str | Path, timeout: float = 5.0) -> dict:
    """The worker's status (pid, site, data fingerprint). Raises WorkerFailure."""
    header, _ = exchange(path, {"kind": "ping"}, connect_timeout=timeout, timeout=timeout)
    if not header.get("ok"):
        raise WorkerFailure(str(header.get("error", "worker")), str(header.get("reason", "ping failed")))
    return header


def wait_ready(path: str | Path, timeout: float, proc=None) -> dict:
    """Ping until the worker answers (it imports torch and validates the site first); ``proc``: stop early if
    that process has exited."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise WorkerFailure("worker", f"the site worker exited with code {proc.returncode} before it served "
                                          f"{path} (see its log)")
        try:
            header, _ = exchange(path, {"kind": "ping"}, connect_timeout=1.0,
                                 timeout=max(0.5, deadline - time.monotonic()))
            if header.get("ok"):
                return header
            last = str(header.get("reason", "ping failed"))
        except WorkerFailure as exc:
            last = exc.reason
        time.sleep(0.2)
    raise WorkerFailure("worker", f"{last or path} (waited {timeout:g} s)")


# ------------------------------------------------------------------------------------------------ the ClientApp side


def _seconds(node_config: Mapping[str, Any], key: str, default: float) -> float:
    value = node_config.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise WorkerFailure("worker", f"node config {key} must be a number of seconds, got {value!r}") from None
    if not 0 < value <= 86_400:
        raise WorkerFailure("worker", f"node config {key} must be in (0, 86400] seconds, got {value!r}")
    return value


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): the per-message process start-up cost."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def forward(kind: str, config: Mapping[str, Any], arrays, node_id: int, node_config: Mapping[str, Any],
            layout: Mapping[str, Any] | None = None):
    """Hand one train/evaluate message to the site's worker (node config ``worker-socket``).

    ``config`` is the round's config record, ``arrays`` its ArrayRecord (one flat model array, or None),
    ``layout`` the message's model layout record (the worker checks it against its own model). Returns (metrics,
    site record, ArrayRecord or None), exactly what the in-process path would reply. Raises WorkerFailure."""
    from flwr.app import Array, ArrayRecord

    path = str(node_config[NODE_WORKER_SOCKET])
    timeout = _seconds(node_config, NODE_WORKER_TIMEOUT, DEFAULT_TIMEOUT)
    connect_timeout = _seconds(node_config, NODE_WORKER_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)
    if arrays is not None and not isinstance(arrays, ArrayRecord):
        raise WorkerFailure("contract", f"round message rejected: 'arrays' is a {type(arrays).__name__}, "
                                        f"not an ArrayRecord")
    try:
        blobs = [] if arrays is None else [Blob(k, a.dtype, tuple(a.shape), a.data, a.stype) for k, a in arrays.items()]
        header = {"kind": kind, CONFIG_KEY: flat_record(config, "round config"), "node_id": int(node_id),
                  "has_arrays": arrays is not None,
                  LAYOUT_KEY: None if layout is None else flat_record(layout, "model layout"),
                  "node_config": flat_record({k: v for k, v in node_config.items() if k not in SOCKET_KEYS},
                                             "node config")}
    except FrameError as exc:
        raise WorkerFailure("contract", f"round message rejected: {exc}") from None
    t0, age = time.monotonic(), process_age()
    answer, out = exchange(path, header, blobs, connect_timeout, timeout)
    if not answer.get("ok"):
        kind_, reason = str(answer.get("error", "worker")), str(answer.get("reason", "the worker gave no reason"))
        log.warning("%s message: the site worker answered an error (%s): %s", kind, kind_, reason.splitlines()[0])
        raise WorkerFailure(kind_, reason)
    metrics, site = answer.get(METRICS_KEY), answer.get(SITE_KEY)
    if not isinstance(metrics, dict) or not isinstance(site, dict):
        raise WorkerFailure("worker", f"site worker at {path} sent an answer without metrics/site records")
    record = ArrayRecord({b.name: Array(dtype=b.dtype, shape=b.shape, stype=b.stype, data=b.data) for b in out}) \
        if answer.get("has_arrays") else None
    log.info("%s message answered by the site worker at %s in %.2f s (this ClientApp process had started %s s "
             "before it forwarded the message)", kind, path, time.monotonic() - t0,
             "?" if age is None else f"{age:.2f}")
    return metrics, site, record
