"""The site's list of approved app bundles, `magnet-fl deploy approve-app`, and the SuperNode's check of every bundle
(without a network; the attack on a live deployment is tests/test_deployment_attacks.py)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import pytest
from deployment_attacks import BENIGN_CLIENT_APP, EVIL_CLIENT_APP, write_app
from test_control_plane import _site, deploy, pki  # noqa: F401  (fixtures)

from client import approved_apps
from client.supernode_launcher import OPTIONS, checked_options


def _flower_bundle_sha256(app) -> str:
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def test_approve_app_lists_the_hash_of_the_bundle_flwr_run_sends(tmp_path, deploy):  # noqa: F811
    site = tmp_path / "site"
    app = write_app(tmp_path / "apps", "reviewed", BENIGN_CLIENT_APP)
    out = deploy("approve-app", "--bundle", site, app, "--note", "release 1.0 reviewed by the DPO")
    assert out.returncode == 0, out.stderr
    listed = approved_apps.load(site / approved_apps.FILE)
    assert listed.hashes() == {_flower_bundle_sha256(app)}
    assert listed.app[0].note == "release 1.0 reviewed by the DPO" and listed.app[0].approved
    assert (site / approved_apps.FILE).stat().st_mode & 0o777 == 0o600
    assert deploy("approve-app", "--bundle", site, app).returncode == 0  # once only
    assert len(approved_apps.load(site / approved_apps.FILE).app) == 1
    fab = tmp_path / "built.fab"  # a bundle file (as `flwr build` writes it): its bytes' hash
    fab.write_bytes(b"PK-some-bundle")
    assert deploy("approve-app", "--file", site / approved_apps.FILE, "--fab", fab).returncode == 0
    assert hashlib.sha256(b"PK-some-bundle").hexdigest() in approved_apps.load(site / approved_apps.FILE).hashes()
    bad = deploy("approve-app", "--bundle", site, "--sha256", "12ab")
    assert bad.returncode == 2 and "'12ab' is not a sha256 (64 hex digits)" in bad.stderr
    both = deploy("approve-app", "--bundle", site, app, "--sha256", "ab" * 32)
    assert both.returncode == 2 and "exactly one of APP_DIR, --fab FILE or --sha256" in both.stderr


def test_flower_builds_the_same_bundle_from_the_same_tree(tmp_path):
    """What makes approving a source tree meaningful: the same files give the same bundle hash, any change another."""
    app = write_app(tmp_path / "a", "reviewed", BENIGN_CLIENT_APP)
    copy = tmp_path / "b" / "reviewed"
    shutil.copytree(app, copy)
    assert _flower_bundle_sha256(app) == _flower_bundle_sha256(copy)
    (copy / "reviewed_client.py").write_text(EVIL_CLIENT_APP)
    assert _flower_bundle_sha256(app) != _flower_bundle_sha256(copy)


def test_a_supernode_without_an_approved_bundle_does_not_start(pki, tmp_path, deploy):  # noqa: F811
    at_site = _site(pki, tmp_path)
    (at_site / approved_apps.FILE).unlink()
    data = tmp_path / "data"
    data.mkdir()
    common = ("--bundle", at_site, "--data", data, "--manifest", tmp_path / "m.toml", "--skip-validation", "--print")
    out = deploy("supernode", *common)
    assert out.returncode == 2 and "no app bundle is approved for this site" in out.stderr
    given = "cd" * 32
    out = deploy("supernode", *common, "--approved-fab-sha256", given)
    assert out.returncode == 0 and f"--approved-fab-sha256={given}" in out.stdout
    # the launcher refuses on its own too (it may be started without `deploy supernode`)
    options = {**OPTIONS, "approved-apps": str(at_site / approved_apps.FILE), "secret-file": str(tmp_path / "s")}
    with pytest.raises(ValueError, match="no app bundle is approved for this site"):
        checked_options(options)
    with pytest.raises(ValueError, match="--approved-fab-sha256 'xyz' is not a sha256"):
        checked_options({**options, "approved-fab-sha256": "xyz"})
    assert checked_options({**options, "approved-fab-sha256": given})[3] == {given}


def test_the_list_is_read_at_every_run_and_an_unreadable_list_refuses_all(tmp_path):
    listed = tmp_path / approved_apps.FILE
    check = approved_apps.checker(listed)
    first, second = "1a" * 32, "2b" * 32
    assert "is not approved by this site" in check(first)
    approved_apps.approve(listed, first)
    assert check(first) is None and check(second) is not None  # approved from the next run on, no restart
    listed.write_text("# withdrawn\n")
    assert "is not approved by this site" in check(first)
    listed.write_text("[[app]]\nsha256 = 'nope'\n")
    assert str(listed) in check(first) and "not a list of approved app bundles" in check(first)
    assert approved_apps.checker(listed, {first})(first) is not None  # a broken list refuses even a given hash


def test_the_supernode_refuses_a_bundle_whose_bytes_do_not_match_its_announced_hash():
    """A coordinator announcing an approved hash for other bytes: refused, never stored, INVALID_FAB reply (run in a
    child process: the hook changes Flower's module; Flower's own in-memory node state)."""
    code = """
import hashlib
from flwr.app import Message, RecordDict
from flwr.proto.message_pb2 import ObjectTree
from flwr.supercore.fab import Fab
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal as sci
from flwr.supernode.nodestate import NodeStateFactory
from flower_compat.simulation import enter_task_identity
from flower_compat.supernode import refuse_unapproved_apps

approved = hashlib.sha256(b"the reviewed bundle").hexdigest()
asked = []
refuse_unapproved_apps(lambda digest: asked.append(digest) or (None if digest == approved else "not approved"))
enter_task_identity(5)
factory = NodeStateFactory(ObjectStoreFactory())
state, store = factory.state(), factory.objectstore_factory.store()
message = Message(RecordDict(), dst_node_id=1, message_type="query")
message.metadata.__dict__["_message_id"] = "m1"
run = Run.create_empty(5)
run.fab_hash = approved
run_id = sci._pull_and_store_message(
    state=state, object_store=store, node_config={}, receive=lambda: (message, ObjectTree()),
    get_run=lambda rid: run, get_fab=lambda h, rid: Fab(h, b"other bytes", {}), pull_object=None,
    confirm_message_received=None, trusted_entities=None)
replies = state.get_messages_legacy(is_reply=True)
print(run_id, asked, state.get_run(5), [(r.error.code, r.error.reason) for r in replies])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    said = out.stdout.strip()
    assert said.startswith("5 [] None [(7, 'app bundle refused by this site: its bytes hash to sha256"), said
