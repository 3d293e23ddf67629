"""The site worker link: its frames, and the ClientApp's side of it (forward one whole message over a Unix socket).

In deployment the ClientApp (the coordinator's bundle) reads nothing of the site: it hands every message, as Flower
serialised it, to the site's own persistent worker (client/worker.py, installed and started by the hospital), which
decodes it, checks it against the contract and the site's policy, answers and audits it, and sends back the reply.
No torch here: the per-message ClientApp process imports only flwr and this module.

A frame is ``MAGIC`` + 4-byte big-endian header length + a JSON header (magnet_core.protocol.worker: a typed
WorkerRequest / WorkerAnswer, carrying the protocol version) + its payloads' bytes (Flower's protobuf; no pickle
anywhere). The worker refuses a request of another version, the ClientApp an answer of another version.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TypeVar

from flwr.app import Context, Error, Message
from google.protobuf.message import DecodeError

from flower_compat.wire import message_bytes, recorddict_of
from magnet_core.protocol.errors import WORKER_ERROR_CODE, ContractError
from magnet_core.protocol.keys import (
    NODE_WORKER_CONNECT_TIMEOUT,
    NODE_WORKER_SOCKET,
    NODE_WORKER_TIMEOUT,
    WORKER_LINK_KEYS,
)
from magnet_core.protocol.worker import (
    CONTENT_PAYLOAD,
    MESSAGE,
    MESSAGE_PAYLOAD,
    PING,
    Frame,
    Payload,
    WorkerAnswer,
    WorkerRequest,
    WorkerStatus,
    read_header,
)

MAGIC = b"MFLW\x02"  # the frame layout; what the header means is versioned by its PROTOCOL_VERSION
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON: the node config, an error reason, the payloads' sizes
MAX_PAYLOAD_BYTES = 1 << 31  # 2 GiB of payload per frame (a MAGNET model is a few MB)
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to reach the worker (node config ``worker-connect-timeout``)
DEFAULT_TIMEOUT = 600.0  # seconds the worker may take to answer one message (node config ``worker-timeout``)
ANSWER = "the site worker's answer"
F = TypeVar("F", bound=Frame)

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
    """The ClientApp could not get an answer from the site worker (unreachable, timed out, broken or foreign
    answer); ``reason`` is the text of the error reply (code WORKER_ERROR_CODE)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ framing


def encode_frame(header: Frame, payloads: Mapping[str, bytes] | None = None) -> bytes:
    """One frame: ``header`` with ``payloads`` announced in it (name, size), as JSON, then the payloads' bytes."""
    payloads = dict(payloads or {})
    head = header.model_copy(update={"payloads": tuple(Payload(name=n, nbytes=len(b)) for n, b in payloads.items())})
    text = json.dumps(head.model_dump(mode="json"), allow_nan=False, separators=(",", ":")).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(text)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([MAGIC, struct.pack(">I", len(text)), text, *payloads.values()])


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise FrameError(f"connection closed after {got} of {n} bytes of the {what}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, cls: type[F], what: str, max_payload: int = MAX_PAYLOAD_BYTES
               ) -> tuple[F, dict[str, bytes]]:
    """Read one frame whose header is a ``cls``: (header, payload name -> bytes); sizes are checked before anything
    is allocated. FrameError for a broken frame, ContractError (ProtocolVersionError) for a header of another
    version or shape."""
    prefix = _recv_exact(sock, len(MAGIC) + 4, "frame prefix")
    if prefix[:len(MAGIC)] != MAGIC:
        raise FrameError("not a magnet-fl worker frame (bad magic bytes)")
    (size,) = struct.unpack(">I", prefix[len(MAGIC):])
    if size > MAX_HEADER_BYTES:
        raise FrameError(f"header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = json.loads(_recv_exact(sock, size, "header").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise FrameError("header must be a JSON object")
    header = read_header(cls, raw, what)
    total = sum(p.nbytes for p in header.payloads)
    if total > max_payload:
        raise FrameError(f"payloads total {total} bytes, more than the limit of {max_payload}")
    names = [p.name for p in header.payloads]
    if len(set(names)) != len(names):
        raise FrameError("payload names repeat")
    return header, {p.name: _recv_exact(sock, p.nbytes, f"payload {p.name!r}") for p in header.payloads}


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
                raise WorkerFailure(f"{where}: {exc}") from None
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
                raise WorkerFailure(f"{where}: {exc.strerror or exc}") from None
            sock.close()
        if time.monotonic() >= deadline:
            raise WorkerFailure(f"{where}: {problem} (tried for {connect_timeout:g} s)")
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def exchange(path: str | Path, request: WorkerRequest, payloads: Mapping[str, bytes] | None = None,
             connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, timeout: float = DEFAULT_TIMEOUT,
             max_payload: int = MAX_PAYLOAD_BYTES) -> tuple[WorkerAnswer, dict[str, bytes]]:
    """Send one request, read one answer. Raises WorkerFailure when the worker cannot be reached, closes the
    connection, answers a broken frame or another protocol version, or does not answer within ``timeout``
    seconds; never waits longer."""
    path = Path(path)
    where = f"site worker not reachable at {path}"
    frame = encode_frame(request, payloads)
    sock = _connect(path, connect_timeout, where)
    try:
        sock.settimeout(timeout)
        try:
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            return recv_frame(sock, WorkerAnswer, ANSWER, max_payload)
        except socket.timeout:
            raise WorkerFailure(f"{where}: no answer within {timeout:g} s (worker-timeout)") from None
        except FrameError as exc:
            raise WorkerFailure(f"{where}: the worker closed the connection or sent a broken answer ({exc}); it "
                                f"may have died (check its log)") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise WorkerFailure(f"{where}: the worker closed the connection ({exc.strerror}); it may have died "
                                f"(check its log)") from None
        except ContractError as exc:
            raise WorkerFailure(f"{path}: {exc}; restart the site worker with this magnet-fl") from None
        except OSError as exc:
            raise WorkerFailure(f"{where}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def ping(path: str | Path, timeout: float = 5.0, connect_timeout: float | None = None) -> WorkerStatus:
    """The worker's status (pid, site, policy, data fingerprint). Raises WorkerFailure."""
    answer, _ = exchange(path, WorkerRequest(kind=PING), connect_timeout=timeout if connect_timeout is None
                         else connect_timeout, timeout=timeout)
    if not answer.ok or answer.status is None:
        raise WorkerFailure(answer.reason or "ping failed")
    return answer.status


def wait_ready(path: str | Path, timeout: float, proc=None) -> WorkerStatus:
    """Ping until the worker answers (it imports torch and validates the site first); ``proc``: stop early if
    that process has exited."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise WorkerFailure(f"the site worker exited with code {proc.returncode} before it served {path} "
                                f"(see its log)")
        try:
            return ping(path, timeout=max(0.5, deadline - time.monotonic()), connect_timeout=1.0)
        except WorkerFailure as exc:
            last = exc.reason
        time.sleep(0.2)
    raise WorkerFailure(f"{last or path} (waited {timeout:g} s)")


# ------------------------------------------------------------------------------------------------ the ClientApp side


def _seconds(node_config: Mapping[str, Any], key: str, default: float) -> float:
    value = node_config.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise WorkerFailure(f"node config {key} must be a number of seconds, got {value!r}") from None
    if not 0 < value <= 86_400:
        raise WorkerFailure(f"node config {key} must be in (0, 86400] seconds, got {value!r}")
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


def forward_message(msg: Message, context: Context) -> Message:
    """The site's reply to ``msg``, answered by the site's worker (node config ``worker-socket``): the whole message
    goes to the worker as Flower serialised it; this process decodes, checks and reads nothing of the site. An
    unreachable, hung or broken worker gives an error reply (WORKER_ERROR_CODE) naming the socket."""
    kind = msg.metadata.message_type
    try:
        path = str(context.node_config[NODE_WORKER_SOCKET])
        timeout = _seconds(context.node_config, NODE_WORKER_TIMEOUT, DEFAULT_TIMEOUT)
        connect_timeout = _seconds(context.node_config, NODE_WORKER_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)
        request = WorkerRequest(kind=MESSAGE, node_id=int(context.node_id),
                                node_config={k: v for k, v in context.node_config.items()
                                             if k not in WORKER_LINK_KEYS})
        t0, age = time.monotonic(), process_age()
        answer, payloads = exchange(path, request, {MESSAGE_PAYLOAD: message_bytes(msg)},
                                    connect_timeout, timeout)
        if not answer.ok:
            log.warning("%s message: the site answered an error (%s): %s", kind, answer.code,
                        (answer.reason or "").splitlines()[0] if answer.reason else "no reason")
            return Message(Error(code=answer.code if answer.code is not None else WORKER_ERROR_CODE,
                                 reason=answer.reason or "the site worker gave no reason"), reply_to=msg)
        content = payloads.get(CONTENT_PAYLOAD)
        if content is None:
            raise WorkerFailure(f"site worker at {path} answered without the reply's content")
        try:
            reply = Message(recorddict_of(content), reply_to=msg)
        except (DecodeError, ValueError, TypeError) as exc:
            raise WorkerFailure(f"site worker at {path} sent a reply that is not a Flower record dict ({exc})"
                                ) from None
    except WorkerFailure as exc:
        log.warning("%s message: %s", kind, exc.reason.splitlines()[0])
        return Message(Error(code=WORKER_ERROR_CODE, reason=exc.reason), reply_to=msg)
    log.info("%s message answered by the site worker at %s in %.2f s (this ClientApp process had started %s s "
             "before it forwarded the message)", kind, path, time.monotonic() - t0,
             "?" if age is None else f"{age:.2f}")
    return reply
