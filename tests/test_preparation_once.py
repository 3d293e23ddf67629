"""A site releases its preparation statistics to a consortium once (issue 21, ``preparation.once_per_consortium``).

A preparation repeated over another set of sites ({A,B,C} then {B,C}) gives A's k-released statistics by
difference, even through secure sums. The site remembers (in its state folder) the sha256 of what defined the
statistics it released and answers only the very same request again (a retry), refusing any other naming the line.
Every message is built as the coordinator builds it and answered by the real site handlers (the preparation
ClientApp, or the site worker)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from flower_messages import instruction
from flwr.app import ConfigRecord
from test_malicious_coordinator import PREP, Site, answered, policy_text, raw_site

from magnet_core.cohort.preprocess import PrepareConfig
from magnet_core.federation.secagg import SecAggSetup, StatsLayout
from magnet_core.protocol.prepare import PrepareRequest
from magnet_core.protocol.secagg import SecAggStart
from magnet_core.protocol.worker import MESSAGE_PAYLOAD, WorkerRequest

RULE = "preparation.once_per_consortium"
LAYOUT = StatsLayout.from_feature_lists([{"mRNA": [f"g{j}" for j in range(12)]}], 2)


def _site(tmp_path: Path, once: bool | None = True, **policy) -> Site:
    """A preparing site; ``once`` None: a policy written before the line (its default holds)."""
    site = Site(tmp_path / "site", {"raw-dir": str(raw_site(tmp_path / "raw")), "prepared-dir":
                                    str(tmp_path / "prepared"), "site-name": "h0"}, **policy)
    if once is not None:
        site.policy.write_text(site.policy.read_text() + f"once_per_consortium = {str(once).lower()}\n")
    return site


def _request(secagg: bool) -> PrepareRequest:
    return PrepareRequest(prepare=PrepareConfig(**PREP), secagg=secagg, num_classes=2)


def _stats_content(secagg: bool) -> dict:
    return {"config": ConfigRecord(_request(secagg).encode())}


def _secure_sum_content(round_id: str, site_ids: tuple[int, ...]) -> dict:
    """Stage 0 of the secure sum of the statistics, as server/prepare_app.py builds it (this site is id 1)."""
    setup = SecAggSetup.for_sites(round_id, site_ids, LAYOUT.length)
    return {"config": ConfigRecord(_request(True).encode()), "layout": ConfigRecord(LAYOUT.to_record()),
            "secagg": ConfigRecord(SecAggStart(setup, 1).to_record())}


def test_a_secure_preparation_repeated_over_other_sites_is_refused_naming_the_line(tmp_path):
    """Run 1 sums the statistics of sites {1,2,3}; run 2 asks for the sum over {1,2} (one site fewer): the
    difference would be that site's statistics. The site refuses stage 0 of the second sum, naming the policy rule;
    nothing but the reason leaves, the audit log records the refusal, the site's memory keeps the first release.
    The policy file predates the line: its default (true) holds."""
    site = _site(tmp_path, once=None)
    answered(site.send("query.prepare_stats", _stats_content(True), run=1))
    answered(site.send("query.prepare_secagg", _secure_sum_content("prepare/run1", (1, 2, 3)), run=1))
    answered(site.send("query.prepare_stats", _stats_content(True), run=2))  # the same request: nothing new
    reply = site.send("query.prepare_secagg", _secure_sum_content("prepare/run2", (1, 2)), run=2)
    assert reply.has_error(), "the second sum over other sites was answered"
    assert f"{site.policy.resolve()} (default): {RULE} = True" in reply.error.reason, reply.error.reason
    last = site.audit()[-1]
    assert (last["decision"], last["rule"], last["release"], last["error"]) == ("refused", RULE, None,
                                                                               reply.error.reason), last
    assert "by difference" in reply.error.reason and "run 1" in reply.error.reason, reply.error.reason
    assert not reply.has_content()
    memory = json.loads((tmp_path / "site" / "state" / "answered.json").read_text())["consortia"]["ov-test"]
    release = memory["preparations"]["query.prepare_secagg"]
    assert release["run"] == 1 and release["participants"] == [f"secure-sum id {i}" for i in (1, 2, 3)], release
    # other thresholds of the statistics (a different request, also in the clear mode's kind) are refused too
    other = PrepareRequest(prepare=PrepareConfig(**{**PREP, "n_features": 6}), secagg=True, num_classes=2)
    again = site.send("query.prepare_stats", {"config": ConfigRecord(other.encode())}, run=3)
    assert again.has_error() and RULE in again.error.reason and site.audit()[-1]["rule"] == RULE


def test_an_identical_retry_is_answered_with_identical_output(tmp_path):
    site = _site(tmp_path, secure_prepare=False)
    first = site.send("query.prepare_stats", _stats_content(False), run=1)
    again = site.send("query.prepare_stats", _stats_content(False), run=2)
    answered(first)
    answered(again)
    a, b = first.content["stats"], again.content["stats"]
    assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 0
    for k in a.keys():
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert dict(first.content["site"]) == dict(again.content["site"])
    # a secure sum retried after a failed run (the same sites, layout and setup; a new round id) is answered
    secure = _site(tmp_path / "secure")
    answered(secure.send("query.prepare_secagg", _secure_sum_content("prepare/a", (1, 2, 3)), run=1))
    answered(secure.send("query.prepare_secagg", _secure_sum_content("prepare/b", (1, 2, 3)), run=2))
    memory = json.loads((tmp_path / "secure" / "site" / "state" / "answered.json").read_text())
    assert memory["consortia"]["ov-test"]["preparations"]["query.prepare_secagg"]["answered"] == 2


def _init_policy(path: Path, monkeypatch) -> Path:
    from simulations.cli import main

    monkeypatch.setattr(sys, "argv", ["magnet-fl", "site", "policy", "init", str(path), "--consortium", "ov-test",
                                      "--state-dir", "state"])
    assert main() == 0
    # this test's sums are not authenticated (no roster / identity key): only the line under test may refuse
    path.write_text(path.read_text().replace("authenticated = true", "authenticated = false"))
    return path


def _worker_answer(worker, kind: str, content: dict, run: int):
    from flower_compat.wire import message_bytes

    msg = instruction(0, kind, content)
    msg.metadata.__dict__["_run_id"] = run
    answer, _ = worker.answer(WorkerRequest(kind="message", node_id=0, node_config={}),
                              {MESSAGE_PAYLOAD: message_bytes(msg)})
    return answer


def test_the_refusal_holds_after_the_site_worker_restarts(tmp_path, monkeypatch):
    """The memory is in the state folder: a new site worker (a restart) with the same policy still refuses."""
    from client.worker import SiteWorker

    path = _init_policy(tmp_path / "hospital" / "policy.toml", monkeypatch)
    raw = raw_site(tmp_path / "raw")

    def worker():
        return SiteWorker(tmp_path / "prepared", tmp_path / "manifest.toml", "h0", policy=path, raw_dir=raw)

    first = _worker_answer(worker(), "query.prepare_secagg", _secure_sum_content("prepare/r1", (1, 2, 3)), run=1)
    assert first.ok, first
    restarted = worker()
    second = _worker_answer(restarted, "query.prepare_secagg", _secure_sum_content("prepare/r2", (1, 2)), run=2)
    assert second.ok is False, "the restarted worker answered the second sum over other sites"
    line = next(n for n, t in enumerate(path.read_text().splitlines(), 1) if t.startswith("once_per_consortium"))
    assert second.ok is False and f"line {line}: {RULE} = True" in second.reason, second
    audit = [json.loads(x) for x in (path.parent / "state" / "audit.jsonl").read_text().splitlines()]
    assert (audit[-1]["decision"], audit[-1]["rule"], audit[-1]["release"]) == ("refused", RULE, None), audit[-1]
    # the same request as run 1 is still answered by the restarted worker (a retry)
    retry = _worker_answer(restarted, "query.prepare_secagg", _secure_sum_content("prepare/r3", (1, 2, 3)), run=3)
    assert retry.ok, retry


def test_with_the_line_false_both_preparations_are_answered(tmp_path):
    """The documented trade-off: without the line a coordinator can difference two preparations."""
    site = _site(tmp_path, once=False)
    answered(site.send("query.prepare_secagg", _secure_sum_content("prepare/run1", (1, 2, 3)), run=1))
    answered(site.send("query.prepare_secagg", _secure_sum_content("prepare/run2", (1, 2)), run=2))


def test_policy_init_writes_the_line_true_and_prepare_apply_stays_allowed(tmp_path, monkeypatch):
    from client.policy import SitePolicy, load_policy

    path = _init_policy(tmp_path / "hospital" / "policy.toml", monkeypatch)
    policy = load_policy(path)
    assert policy.preparation.once_per_consortium is True
    assert "once_per_consortium = true" in path.read_text()
    assert SitePolicy(consortium="x").preparation.once_per_consortium is True  # the model's default
    assert f"line {policy.lines[RULE]}: {RULE} = True" in policy.where(RULE)
    # applying the agreed statistics releases nothing: query.prepare_apply carries no preparation hash
    from client.guard import decode_request

    apply = instruction(0, "query.prepare_apply", _stats_content(True))
    assert decode_request(apply).preparation_sha256 is None
    assert decode_request(instruction(0, "query.prepare_stats", _stats_content(True))).preparation_sha256


def test_policy_text_helper_has_no_line_so_the_default_holds(tmp_path):
    """A policy written before the line (no key in its [preparation]) gets the default: true."""
    from client.policy import parse_policy

    assert parse_policy(policy_text()).preparation.once_per_consortium is True
