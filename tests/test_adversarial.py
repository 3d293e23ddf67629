"""Attacks on the coordinator, played by dishonest or broken sites against the real ServerApp loop and strategy.

Honest sites run the real ClientApp; an attacker's reply is the honest reply altered on its way to the server.
Every attack must end without a crash, with the bad reply rejected and named by node id, and with the global model
inside the range of the honest sites' weights (or unchanged when no honest site remains); an in-band update of
honest size that only points elsewhere is instead kept, clipped and weighted by its share (bounded influence)."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from flower_messages import flat_model, model_of
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import app as client_app
from magnet_core.protocol.messages import site_record
from server.app import server_main
from server.config import FederatedConfig
from simulations.engine import InProcessGrid

Attack = Callable[[Message, Message, int], Message]  # (instruction, honest reply, round) -> reply sent


def _arrays(msg: Message, instruction: Message | None = None) -> dict[str, np.ndarray]:
    """A message's flat model as named arrays (a reply is split with its instruction's layout)."""
    return model_of(msg, instruction)


def _record(params: dict[str, np.ndarray], instruction: Message) -> ArrayRecord:
    return flat_model(params, instruction)


def _forge(instruction: Message, honest: Message, *, arrays=None, metrics=None, site=None) -> Message:
    """The honest reply with some of its records replaced."""
    content = RecordDict()
    if "arrays" in honest.content or arrays is not None:
        content["arrays"] = arrays if arrays is not None else honest.content["arrays"]
    content["metrics"] = MetricRecord(metrics) if metrics is not None else honest.content["metrics"]
    content["site"] = ConfigRecord(site) if site is not None else honest.content["site"]
    reply = Message(content, reply_to=instruction)
    reply.metadata.__dict__["_src_node_id"] = instruction.metadata.dst_node_id
    return reply


class AttackGrid(InProcessGrid):
    """In-process grid whose attacking nodes alter their honest replies; records what honest sites trained."""

    def __init__(self, num_nodes: int, run_config: dict, attacks: dict[int, Attack]):
        super().__init__(client_app, num_nodes, run_config)
        self.attacks = attacks
        self.trained: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # (round, node) -> honest weights
        self.examples: dict[tuple[int, int], int] = {}  # (round, node) -> the honest reply's training patients
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # round -> global weights sent for training

    def push_messages(self, messages):
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            rnd = int(msg.content["config"]["server-round"])
            reply = self.client_app(msg, self.contexts[node])
            if msg.metadata.message_type == "train" and not reply.has_error():
                self.sent[rnd] = _arrays(msg)
                self.trained[(rnd, node)] = _arrays(reply, msg)
                self.examples[(rnd, node)] = int(reply.content["metrics"]["num-examples"])
            if node in self.attacks:
                reply = self.attacks[node](msg, reply, rnd)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids


def _run(tmp_path: Path, num_sites: int, attacks: dict[int, Attack], rounds: int = 1, **overrides):
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    scenario = tmp_path / f"iid-{num_sites}.toml"
    scenario.write_text(f'name = "iid-{num_sites}"\nnum_sites = {num_sites}\npartition = "iid"\n')
    settings = dict(num_server_rounds=rounds, local_epochs=1, data_path="generated:160", scenario=str(scenario),
                    min_sites=1, server_eval=False, seed=3, out_dir=str(tmp_path / "run"), histogram_bins=20)
    cfg = FederatedConfig(**{**settings, **overrides})
    grid = AttackGrid(num_sites, cfg.to_run_config(), attacks)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    params, history = server_main(grid, ctx)
    return grid, {k: np.asarray(v) for k, v in params.items()}, history


def _named(record: dict, node: int, kind: str = "rejected") -> str:
    """The reason recorded for ``node`` (every rejection and failure says which node it was)."""
    hits = [r for r in record[kind].values() if r.startswith(f"node {node}:")]
    assert hits, f"node {node} not in {kind}: {record[kind]}"
    return hits[0]


def _within_honest_range(grid: AttackGrid, params: dict[str, np.ndarray], rnd: int, attackers: set[int]):
    honest = [w for (r, node), w in grid.trained.items() if r == rnd and node not in attackers]
    if not honest:  # nobody honest trained: the global model must be the one sent this round
        for k, v in grid.sent[rnd].items():
            np.testing.assert_array_equal(params[k], v)
        return
    for k, v in params.items():
        stack = np.stack([w[k] for w in honest])
        tol = 1e-6 * (1 + np.abs(stack).max())
        assert np.all(v >= stack.min(axis=0) - tol) and np.all(v <= stack.max(axis=0) + tol), k


# --------------------------------------------------------------------------------------------------- counts


def _metrics_with(**changes) -> Attack:
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if instruction.metadata.message_type != "train":
            return honest
        metrics = dict(honest.content["metrics"])
        for key, value in changes.items():
            key = key.replace("_", "-")
            if value is None:
                metrics.pop(key, None)
            else:
                metrics[key] = value(metrics) if callable(value) else value
        return _forge(instruction, honest, metrics=metrics)

    return attack


COUNT_ATTACKS = {
    "huge num-examples": _metrics_with(num_examples=10**6),
    "negative num-examples": _metrics_with(num_examples=-99),
    "zero num-examples": _metrics_with(num_examples=0),
    "float num-examples": _metrics_with(num_examples=50.0),
    "modality count above num-examples": _metrics_with(count_mRNA=lambda m: m["num-examples"] + 5),
    "modality count above enrolment": _metrics_with(num_examples=lambda m: m["num-examples"],
                                                    count_DNA=lambda m: m["num-examples"]),
    "count for an unknown modality": _metrics_with(count_protein=7),
    "no count for a modality": _metrics_with(count_miRNA=None),
}


@pytest.mark.parametrize("attack", sorted(COUNT_ATTACKS))
def test_lying_counts_are_rejected_by_node(tmp_path, attack):
    grid, params, history = _run(tmp_path, 3, {2: COUNT_ATTACKS[attack]})
    record = history[0]
    reason = _named(record, 2)
    assert len(record["accepted"]) == 2 and "site1" not in record["accepted"], record
    assert reason
    _within_honest_range(grid, params, 1, {2})


# --------------------------------------------------------------------------------------------- identities


def _claim(name: str, scale: float | None = None) -> Attack:
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        arrays = None
        if scale is not None and instruction.metadata.message_type == "train":
            arrays = _record({k: v * scale for k, v in _arrays(honest, instruction).items()}, instruction)
        return _forge(instruction, honest, arrays=arrays, site=site_record(name))

    return attack


def test_a_site_cannot_shadow_another_sites_name(tmp_path):
    """Node 3 speaks as site0 (node 1's name) and sends a 1e4-scaled update: refused as node 3, and node 1's
    honest update still counts."""
    grid, params, history = _run(tmp_path, 3, {3: _claim("site0", scale=1e4)})
    record = history[0]
    reason = _named(record, 3)
    assert "site0" in record["accepted"] and "site1" in record["accepted"], record
    assert "node 1" in reason or "norm" in reason
    _within_honest_range(grid, params, 1, {3})


def test_a_site_cannot_change_its_name_between_rounds(tmp_path):
    def rename_later(instruction, honest, rnd):
        return _forge(instruction, honest, site=site_record("site9")) if rnd == 2 else honest

    grid, params, history = _run(tmp_path, 2, {2: rename_later}, rounds=2)
    assert "now calls itself 'site9'" in _named(history[1], 2)
    assert history[1]["accepted"] == ["site0"]


def test_the_node_answering_first_under_another_sites_name_does_not_own_it(tmp_path):
    """Name squatting: node 1 (simulated site0) answers every message as site1, before the real site1 (node 2) does.
    The name comes from the enrolment (partition ids here), never from the first reply: node 1 is refused by node id
    in every round, site1's own updates and evaluations count under its name."""
    grid, params, history = _run(tmp_path, 3, {1: _claim("site1")}, rounds=3)
    for record in history:
        assert record["screening"]["site_names"] == "bound to the simulation's partition ids"
        reason = _named(record, 1)
        assert "enrolled as 'site0'" in reason and "'site1' belongs to node 2" in reason, reason
        assert sorted(record["accepted"]) == ["site1", "site2"] and record["nodes"]["site1"] == 2, record
        assert not any(r.startswith("node 2:") for r in record["rejected"].values()), record["rejected"]
        assert sorted(record["pooled_over"]["sites"]) == ["site1", "site2"]
    _within_honest_range(grid, params, 3, {1})


def _ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key()


def _openssh(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _pem(key) -> bytes:  # what Flower's SuperLink keeps for a registered node (public_key_to_bytes)
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class KeyedGrid(AttackGrid):
    """Nodes known by the public key Flower's node authentication registered (``Grid.get_nodes``, as the SuperLink
    reports them); records which nodes were sent anything."""

    def __init__(self, num_nodes: int, run_config: dict, attacks: dict[int, Attack], keys: dict[int, bytes]):
        super().__init__(num_nodes, run_config, attacks)
        self.keys, self.addressed = keys, set()

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, public_key=self.keys[n]) for n in self.contexts]

    def push_messages(self, messages):
        messages = list(messages)
        self.addressed |= {m.metadata.dst_node_id for m in messages}
        return super().push_messages(messages)


def _speak_as(name: str) -> Attack:
    """Any reply that carries a site record (training, secure-aggregation stage 0, evaluation) sent under ``name``."""
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if honest.has_error() or "site" not in honest.content:
            return honest
        content = RecordDict(dict(honest.content.items()))
        content["site"] = ConfigRecord(site_record(name))
        reply = Message(content, reply_to=instruction)
        reply.metadata.__dict__["_src_node_id"] = instruction.metadata.dst_node_id
        return reply

    return attack


@pytest.mark.parametrize("secagg", [False, True])
def test_names_are_bound_to_the_enrolled_keys_of_the_nodes(tmp_path, secagg):
    """Deployment binding: [sites] maps each site to its node's public key. Node 1 holds site0's key but answers as
    site1 before node 2 (site1's key) does; node 3 holds a key nobody enrolled. Node 3 is refused by node id and sent
    nothing; node 1 is refused by node id; site1 (node 2) and site3 (node 4) are aggregated and pooled."""
    from server.app import model_spec_enrolment_and_evaluator
    from server.loop import run_federation
    from server.names import SiteNames

    scenario = tmp_path / "iid-4.toml"
    scenario.write_text('name = "iid-4"\nnum_sites = 4\npartition = "iid"\n')
    cfg = FederatedConfig(num_server_rounds=2, local_epochs=1, data_path="generated:200", scenario=str(scenario),
                          min_sites=1, server_eval=False, seed=3, out_dir=str(tmp_path / "run"), histogram_bins=20,
                          secagg=secagg, secagg_clip_norm=0.1, report=False)
    spec, enrolment, k, _, _, _ = model_spec_enrolment_and_evaluator(cfg)
    keys = {name: _ec_key() for name in enrolment.sites}
    enrolment = enrolment.model_copy(update={"sites": {
        n: f.model_copy(update={"public_key": _openssh(keys[n])}) for n, f in enrolment.sites.items()}})
    names = SiteNames.from_keys({n: f.public_key for n, f in enrolment.sites.items()})
    grid = KeyedGrid(4, cfg.to_run_config(), {1: _speak_as("site1")},
                     {1: _pem(keys["site0"]), 2: _pem(keys["site1"]), 3: _pem(_ec_key()), 4: _pem(keys["site3"])})
    params, history = run_federation(grid, cfg, spec, enrolment, min_count=k, names=names)
    assert 3 not in grid.addressed
    for record in history:
        assert record["screening"]["site_names"] == "bound to each enrolled site's node public key"
        assert "not enrolled (its public key matches no enrolled site)" in _named(record, 3)
        assert "enrolled as 'site0' and now calls itself 'site1'; 'site1' belongs to node 2" in _named(record, 1)
        assert sorted(record["accepted"]) == ["site1", "site3"] and record["nodes"]["site1"] == 2, record
        assert sorted(record["pooled_over"]["sites"]) == ["site1", "site3"]


def test_a_deployment_without_keys_for_its_sites_is_refused_unless_allowed(tmp_path):
    """A manifest without [sites], or with a site lacking its node's key, is refused before any round; with
    allow-unenrolled=true the run goes on with names from first replies, and every round's record says so."""
    from magnet_core.cohort.manifest import EnrolledSite
    from magnet_core.protocol.enrolment import Enrolment
    from server.app import deployment_names
    from server.config import RunConfigError

    cfg = FederatedConfig(manifest="consortium.toml")
    with pytest.raises(RunConfigError, match=r"enrols no sites.*allow-unenrolled=true"):
        deployment_names(cfg, None)
    partly = Enrolment(sites={"a": EnrolledSite(train=5, test=5, public_key=_openssh(_ec_key())),
                              "b": EnrolledSite(train=5, test=5)})
    with pytest.raises(RunConfigError, match=r"\['b'\] have no public key"):
        deployment_names(cfg, partly)
    allowed = cfg.model_copy(update={"allow_unenrolled": True})
    assert deployment_names(allowed, None).binding == "first-contact"
    keys = tmp_path / "registered_sites.csv"
    keys.write_text(f"site,public_key\nb,{_openssh(_ec_key())}\n")
    assert deployment_names(cfg.model_copy(update={"site_keys": str(keys)}), partly).binding == "keys"
    with pytest.raises(ValueError, match="public_key"):
        EnrolledSite(train=5, test=5, public_key="ssh-rsa not-a-key")


# ---------------------------------------------------------------------------------------------- updates


def _update(kind: str, from_round: int = 1) -> Attack:
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if instruction.metadata.message_type != "train" or rnd < from_round:
            return honest
        sent, mine = _arrays(instruction), _arrays(honest, instruction)
        if kind == "scaled":
            forged = {k: v * np.float32(1e4) for k, v in mine.items()}
        elif kind == "sign-flipped":
            forged = {k: (2 * sent[k] - mine[k]).astype(mine[k].dtype) for k in mine}
        elif kind == "zero":  # the global model sent back unchanged: a free rider
            forged = sent
        else:
            raise AssertionError(kind)
        return _forge(instruction, honest, arrays=_record(forged, instruction))

    return attack


@pytest.mark.parametrize("num_sites", [1, 2, 5])
@pytest.mark.parametrize("kind", ["scaled", "zero"])
def test_bad_updates_are_rejected_with_one_two_and_five_sites(tmp_path, kind, num_sites):
    """Out of band (1e4 x, or the global model sent back): rejected from round 1 whatever the number of sites."""
    grid, params, history = _run(tmp_path, num_sites, {1: _update(kind)}, rounds=2)
    for record in history:
        _named(record, 1)
        assert "site0" not in record["accepted"]
        assert len(record["accepted"]) == num_sites - 1
    _within_honest_range(grid, params, 2, {1})


def _flip(length: float, from_round: int = 1) -> Attack:
    """From ``from_round`` on, the site's honest step reversed and made ``length`` x as long."""
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if instruction.metadata.message_type != "train" or rnd < from_round:
            return honest
        sent, mine = _arrays(instruction), _arrays(honest, instruction)
        return _forge(instruction, honest, arrays=_record({k: (sent[k] - length * (mine[k].astype(np.float64) - sent[k])
                                                              ).astype(mine[k].dtype) for k in mine}, instruction))

    return attack


@pytest.mark.parametrize("num_sites", [1, 2, 5])
def test_a_sign_flipped_update_is_clipped_and_a_long_one_rejected(tmp_path, num_sites):
    """Bounded influence (issue 22): a sign flip of honest size is kept, clipped to the round's bound and weighted by
    the site's share, so the model moves at most the bound (rejecting on direction alone also rejected honest
    label-skew steps). Twenty times longer it is opposed and large: rejected, with 5 sites from round 1, with 2 from
    round 2 (where it starts: the last aggregate step is a reference); with 1 site it is the consortium: clipped."""
    for name, length in (("same", 1.0), ("long", 20.0)):
        (tmp_path / name).mkdir()
        start = 2 if length > 1 and num_sites < 3 else 1
        grid, params, history = _run(tmp_path / name, num_sites, {1: _flip(length, start)}, rounds=2)
        for record in history:
            clip = record["screening"]["clip"]
            rejected = length > 1 and (num_sites == 5 or (num_sites == 2 and record["round"] == 2))
            if rejected:
                assert "opposed and large" in _named(record, 1) and "site0" not in record["accepted"]
                assert len(record["accepted"]) == num_sites - 1
                continue
            assert len(record["accepted"]) == num_sites, record["rejected"]
            assert record["screening"]["step_norms"]["site0"] * clip["scale"]["site0"] <= clip["bound"] * (1 + 1e-6)
        step = np.sqrt(sum(float(((params[k].astype(np.float64) - v) ** 2).sum()) for k, v in grid.sent[2].items()))
        assert step <= history[-1]["screening"]["clip"]["bound"] * (1 + 1e-4)


def test_a_zero_colluder_does_not_switch_off_the_norm_check(tmp_path):
    """One site sends the global model back unchanged, another a 1e4-scaled update: both are refused."""
    grid, params, history = _run(tmp_path, 3, {1: _update("zero"), 2: _update("scaled")})
    record = history[0]
    assert "barely differs" in _named(record, 1) and "norm" in _named(record, 2)
    assert record["accepted"] == ["site2"]
    _within_honest_range(grid, params, 1, {1, 2})


# ------------------------------------------------------------------------------------------- evaluations


def _eval_metrics(change: Callable[[dict], dict]) -> Attack:
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if instruction.metadata.message_type != "evaluate":
            return honest
        return _forge(instruction, honest, metrics=change(dict(honest.content["metrics"])))

    return attack


EVAL_ATTACKS = {
    "extra cm key": lambda m: {**m, "cm-everyone": m["cm-all"]},
    "3x3 matrix in a 2-class run": lambda m: {**m, "cm-all": [1, 0, 0, 0, 1, 0, 0, 0, 1], "num-examples": 3},
    "negative counts": lambda m: {**m, "cm-all": [-5, m["cm-all"][1], m["cm-all"][2], m["cm-all"][3] + 5]},
    "inflated counts": lambda m: {k: val if k.startswith(("edges-", "withheld-")) else
                                  ([v * 1000 for v in val] if isinstance(val, list) else val * 1000)
                                  for k, val in m.items()},
    "histogram of the wrong size": lambda m: {k: (v[:-2] if k.startswith("hist-") else v) for k, v in m.items()},
    "a histogram bin isolating one patient": lambda m: _split_first_bin(m),
    "paired and unpaired do not add up": lambda m: {**m, "cm-paired": m["cm-all"]},
}


def _split_first_bin(metrics: dict) -> dict:
    """Cut the site's first released score bin so that it holds a single patient (below k)."""
    out = dict(metrics)
    key = next(k for k in sorted(metrics) if k.startswith("hist-"))
    g = key[len("hist-"):]
    edges, counts = list(metrics[f"edges-{g}"]), list(metrics[key])
    b = len(edges) - 1
    neg, pos = counts[:b], counts[b:]
    first = "neg" if neg[0] else "pos"
    one = [1, 0] if first == "neg" else [0, 1]
    neg = [one[0], neg[0] - one[0], *neg[1:]]
    pos = [one[1], pos[0] - one[1], *pos[1:]]
    out[f"edges-{g}"] = [edges[0], edges[0] + (edges[1] - edges[0]) / 2, *edges[1:]]
    out[key] = neg + pos
    return out


@pytest.mark.parametrize("attack", sorted(EVAL_ATTACKS))
def test_bad_evaluation_replies_are_dropped_and_named(tmp_path, attack):
    grid, params, history = _run(tmp_path, 3, {2: _eval_metrics(EVAL_ATTACKS[attack])})
    record = history[0]
    _named(record, 2)
    assert sorted(record["pooled_over"]["sites"]) == ["site0", "site2"], record["pooled_over"]
    assert record["global"]["mcc"] is not None and set(record["sites"]) == {"site0", "site2"}
    assert record["pooled_over"]["patients"] == sum(s["num"] for s in record["sites"].values())


# ----------------------------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"round": 1, "params": {}, "history": [], "evil": _Payload(str(marker))}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        _run(tmp_path, 2, {}, resume=True)
    assert not marker.exists()
    with open(out / "checkpoint.pt", "wb") as fh:  # a plain pickle, not even a torch file
        pickle.dump(_Payload(str(marker)), fh)
    with pytest.raises(ValueError, match="damaged or not a magnet-fl checkpoint"):
        _run(tmp_path, 2, {}, resume=True)
    assert not marker.exists()


def test_damaged_and_foreign_checkpoints_are_refused_with_a_clear_message(tmp_path):
    _run(tmp_path, 2, {}, rounds=1)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    good = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"different run.*seed: checkpoint 3, now 4"):
        _run(tmp_path, 2, {}, rounds=2, resume=True, seed=4)
    with pytest.raises(ValueError, match=r"different run.*preset: checkpoint 'ov', now 'brca'"):
        _run(tmp_path, 2, {}, rounds=2, resume=True, preset="brca")
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="damaged or not a magnet-fl checkpoint"):
        _run(tmp_path, 2, {}, rounds=2, resume=True)
    ckpt.write_bytes(good)
    with pytest.raises(ValueError, match="already holds a run"):  # resume=false never overwrites silently
        _run(tmp_path, 2, {}, rounds=2)
    assert ckpt.read_bytes() == good
    _, _, history = _run(tmp_path, 2, {}, rounds=2, resume=True)  # the same run resumes
    assert [r["round"] for r in history] == [1, 2]
    _, _, history = _run(tmp_path, 2, {}, rounds=1, overwrite=True)  # or is replaced when asked
    assert [r["round"] for r in history] == [1]


def _prototypes(kind: str) -> Attack:
    """A fedproto site that keeps its honest weights but forges its class prototypes."""
    def attack(instruction: Message, honest: Message, rnd: int) -> Message:
        if instruction.metadata.message_type != "train":
            return honest
        mine = _arrays(honest, instruction)
        forged = dict(mine)
        if kind == "huge-means":  # released class means 1e4 x: would drag every site's embedding away
            forged["prototype_sum"] = (mine["prototype_sum"] * np.float32(1e4)).astype(np.float32)
        elif kind == "stolen-weight":  # mass in every class, means not released: weight in classes it never had
            forged["prototype_mass"] = np.full_like(mine["prototype_mass"], 0.9)
        else:
            raise AssertionError(kind)
        return _forge(instruction, honest, arrays=_record(forged, instruction))

    return attack


@pytest.mark.parametrize("kind", ["huge-means", "stolen-weight"])
def test_forged_class_prototypes_are_rejected_by_the_coordinator(tmp_path, kind):
    """fedproto (prototype-weight > 0) over 3 sites: a site forging its prototypes is rejected and named every
    round, and the consortium's prototypes stay within the honest sites' values."""
    grid, params, history = _run(tmp_path, 3, {1: _prototypes(kind)}, rounds=2, prototype_weight=1.0)
    for record in history:
        assert "class prototypes" in _named(record, 1)
        assert len(record["accepted"]) == 2
    _within_honest_range(grid, params, 2, {1})


# ---------------------------------------------------------------------------------------------- fedsgd


FEDSGD = dict(local_update="gradient", server_optimizer="preset-adam", aggregation="fedavg")


def test_fedsgd_steps_torch_adam_on_the_sites_mean_gradient(tmp_path):
    """fedsgd over 3 honest sites, 3 rounds: every global model is (to float32 rounding) torch's Adam with the
    preset's learning rate, schedule and constants, stepped from the model sent along the training-patient weighted
    mean of the sites' updates (each minus its full-batch gradient), recomputed here from what the sites returned.
    The coordinator's gradient screen applies (a gradient longer than the round's bound, the lower median norm x
    gradient-clip-factor (1), is shortened to it), by the factor the round's record states."""
    from magnet_core.federation.aggregate import TORCH_ADAM_BETAS, TORCH_ADAM_EPS, ServerOptState, server_opt_step
    from magnet_core.model.config import get_preset

    grid, params, history = _run(tmp_path, 3, {}, rounds=3, **FEDSGD)
    assert all(len(r["accepted"]) == 3 and r["screening"]["screen"] == "gradient" for r in history)
    train = get_preset("ov").train
    state, models = ServerOptState(), [*(grid.sent[r] for r in (2, 3)), params]
    for rnd in (1, 2, 3):
        sent = {k: v.astype(np.float64) for k, v in grid.sent[rnd].items()}
        updates = [grid.trained[(rnd, node)] for node in (1, 2, 3)]
        weights = np.asarray([grid.examples[(rnd, node)] for node in (1, 2, 3)], float)
        scale = [history[rnd - 1]["screening"]["clip"]["scale"][f"site{node - 1}"] for node in (1, 2, 3)]
        assert min(scale) > 0.5 and max(scale) == 1.0  # honest gradients: at most shortened, never dropped
        mean = {k: sent[k] + sum(w * c * (u[k].astype(np.float64) - sent[k])
                                 for w, c, u in zip(weights / weights.sum(), scale, updates)) for k in sent}
        lr = train.lr * train.lr_gamma ** ((rnd - 1) // train.lr_step)
        active = {k for k in sent if any(not np.array_equal(u[k], grid.sent[rnd][k]) for u in updates)}
        expected, state = server_opt_step(sent, mean, state, "torch-adam", lr, *TORCH_ADAM_BETAS, TORCH_ADAM_EPS,
                                          active)
        got = models[rnd - 1]
        # Adam divides each element's step by that element's gradient, and the sites send weights (float32): where
        # a gradient is below ~1e-5 of its weight, the rounding of w - g is a visible part of it and may flip its
        # step. Everywhere else the step must agree to 2% of one learning rate; those elements are nearly all.
        resolved = total = 0
        for k in expected:
            d = np.abs(mean[k] - sent[k])
            ok = d > 1e-5 * np.maximum(np.abs(sent[k]), 1e-3)
            np.testing.assert_allclose(got[k][ok], expected[k][ok], rtol=0, atol=0.02 * lr,
                                       err_msg=f"round {rnd}: {k}")
            resolved, total = resolved + int(ok.sum()), total + ok.size
        assert resolved > 0.95 * total, (rnd, resolved, total)
        assert history[rnd - 1]["screening"]["server_optimizer"]["lr"] == pytest.approx(lr)


def _cos(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    x = np.concatenate([np.ravel(a[k]).astype(np.float64) for k in sorted(a)])
    y = np.concatenate([np.ravel(b[k]).astype(np.float64) for k in sorted(a)])
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("kind", ["gradient reversed x 1e4", "gradient x 1e4", "weights x 1e4", "zero"])
def test_a_forged_gradient_does_not_reach_the_coordinators_optimiser(tmp_path, kind):
    """fedsgd over 5 sites, the gradient screen (its default): a site returning no gradient (the model sent back)
    is rejected and named every round; one returning its gradient 1e4 times as long (reversed or not), or its
    weights 1e4 times, is kept at the round's bound, the lower median gradient norm, which the four honest sites
    set, and no honest gradient is shortened below the shortest honest one. Reversed, it cannot turn the
    coordinator's first step away from the honest sites' mean gradient. (An update within the bound is kept as is:
    see README, "What the coordinator believes", on in-band updates and the coordinator's Adam.)"""
    attack = {"gradient reversed x 1e4": _flip(1e4), "gradient x 1e4": _flip(-1e4), "weights x 1e4": _update("scaled"),
              "zero": _update("zero")}[kind]
    grid, params, history = _run(tmp_path, 5, {1: attack}, rounds=2, **FEDSGD)
    for record in history:
        screening = record["screening"]
        assert screening["screen"] == "gradient"
        if kind == "zero":
            assert "barely differs from zero" in _named(record, 1)
            assert "site0" not in record["accepted"] and len(record["accepted"]) == 4
            continue
        assert len(record["accepted"]) == 5 and not record["rejected"]
        norms, scale, bound = screening["step_norms"], screening["clip"]["scale"], screening["clip"]["bound"]
        honest = [norms[f"site{n}"] for n in range(1, 5)]
        assert min(honest) <= bound <= max(honest)
        assert norms["site0"] * scale["site0"] == pytest.approx(bound) and norms["site0"] > 100 * bound
        assert all(norms[f"site{n}"] * scale[f"site{n}"] >= min(honest) * (1 - 1e-9) for n in range(1, 5))
    if kind == "gradient reversed x 1e4":
        sent = grid.sent[1]
        honest_mean = {k: sum(grid.examples[(1, n)] * (grid.trained[(1, n)][k].astype(np.float64) - sent[k])
                              for n in (2, 3, 4, 5)) for k in sent}
        step = {k: grid.sent[2][k].astype(np.float64) - sent[k] for k in sent}
        assert _cos(step, honest_mean) > 0.3, _cos(step, honest_mean)


@pytest.mark.parametrize("kind", ["gradient x 1e4", "weights x 1e4", "zero"])
def test_the_step_screen_on_gradients_rejects_a_forged_gradient(tmp_path, kind):
    """fedsgd with ``update-screen = "step"`` (what label-skew-fedsgd ran with, pinned there): the same forged
    gradients are rejected and named every round, out of band against the model's norm or as the model sent back."""
    attack = {"gradient x 1e4": _flip(-1e4), "weights x 1e4": _update("scaled"), "zero": _update("zero")}[kind]
    grid, params, history = _run(tmp_path, 5, {1: attack}, rounds=2, update_screen="step", **FEDSGD)
    for record in history:
        assert record["screening"]["screen"] == "step"
        _named(record, 1)
        assert "site0" not in record["accepted"] and len(record["accepted"]) == 4
