"""A malicious coordinator against a site with its own policy: each attack of issue 21 that the site's policy
closes is played through the real site handlers (client.app's ClientApp called with real Flower messages) and must
be refused with a reason naming the policy file and line, recorded in the site's audit log."""

# The policy is written as TOML text here and named by the node config (``site-policy``), as a hospital would; the
# coordinator's messages are built exactly as the coordinator builds them (RoundConfig, the secure-aggregation setup
# record, PrepareConfig). On code without a site policy every attack below is answered (the tests fail).

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flower_messages import instruction, model_records
from flwr.app import ConfigRecord, Context, Message, RecordDict

from magnet_core.artefacts.report import write_report
from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.federation.secagg import SecAggSetup, UpdateLayout
from magnet_core.protocol.messages import RoundConfig
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import SecAggStart, SecureTrainTerms
from magnet_core.protocol.version import stamped

DATA = dict(data_path="generated:160", scenario="iid-3")
SITE = 0  # partition 0 of the simulated consortium: the site under attack


def policy_text(*, secure_train: bool = True, secure_prepare: bool = True, min_noise: float = 1.0,
                budget: float | None = 10.0, min_count: int = 5, split_seed: int = 10, prototypes: bool = False,
                gradients: bool = False) -> str:
    return f"""\
consortium = "ov-test"
state_dir = "state"
min_count = {min_count}
release_class_prototypes = {str(prototypes).lower()}
release_gradients = {str(gradients).lower()}

[secure_aggregation]
train = {str(secure_train).lower()}
evaluate = false
prepare = {str(secure_prepare).lower()}

[privacy]
min_noise_multiplier = {min_noise}
epsilon_budget = {'inf' if budget is None else budget}
delta = 1e-05

[ranges]
rounds = [1, 20]
local_epochs = [1, 5]
histogram_bins = [2, 20]

[rounds]
never_repeat = true
train_once_per_model = true

[evaluation]
only_current_round = true
once_per_model = true
next_train_from_evaluated = true

[preparation]
split_seed = {split_seed}
split_ratios = [0.7, 0.1, 0.2]
use_split_file = true
"""


# Plain rounds (no secure sum, no DP) are what the oracle and range attacks need: a policy that allows them, so that
# only the rule under test can refuse.
PLAIN = dict(secure_train=False, min_noise=0.0, budget=None)


class Site:
    """One site under a policy: its node config, its Flower context (state kept across messages, as a SuperNode
    keeps it for a run), and the real ClientApp answering each message."""

    def __init__(self, root: Path, node: dict, **policy):
        root.mkdir(parents=True, exist_ok=True)
        self.policy = root / "policy.toml"
        self.policy.write_text(policy_text(**policy))
        self.audit_log = root / "state" / "audit.jsonl"
        self.node = {**node, "site-policy": str(self.policy)}
        self.contexts: dict[int, Context] = {}

    def send(self, kind: str, content: dict, run: int = 1) -> Message:
        from client.app import app
        from client.prepare_app import app as prepare_app

        msg = instruction(SITE, kind, content)
        msg.metadata.__dict__["_run_id"] = run
        ctx = self.contexts.setdefault(run, Context(run_id=run, node_id=SITE, node_config=self.node,
                                                    state=RecordDict(), run_config={}))
        return (prepare_app if "prepare" in kind else app)(msg, ctx)

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()] \
            if self.audit_log.exists() else []


def round_config(rnd: int, **kw) -> ConfigRecord:
    # 2 local epochs: one epoch in the clear is a single step, which only release_gradients allows
    base = dict(server_round=rnd, seed=0, preset="ov", local_epochs=2, histogram_bins=10, min_count=5, **DATA)
    return ConfigRecord(RoundConfig(**{**base, **kw}).encode())


@pytest.fixture(scope="module")
def global_model() -> dict[str, np.ndarray]:
    """The consortium model's initial weights as the coordinator would send them (the site's own architecture)."""
    from client.handlers import site_for

    cfg = RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10, **DATA)
    site = site_for(cfg, {"partition-id": SITE}, SITE)
    return {k: v.detach().numpy().copy() for k, v in site.model.state_dict().items()}


def shifted(params: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    """The bisection probe: the same weights with the output bias shifted."""
    out = {k: v.copy() for k, v in params.items()}
    bias = [k for k in out if k.endswith("bias")][-1]
    out[bias] = out[bias] + np.float32(by)
    return out


def train(site: Site, params, rnd: int, run: int = 1, **kw) -> Message:
    return site.send("train", {"config": round_config(rnd, **kw), **model_records(params)}, run)


def evaluate(site: Site, params, rnd: int, run: int = 1, **kw) -> Message:
    return site.send("evaluate", {"config": round_config(rnd, **kw), **model_records(params)}, run)


def secure_train(site: Site, params, rnd: int, round_id: str, z: float | None = 1.0, run: int = 1) -> Message:
    """Stage 0 of a secure round over 3 sites (threshold 3), as server/secure.py builds it."""
    length = UpdateLayout.from_params(params).length + 2
    terms = SecureTrainTerms(0.1, True, z is not None, z or 0.0, 0 if z is not None else -1)
    rec = SecAggStart(SecAggSetup(round_id, (1, 2, 3), 3, length), 1, terms).to_record()
    return site.send("train.secagg", {"config": round_config(rnd), **model_records(params),
                                      "secagg": ConfigRecord(stamped(rec))}, run)


def answered(reply: Message) -> None:
    assert not reply.has_error(), f"refused: {reply.error.reason}"


def refused(site: Site, reply: Message, rule: str) -> None:
    """Refused with a reason naming the policy file, the line of ``rule`` and the rule; the refusal is the last
    entry of the site's audit log, and nothing but the reason left the site."""
    assert reply.has_error(), f"the site answered (keys {list(reply.content.keys())}); expected a refusal by {rule}"
    reason = reply.error.reason
    line = next(n for n, text in enumerate(site.policy.read_text().splitlines(), 1)
                if text.split("=")[0].strip() == rule.split(".")[-1])
    assert f"{site.policy.resolve()} line {line}: {rule} = " in reason, reason
    last = site.audit()[-1]
    assert (last["decision"], last["rule"], last["release"]) == ("refused", rule, None), last
    assert last["error"] == reason


# ------------------------------------------------------------------------------------------------ the attacks


def test_evaluation_oracle_same_and_perturbed_weights_is_closed(tmp_path, global_model):
    """Bisection on the output bias needs many evaluations of near-identical weights: the site evaluates only the
    global model of the round it trained, once, and the next round must train from that model."""
    site = Site(tmp_path, {"partition-id": SITE}, **PLAIN)
    answered(train(site, global_model, 1))
    g1 = shifted(global_model, 0.01)  # "the aggregate" of round 1
    answered(evaluate(site, g1, 1))
    refused(site, evaluate(site, g1, 1), "evaluation.only_current_round")  # the same weights again
    for by in (0.5, -0.5, 0.25):  # the probes
        refused(site, evaluate(site, shifted(g1, by), 1), "evaluation.only_current_round")
    refused(site, evaluate(site, shifted(g1, 0.5), 2), "evaluation.only_current_round")  # a round not trained
    refused(site, train(site, shifted(g1, 0.5), 2), "evaluation.next_train_from_evaluated")  # a probe as global
    # a new run: the evaluated model is never evaluated again, whatever round it is sent in
    answered(train(site, g1, 1, run=2))
    refused(site, evaluate(site, g1, 1, run=2), "evaluation.once_per_model")
    assert sum(e["decision"] == "answered" and e["kind"] == "evaluate" for e in site.audit()) == 1


def test_a_repeated_round_is_refused(tmp_path, global_model):
    site = Site(tmp_path, {"partition-id": SITE}, **PLAIN)
    answered(train(site, global_model, 1))
    refused(site, train(site, shifted(global_model, 0.1), 1), "rounds.never_repeat")  # same round number
    answered(train(site, shifted(global_model, 0.2), 2))
    refused(site, train(site, shifted(global_model, 0.3), 1), "rounds.never_repeat")  # an earlier round
    refused(site, train(site, global_model, 3), "rounds.train_once_per_model")  # the same global model


def test_a_repeated_secure_round_is_refused(tmp_path, global_model):
    """Repeating a secure round without one site gives that site's update by difference: the site answers a
    round number once and a secure round id once."""
    site = Site(tmp_path, {"partition-id": SITE})
    answered(secure_train(site, global_model, 1, "r1"))
    refused(site, secure_train(site, global_model, 1, "r1"), "rounds.never_repeat")  # replayed as it was
    refused(site, secure_train(site, global_model, 1, "r1-again"), "rounds.never_repeat")  # new id, same round


def test_dp_rounds_beyond_the_sites_budget_are_refused(tmp_path, global_model):
    """The site's own accountant: two rounds at z = 1 fit a budget of 9, the third (any round number) does not,
    in this run or the next."""
    from magnet_core.federation.dp import rdp_epsilon

    assert rdp_epsilon([1.0, 1.0], 1e-5) < 9.0 < rdp_epsilon([1.0] * 3, 1e-5)
    site = Site(tmp_path, {"partition-id": SITE}, budget=9.0)
    answered(secure_train(site, global_model, 1, "a"))
    answered(secure_train(site, shifted(global_model, 0.1), 2, "b"))
    refused(site, secure_train(site, shifted(global_model, 0.2), 3, "c"), "privacy.epsilon_budget")
    refused(site, secure_train(site, shifted(global_model, 0.3), 1, "d", run=2), "privacy.epsilon_budget")
    refused(site, secure_train(site, shifted(global_model, 0.4), 2, "e", z=0.5, run=2),
            "privacy.min_noise_multiplier")  # below the floor
    refused(site, secure_train(site, shifted(global_model, 0.5), 3, "f", z=None, run=2),
            "privacy.min_noise_multiplier")  # no noise at all


def test_plain_train_is_refused_when_the_policy_requires_secure_aggregation(tmp_path, global_model):
    site = Site(tmp_path, {"partition-id": SITE}, min_noise=0.0, budget=None)
    reply = train(site, global_model, 1)
    refused(site, reply, "secure_aggregation.train")
    assert "arrays" not in reply.content.array_records if reply.has_content() else True


def test_a_lowered_k_is_refused_in_evaluation(tmp_path, global_model):
    site = Site(tmp_path, {"partition-id": SITE}, **PLAIN)
    answered(train(site, global_model, 1))
    refused(site, evaluate(site, shifted(global_model, 0.01), 1, min_count=3), "min_count")


# -------------------------------------------------------------------------------------------- preparation


def raw_site(root: Path, per: int = 40, d: int = 12) -> Path:
    """A tiny raw site folder (labels.csv + mRNA.csv, two balanced classes), seeded."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ids = pd.Index([f"S_{i:03d}" for i in range(per)], name="sampleID")
    y = np.arange(per) % 2
    pd.DataFrame({"Class": y}, index=ids).to_csv(root / "labels.csv")
    pd.DataFrame(rng.normal(5, 1, (per, d)) + y[:, None], index=ids,
                 columns=[f"g{j}" for j in range(d)]).to_csv(root / "mRNA.csv")
    return root


def prepare_site(tmp_path: Path, **policy) -> Site:
    raw = raw_site(tmp_path / "raw")
    return Site(tmp_path / "site", {"raw-dir": str(raw), "prepared-dir": str(tmp_path / "prepared"),
                                    "site-name": "h0"}, **policy)


def prepare_stats(site: Site, cfg: PrepareConfig, secagg: bool) -> Message:
    request = PrepareRequest(prepare=cfg, secagg=secagg, num_classes=2)
    return site.send("query.prepare_stats", {"config": ConfigRecord(request.encode())})


PREP = dict(n_features=5, value_ranges={"mRNA": (0.0, 12.0)})


def test_a_lowered_k_is_refused_in_preparation(tmp_path):
    site = prepare_site(tmp_path)
    answered(prepare_stats(site, PrepareConfig(**PREP, min_count=5), secagg=True))
    refused(site, prepare_stats(site, PrepareConfig(**PREP, min_count=3), secagg=True), "min_count")


@pytest.mark.parametrize("secagg", [False, True], ids=["clear", "secure"])
def test_preparation_from_a_split_the_coordinator_chose_is_refused(tmp_path, secagg):
    """Two preparations with train fractions 0.705 and 0.71 gave one patient's raw vector by difference: the site
    prepares only from its own split (seed, ratios, split file) and refuses any other."""
    site = prepare_site(tmp_path, secure_prepare=False)
    answered(prepare_stats(site, PrepareConfig(**PREP, split_ratios=(0.7, 0.1, 0.2)), secagg))
    refused(site, prepare_stats(site, PrepareConfig(**PREP, split_ratios=(0.705, 0.095, 0.2)), secagg),
            "preparation.split_ratios")
    refused(site, prepare_stats(site, PrepareConfig(**PREP, split_ratios=(0.71, 0.09, 0.2)), secagg),
            "preparation.split_ratios")
    refused(site, prepare_stats(site, PrepareConfig(**PREP, seed=11), secagg), "preparation.split_seed")
    refused(site, prepare_stats(site, PrepareConfig(**PREP, use_split_file=False), secagg),
            "preparation.use_split_file")


def test_clear_preparation_statistics_are_refused_when_the_policy_requires_secure_aggregation(tmp_path):
    site = prepare_site(tmp_path)
    reply = prepare_stats(site, PrepareConfig(**PREP), secagg=False)
    refused(site, reply, "secure_aggregation.prepare")


# -------------------------------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("what,kw,rule", [
    ("train", {"local_epochs": 50}, "ranges.local_epochs"),
    ("train", {"rnd": 500}, "ranges.rounds"),
    ("evaluate", {"histogram_bins": 100}, "ranges.histogram_bins"),
])
def test_requests_outside_the_allowed_ranges_are_refused(tmp_path, global_model, what, kw, rule):
    site = Site(tmp_path, {"partition-id": SITE}, **PLAIN)
    rnd = kw.pop("rnd", 1)
    if what == "evaluate":
        answered(train(site, global_model, rnd))
        reply = evaluate(site, shifted(global_model, 0.01), rnd, **kw)
    else:
        reply = train(site, global_model, rnd, **kw)
    refused(site, reply, rule)


# ------------------------------------------------------------------------------------------------ the audit log


@pytest.fixture
def site_audit(capsys, monkeypatch):
    """``magnet-fl site audit PATH`` (the real command line, in this process): (exit code, what it printed)."""
    from simulations.cli import main

    def run(path: Path) -> tuple[int, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["magnet-fl", "site", "audit", str(path)])
        code = main()
        return code, capsys.readouterr().out

    return run


def test_class_prototypes_are_released_only_where_the_policy_allows_them(tmp_path):
    """fedproto asks each site for its class means (inside the update). A site whose policy does not allow it
    refuses the round, naming the line; a site that allows it answers, and its reply changes no class it holds
    fewer than k training patients of (the coordinator planted values there: they come back unchanged)."""
    from client.handlers import forget_sites, site_for
    from magnet_core.protocol.wire import Layout, flat_of, unpack

    cfg = RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10, min_count=5,
                      prototype_weight=1.0, **DATA)
    forget_sites()
    runtime = site_for(cfg, {"partition-id": SITE}, SITE)
    model = {k: v.detach().numpy().copy() for k, v in runtime.model.state_dict().items()}
    model["prototype_sum"] = np.full_like(model["prototype_sum"], 0.25)
    model["prototype_mass"] = np.full_like(model["prototype_mass"], 0.5)
    counts = runtime.label_counts().numpy()
    k = int(counts[counts > 0].min()) + 1
    refusing = Site(tmp_path / "a", {"partition-id": SITE}, **PLAIN, min_count=k)
    refused(refusing, train(refusing, model, 1, prototype_weight=1.0, min_count=k), "release_class_prototypes")
    allowing = Site(tmp_path / "b", {"partition-id": SITE}, **PLAIN, prototypes=True, min_count=k, split_seed=0)
    # another run seed would split the site's patients differently: two class means over two sets of patients
    refused(allowing, train(allowing, model, 1, prototype_weight=1.0, min_count=k, seed=7), "preparation.split_seed")
    # a coordinator that lowers k below the site's own is refused: the policy's k holds for class means too
    refused(allowing, train(allowing, model, 1, prototype_weight=1.0, min_count=k - 1), "min_count")
    reply = train(allowing, model, 1, prototype_weight=1.0, min_count=k)
    answered(reply)
    record = {"k": k, "weight": 1.0, "run_seed": 0, "split": 0}  # the site's record: a simulated site's split
    assert allowing.audit()[-1]["class_prototypes"] == record  # follows the run seed
    back = unpack(flat_of(reply.content["arrays"]), Layout.from_params(model))
    below = counts < k
    assert below.any() and (~below).any()
    assert np.array_equal(back["prototype_sum"][below], model["prototype_sum"][below])
    assert np.array_equal(back["prototype_mass"][below], model["prototype_mass"][below])
    assert np.all(back["prototype_mass"][~below] == 1.0)


def test_a_full_batch_gradient_is_released_only_where_the_policy_allows_it(tmp_path, global_model):
    """fedsgd asks each site for one full-batch gradient step at the model the coordinator sent, so its update is the
    site's exact gradient there; one local epoch of a fresh Adam is one step too, whose update gives the gradient
    back where it is small. A site whose policy does not allow single steps refuses both, naming the line (and
    answers two epochs); a site that allows
    it answers with exactly minus its gradient (weight decay included), recomputed here from the site's own
    patients, and its audit entry says the update was a gradient. A malformed request (a gradient of more than one
    epoch) is refused as unreadable before any policy rule."""
    import torch

    from client.handlers import forget_sites, site_for
    from magnet_core.model.config import get_preset
    from magnet_core.model.loss import magnet_loss
    from magnet_core.model.site import _stable_hash
    from magnet_core.model.train import forward
    from magnet_core.protocol.wire import Layout, flat_of, unpack

    refusing = Site(tmp_path / "a", {"partition-id": SITE}, **PLAIN)
    refused(refusing, train(refusing, global_model, 1, local_update="gradient", local_epochs=1), "release_gradients")
    # nor one local epoch in the clear: a fresh Adam's single step, from which the gradient can be read back
    refused(refusing, train(refusing, global_model, 1, local_epochs=1), "release_gradients")
    answered(train(refusing, global_model, 1, local_epochs=2))
    allowing = Site(tmp_path / "b", {"partition-id": SITE}, **PLAIN, gradients=True)
    reply = train(allowing, global_model, 1, local_update="gradient", local_epochs=1)
    answered(reply)
    assert allowing.audit()[-1]["local_update"] == "gradient"
    back = unpack(flat_of(reply.content["arrays"]), Layout.from_params(global_model))

    forget_sites()
    cfg = RoundConfig(server_round=1, seed=0, preset="ov", local_epochs=1, histogram_bins=10, **DATA)
    runtime = site_for(cfg, allowing.node, SITE)  # the site as its policy splits it
    runtime.set_params(global_model)
    runtime.model.zero_grad(set_to_none=True)
    torch.manual_seed(0 * 100_003 + 1 * 1_009 + _stable_hash(runtime.name))  # the site's RNG for round 1
    model, data, train_cfg = runtime.model, runtime.train, get_preset("ov").train
    model.train()
    logits, fused = forward(model, data)
    loss, _ = magnet_loss(logits, data.y, data.graph.edge_index, data.graph.edge_weight, fused, train_cfg.kl_weight)
    loss.backward()
    moved = 0
    for name, p in model.named_parameters():
        expected = global_model[name] if p.grad is None else \
            (torch.from_numpy(global_model[name]) - (p.grad + train_cfg.weight_decay * p.detach())).numpy()
        assert np.allclose(back[name], expected, rtol=1e-5, atol=1e-7), name
        moved += int(p.grad is not None and not np.array_equal(back[name], global_model[name]))
    assert moved > 0
    # a "gradient" over several epochs is not a gradient: the request itself is refused as malformed
    bad = {k.replace("_", "-"): v for k, v in dict(server_round=2, seed=0, preset="ov", local_epochs=3,
                                                   histogram_bins=10, min_count=5, local_update="gradient",
                                                   **DATA).items()}
    reply = allowing.send("train", {"config": ConfigRecord(stamped(bad)), **model_records(global_model)})
    assert reply.has_error() and "local-update 'gradient'" in reply.error.reason, reply.error.reason
    assert allowing.audit()[-1]["decision"] == "refused"


def _deployed_site(root: Path, n: int = 120) -> dict:
    """A deployed site's node config: a prepared data folder without split.csv and the consortium manifest."""
    from site_folders import generated_site

    manifest = generated_site(root / "data", root / "manifest.toml", n)
    return {"data-dir": str(root / "data"), "manifest": str(manifest), "site-name": "h0"}


def test_a_deployed_site_trains_and_evaluates_on_its_own_split_whatever_the_run_seed(tmp_path):
    """A deployed site without split.csv splits its patients by its policy's preparation lines, not by the seed the
    coordinator's round config names: a coordinator that varies the seed across runs would otherwise have the site
    train on the patients it tested on in another run, and evaluate on test sets that differ by a few patients. So
    the site's class-prototype rounds need no particular run seed either, and its audit records the split seed."""
    from client.handlers import forget_sites, site_for
    from magnet_core.cohort.manifest import ConsortiumManifest
    from magnet_core.cohort.validation import load_site_cohort

    node = _deployed_site(tmp_path)
    site = Site(tmp_path / "site", node, **PLAIN, prototypes=True, min_count=3, split_seed=4)
    manifest = ConsortiumManifest.load(node["manifest"])
    own = load_site_cohort(node["data-dir"], manifest, seed=4).split
    forget_sites()
    for seed in (0, 7):
        cfg = RoundConfig(server_round=1, seed=seed, preset="ov", local_epochs=1, histogram_bins=10, **DATA)
        assert np.array_equal(site_for(cfg, site.node, SITE).cohort.split, own), seed
        # without a policy the site follows the run's seed (it trusts the coordinator): another split
        unguarded = site_for(cfg, node, SITE).cohort.split
        assert np.array_equal(unguarded, own) == (seed == 4)
    cfg = RoundConfig(server_round=1, seed=7, preset="ov", local_epochs=1, histogram_bins=10, min_count=3,
                      prototype_weight=1.0, **DATA)
    model = {k: v.detach().numpy().copy() for k, v in site_for(cfg, site.node, SITE).model.state_dict().items()}
    answered(train(site, model, 1, prototype_weight=1.0, min_count=3, seed=7))
    assert site.audit()[-1]["class_prototypes"] == {"k": 5, "weight": 1.0, "run_seed": 7, "split": 4}
    # a prepared folder's split.csv (the preparation wrote it from the policy's lines) is the split, and the record
    pd.DataFrame({"split": own}, index=pd.Index(load_site_cohort(node["data-dir"], manifest, seed=4).sample_ids,
                                                name="sampleID")).to_csv(Path(node["data-dir"]) / "split.csv")
    forget_sites()
    answered(train(site, shifted(model, 0.01), 2, prototype_weight=1.0, min_count=3, seed=7))
    assert site.audit()[-1]["class_prototypes"]["split"] == "split.csv"
    forget_sites()


def test_the_audit_chain_verifies_and_a_tampered_line_is_detected(tmp_path, global_model, site_audit):
    site = Site(tmp_path, {"partition-id": SITE}, **PLAIN)
    answered(train(site, global_model, 1))
    answered(evaluate(site, shifted(global_model, 0.01), 1))
    refused(site, evaluate(site, shifted(global_model, 0.02), 1), "evaluation.only_current_round")
    entries = site.audit()
    assert [e["decision"] for e in entries] == ["answered", "answered", "refused"]
    assert all(len(e["request"]["sha256"]) == 64 and e["request"]["bytes"] > 0 for e in entries)
    assert entries[0]["release"]["bytes"] > 0 and entries[2]["release"] is None
    code, out = site_audit(site.policy)
    assert code == 0 and "audit chain verified: 3 entries" in out, out
    assert (site.audit_log.stat().st_mode & 0o777) == 0o600 and (site.audit_log.parent.stat().st_mode & 0o777) == 0o700
    page = write_report(site.audit_log.parent).read_text()  # the site view of the report reads the audit log
    assert "hash chain verified: 3 entries" in page and "evaluation.only_current_round" in page

    lines = site.audit_log.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["release"]["bytes"] = 1  # the site "released less"
    site.audit_log.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    code, out = site_audit(site.audit_log.parent)
    assert code == 1 and "line 2: its content does not hash" in out, out
    assert "HASH CHAIN BROKEN" in write_report(site.audit_log.parent).read_text()

    site.audit_log.write_text("\n".join(lines[:2]) + "\n")  # the refusal cut from the end
    code, out = site_audit(site.audit_log)
    assert code == 1 and "lines were cut from the end" in out, out


def test_an_honest_secure_dp_run_passes_every_site_policy(tmp_path, site_audit):
    """The policy refuses attacks, not the consortium's own protocol: 2 secure DP rounds with evaluation, every
    site under a strict policy, every site accepted in every round; each site's audit log verifies."""
    from client.app import app as client_app
    from server.app import server_main
    from server.config import FederatedConfig
    from simulations.engine import InProcessGrid

    cfg = FederatedConfig(**DATA, local_epochs=1, num_server_rounds=2, secagg=True, secagg_clip_norm=0.1,
                          dp_clip_norm=0.1, dp_noise_multiplier=1.0, dp_noise_seed=1, out_dir=str(tmp_path / "run"),
                          report=False, server_eval=False, round_timeout=60.0, straggler_grace=0.0)
    sites = {i: Site(tmp_path / f"site{i}", {}) for i in range(3)}
    grid = InProcessGrid(client_app, 3, cfg.to_run_config(), node_configs={i: s.node for i, s in sites.items()})
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
    history = server_main(grid, ctx)[1]
    assert [sorted(h["accepted"]) for h in history] == [["site0", "site1", "site2"]] * 2, history
    for s in sites.values():
        assert not [e for e in s.audit() if e["decision"] != "answered"], s.audit()
        assert {e["kind"] for e in s.audit()} >= {"train.secagg", "query.secagg_mask", "evaluate"}
        assert site_audit(s.policy)[0] == 0
