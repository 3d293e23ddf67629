"""The persistent site worker: same replies as the in-process ClientApp, a private socket, clear errors when it is
dead or hung, restart on the same socket, reload after a data change, survival of malformed requests, and the site's
policy enforced in the worker whatever the coordinator's bundle (the ClientApp) does.

Real worker processes (``magnet-fl site-worker``) serve a small site cut from tcga-brca-mixomics; every process is
stopped by its pid."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flower_messages import instruction, model_of, model_records
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.serde import message_to_proto

from client.app import app as client_app
from client.worker_link import MAGIC, WorkerFailure, encode_frame, ping, recv_frame, wait_ready
from magnet_core.protocol.errors import POLICY_ERROR_CODE, WORKER_ERROR_CODE
from magnet_core.protocol.keys import PROTOCOL_VERSION, VERSION_KEY
from magnet_core.protocol.messages import site_record
from magnet_core.protocol.worker import WorkerAnswer, WorkerRequest

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ("mRNA", "miRNA", "protein")


def _site(data_root: Path, folder: Path) -> tuple[Path, Path]:
    """One site: 90 patients of tcga-brca-mixomics, the first 40 features of each modality, and its manifest."""
    from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec

    root = data_root / "tcga-brca-mixomics"
    labels = pd.read_csv(root / "labels.csv", index_col=0)
    patients = sorted(np.random.default_rng(0).permutation(labels.index)[:90])
    data = folder / "site"
    data.mkdir(parents=True)
    labels.loc[patients].to_csv(data / "labels.csv")
    specs = []
    for m in MODALITIES:
        df = pd.read_csv(root / f"{m}.csv.gz", index_col=0).iloc[:, :40]
        df.loc[df.index.intersection(patients)].to_csv(data / f"{m}.csv")
        specs.append(ModalitySpec(name=m, features=list(df.columns)))
    manifest = ConsortiumManifest(name="brca", classes=["Basal", "Her2", "LumA"], modalities=specs)
    return data, manifest.save(folder / "manifest.toml")


class Worker:
    """A `magnet-fl site-worker` process, started and stopped by pid; it exits by itself if this test process
    ends first (--exit-with)."""

    def __init__(self, data: Path, manifest: Path, sock: Path, log: Path, policy: Path | None = None):
        self.data, self.manifest, self.sock, self.log, self.policy = data, manifest, sock, log, policy
        self.proc: subprocess.Popen | None = None

    def start(self):
        env = {**os.environ, "MAGNET_FL_THREADS": "1", "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        policy = [] if self.policy is None else ["--policy", str(self.policy)]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "simulations.cli", "site-worker", "--socket", str(self.sock),
                 "--data", str(self.data), "--manifest", str(self.manifest), *policy, "--exit-with", str(os.getpid())],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        status = wait_ready(self.sock, 120, self.proc)
        assert status.pid == self.proc.pid
        return status

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def worker(data_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    data, manifest = _site(data_root, folder)
    w = Worker(data, manifest, folder / "run" / "worker.sock", folder / "worker.log")
    w.start()
    try:
        yield w
    finally:
        w.kill()


def _message(kind: str, server_round: int = 1, clipping_norm: float | None = None, local_epochs: int = 1):
    from magnet_core.model.config import get_preset
    from magnet_core.model.network import MAGNET
    from magnet_core.protocol.messages import RoundConfig

    torch.manual_seed(0)
    model = MAGNET({m: 40 for m in MODALITIES}, 3, get_preset("brca").model)
    config = RoundConfig(server_round=server_round, seed=3, preset="brca", local_epochs=local_epochs,
                         histogram_bins=100, clipping_norm=clipping_norm)
    return instruction(7, kind, {**model_records(model.state_dict()), "config": ConfigRecord(config.encode())})


def _context(w: Worker, **extra) -> Context:
    node = {"data-dir": str(w.data), "manifest": str(w.manifest), "site-name": "site-a", **extra}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _arrays(reply) -> dict[str, np.ndarray]:
    """A reply's flat model split with the layout every ``_message`` sends (the same seeded model)."""
    return model_of(reply, _message("train"))


def test_worker_replies_equal_in_process_replies(worker, monkeypatch):
    """Train, train with Flower's DP clipping mod, and evaluate through forwarder + worker give exactly the
    in-process ClientApp's replies (1 torch thread on both sides)."""
    from client.handlers import forget_sites

    messages = {"train": lambda: _message("train"), "evaluate": lambda: _message("evaluate"),
                "clipped": lambda: _message("train", server_round=2, clipping_norm=0.05)}
    via = {k: client_app(m(), _context(worker, **{"worker-socket": str(worker.sock)})) for k, m in messages.items()}
    threads = torch.get_num_threads()
    monkeypatch.setenv("MAGNET_FL_THREADS", "1")  # the in-process path applies the thread policy itself
    torch.set_num_threads(1)
    forget_sites()
    try:
        here = {k: client_app(m(), _context(worker)) for k, m in messages.items()}
    finally:
        torch.set_num_threads(threads)
        forget_sites()
    for k in messages:
        assert not via[k].has_error(), via[k].error.reason
        assert dict(via[k].content["metrics"]) == dict(here[k].content["metrics"])
        assert dict(via[k].content["site"]) == dict(here[k].content["site"]) == site_record("site-a")
    for k in ("train", "clipped"):
        a, b = _arrays(via[k]), _arrays(here[k])
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), (k, name)
    sent = model_of(messages["clipped"]())
    update = np.sqrt(sum(float(((v - sent[n]) ** 2).sum()) for n, v in _arrays(via["clipped"]).items()))
    assert update == pytest.approx(0.05, rel=1e-3)  # the mod clipped the worker's update (it was larger)
    assert "arrays" not in via["evaluate"].content
    assert "train message (run 1, round 1, node 7) answered" in worker.text()


def test_socket_is_private_and_single_owner(worker, tmp_path, capsys):
    from client.worker import bind_private_socket

    assert stat.S_IMODE(os.stat(worker.sock.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(worker.sock).st_mode) == 0o600
    with pytest.raises(FileExistsError, match="another site worker"):  # the live worker holds the socket
        bind_private_socket(worker.sock)
    assert ping(worker.sock).data == str(worker.data.resolve())
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o750)
    with pytest.raises(PermissionError, match="group or other users can open it"):
        bind_private_socket(shared / "w.sock")
    from simulations.cli import main

    threads = torch.get_num_threads()
    try:
        code = main(["site-worker", "--socket", str(shared / "w.sock"), "--data", str(worker.data), "--manifest",
                     str(worker.manifest)])
    finally:
        torch.set_num_threads(threads)
    assert code == 2 and "chmod 700" in capsys.readouterr().err and not (shared / "w.sock").exists()
    # a fresh directory is created 0700 and the socket 0600
    sock, lock = bind_private_socket(tmp_path / "fresh" / "w.sock")
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(tmp_path / "fresh" / "w.sock").st_mode) == 0o600
    finally:
        sock.close()
        os.close(lock)


def _raw(path: Path, data: bytes) -> WorkerAnswer:
    """Send raw bytes, read the worker's answer header."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer, _ = recv_frame(s, WorkerAnswer, "answer")
    return answer


def _frame(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps({VERSION_KEY: PROTOCOL_VERSION, **header}).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + payload


def _request(msg, node_config: dict | None = None) -> bytes:
    """A whole message as the ClientApp forwards it (or as a modified bundle builds it itself)."""
    return encode_frame(WorkerRequest(kind="message", node_id=7, node_config=node_config or {}),
                        {"message": message_to_proto(msg).SerializeToString()})


def test_malformed_requests_get_error_answers_and_worker_survives(worker):
    good = _message("train")
    bad_config = _message("train")
    bad_config.content["config"] = ConfigRecord({"server-round": "one", VERSION_KEY: PROTOCOL_VERSION})
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # needs pickle to load: refused
    with_pickle = _message("train")
    with_pickle.content["arrays"] = ArrayRecord({"model": Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                                                                data=pickled.getvalue())})
    meta = {"name": "message", "encoding": "protobuf"}
    cases = {
        "bad magic": b"GET / HTTP/1.1\r\n\r\n",
        "header too large": MAGIC + struct.pack(">I", 50_000_000),
        "not json": MAGIC + struct.pack(">I", 5) + b"{oops",
        "foreign version": _frame({"kind": "ping", VERSION_KEY: "magnet-fl/2"}),
        "truncated": _frame({"kind": "message", "payloads": [{**meta, "nbytes": 1000}]}, b"x" * 10),
        "payload too large": _frame({"kind": "message", "payloads": [{**meta, "nbytes": 1 << 40}]}),
        "unknown kind": _frame({"kind": "shell"}),
        "unknown field": _frame({"kind": "ping", "exec": "rm -rf /"}),
        "no message": _frame({"kind": "message"}),
        "not a message": _frame({"kind": "message", "payloads": [{**meta, "nbytes": 6}]}, b"\xff\xffoops"),
        "unknown type": _request(_message("query.shell")),
        "bad config": _request(bad_config),
        "pickled array": _request(with_pickle),
        "foreign data dir": _request(_message("evaluate"), {"data-dir": "/etc"}),
        "foreign policy": _request(_message("evaluate"), {"site-policy": "/tmp/lax-policy.toml"}),
    }
    expected = {"bad magic": "bad magic", "header too large": "exceeds", "not json": "not valid JSON",
                "foreign version": "magnet-fl/2", "truncated": "connection closed",
                "payload too large": "more than the limit", "unknown kind": "kind: Input should be",
                "unknown field": "exec: Extra inputs are not permitted", "no message": "carries no message",
                "not a message": "is not a Flower message", "unknown type": "is not one this site answers",
                "bad config": "round message rejected: round config", "pickled array": "allow_pickle=False",
                "foreign data dir": "is not the folder this site worker serves",
                "foreign policy": "never chosen by the request"}
    for name, data in cases.items():
        answer = _raw(worker.sock, data)
        assert answer.ok is False and expected[name] in answer.reason, (name, answer)
    assert _raw(worker.sock, _request(good)).ok  # the same frame, well formed, is answered
    # a client that connects and sends nothing, then leaves
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(worker.sock))
    assert worker.proc.poll() is None and ping(worker.sock).pid == worker.proc.pid
    reply = client_app(_message("evaluate"), _context(worker, **{"worker-socket": str(worker.sock)}))
    assert not reply.has_error()


def test_data_change_reloads_the_site(worker):
    ctx = _context(worker, **{"worker-socket": str(worker.sock)})
    before = client_app(_message("train"), ctx)
    labels = pd.read_csv(worker.data / "labels.csv", index_col=0)
    try:
        labels.iloc[:-6].to_csv(worker.data / "labels.csv")  # six patients leave the site
        after = client_app(_message("train"), ctx)
    finally:
        labels.to_csv(worker.data / "labels.csv")
    assert not after.has_error(), after.error.reason
    assert after.content["metrics"]["num-examples"] < before.content["metrics"]["num-examples"]
    assert "data or manifest changed" in worker.text()
    # data that no longer validate: a clear data error, and the worker keeps serving
    protein = (worker.data / "protein.csv").read_text()
    (worker.data / "protein.csv").write_text(protein.replace("\n", "\nnot-a-patient,oops\n", 1))
    try:
        bad = client_app(_message("evaluate"), ctx)
    finally:
        (worker.data / "protein.csv").write_text(protein)
    assert bad.has_error() and bad.error.code == 4001 and "site data rejected" in bad.error.reason
    assert ping(worker.sock).pid == worker.proc.pid


def test_dead_or_hung_worker_gives_a_clear_error_then_a_restart_takes_over(worker):
    ctx = _context(worker, **{"worker-socket": str(worker.sock), "worker-timeout": 3.0,
                              "worker-connect-timeout": 1.0})
    worker.signal(signal.SIGSTOP)  # hung: the forwarder gives up after worker-timeout
    try:
        t0 = time.monotonic()
        hung = client_app(_message("train"), ctx)
        waited = time.monotonic() - t0
    finally:
        worker.signal(signal.SIGCONT)
    assert hung.has_error() and hung.error.code == WORKER_ERROR_CODE
    assert f"site worker not reachable at {worker.sock}" in hung.error.reason and "3 s" in hung.error.reason
    assert 2.5 < waited < 20
    worker.kill()  # dead: the stale socket file stays behind
    assert worker.sock.exists()
    t0 = time.monotonic()
    dead = client_app(_message("train"), ctx)
    assert 0.9 < time.monotonic() - t0 < 6  # retried for worker-connect-timeout, then gave up
    assert dead.has_error() and dead.error.code == WORKER_ERROR_CODE
    assert f"site worker not reachable at {worker.sock}: connection refused" in dead.error.reason
    with pytest.raises(WorkerFailure, match="not reachable"):
        ping(worker.sock, timeout=0.5)
    status = worker.start()  # a new worker on the same path removes the stale socket and serves
    assert status.pid != os.getpid() and "removed the stale socket" in worker.text()
    again = client_app(_message("train"), _context(worker, **{"worker-socket": str(worker.sock)}))
    assert not again.has_error(), again.error.reason


# ------------------------------------------------------------------------------------- the site's policy, in the worker

POLICY = """\
consortium = "brca-test"
state_dir = "state"
min_count = 5

[secure_aggregation]
train = false

[privacy]
min_noise_multiplier = 0.0
epsilon_budget = inf

[ranges]
local_epochs = [1, 5]
histogram_bins = [2, 20]
"""


@pytest.fixture(scope="module")
def guarded_worker(data_root, tmp_path_factory):
    """A worker started by the hospital with its own policy (--policy); plain rounds allowed, so that only the
    rule under test refuses."""
    folder = tmp_path_factory.mktemp("guarded")
    data, manifest = _site(data_root, folder)
    policy = folder / "hospital" / "policy.toml"
    policy.parent.mkdir(mode=0o700)
    policy.write_text(POLICY)
    w = Worker(data, manifest, folder / "run" / "worker.sock", folder / "worker.log", policy)
    w.start()
    try:
        yield w
    finally:
        w.kill()


def _audit(w: Worker) -> list[dict]:
    path = w.policy.parent / "state" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _refused_in_worker(w: Worker, reply, rule: str, code: int = POLICY_ERROR_CODE) -> None:
    """Refused by the worker with ``rule`` named, nothing released, the refusal the last entry of the worker's audit
    log."""
    assert reply.has_error(), f"answered (keys {list(reply.content.keys())}); expected a refusal by {rule}"
    assert reply.error.code == code and rule in reply.error.reason, reply.error.reason
    last = _audit(w)[-1]
    assert (last["decision"], last["rule"], last["release"]) == ("refused", rule, None), last
    assert last["error"] == reply.error.reason


def test_a_bundle_that_skips_the_policy_check_is_refused_by_the_site_worker(guarded_worker, tmp_path, monkeypatch):
    """The coordinator ships a modified ClientApp that never calls the site's policy check and knows no policy (its
    node config names none): every request it forwards is still checked by the worker against the hospital's policy
    (the worker's --policy), refused with the rule named, and recorded in the worker's audit log. On code where the
    check runs in the ClientApp, the bundle's requests are answered."""
    import client.guard
    import client.site_path

    def skipped(msg, context, answer):  # the modified bundle: no policy check, no audit
        return answer()

    monkeypatch.setattr(client.guard, "screened", skipped)
    monkeypatch.setattr(client.site_path, "screened", skipped)
    w = guarded_worker
    ctx = Context(run_id=1, node_id=7, node_config={"worker-socket": str(w.sock), "site-name": "site-a"},
                  state=RecordDict(), run_config={})
    # 2 local epochs: one epoch in the clear is a single step, which only release_gradients allows
    first = client_app(_message("train", local_epochs=2), ctx)
    assert not first.has_error(), first.error.reason  # the policy allows a plain round 1
    assert [e["decision"] for e in _audit(w)] == ["answered"] and _audit(w)[0]["kind"] == "train"
    # the same round again (a repeated round gives the site's update by difference)
    _refused_in_worker(w, client_app(_message("train", local_epochs=2), ctx), "rounds.never_repeat")
    # an evaluation asking for more score bins than the site releases
    _refused_in_worker(w, client_app(_message("evaluate"), ctx), "ranges.histogram_bins")
    assert "rounds.never_repeat" in w.text() and not (tmp_path / "state").exists()

    # a bundle that builds its own requests: naming a policy it wrote itself (allowing anything) is refused ...
    lax = tmp_path / "lax.toml"
    lax.write_text('consortium = "brca-test"\nstate_dir = "lax-state"\n')
    answer = _raw(w.sock, _request(_message("train", server_round=2), {"site-policy": str(lax)}))
    assert answer.ok is False and answer.code == WORKER_ERROR_CODE and "never chosen by the request" in answer.reason
    last = _audit(w)[-1]
    assert (last["decision"], last["rule"], last["release"]) == ("refused", "site-worker.node_config", None), last
    assert not (tmp_path / "lax-state").exists()
    # ... and naming none does not lift the hospital's policy: 50 local epochs are outside its range
    answer = _raw(w.sock, _request(_message("train", server_round=2, local_epochs=50)))
    assert answer.ok is False and answer.code == POLICY_ERROR_CODE and "ranges.local_epochs" in answer.reason
    assert _audit(w)[-1]["rule"] == "ranges.local_epochs"
    assert [e["decision"] for e in _audit(w)] == ["answered"] + ["refused"] * 4
    assert ping(w.sock).policy == str(w.policy.resolve())


def test_the_site_workers_dp_floor_cannot_be_lowered_or_dropped_by_the_forwarded_node_config(tmp_path):
    """The DP floor given on the worker's command line wins over whatever the (coordinator's) bundle forwards: a
    forwarded floor of 0, or none at all, still yields the worker's floor in the node config the handlers read."""
    from client.worker import SiteWorker
    from magnet_core.protocol.keys import NODE_DP_FLOOR

    data, manifest = tmp_path / "data", tmp_path / "manifest.toml"
    data.mkdir()
    manifest.write_text("")
    worker = SiteWorker(data, manifest, "site-a", dp_floor=1.0)
    assert worker.node_config({NODE_DP_FLOOR: 0.0})[NODE_DP_FLOOR] == 1.0
    assert worker.node_config({})[NODE_DP_FLOOR] == 1.0
    without = SiteWorker(data, manifest, "site-a")  # no floor of its own: the SuperNode's node config decides
    assert without.node_config({NODE_DP_FLOOR: 0.5})[NODE_DP_FLOOR] == 0.5
    with pytest.raises(ValueError, match="must be >= 0"):
        SiteWorker(data, manifest, "site-a", dp_floor=-1.0)
