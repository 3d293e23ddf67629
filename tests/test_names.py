"""Site names bound by the coordinator (server/names.py): by node public key, by partition id, never by a reply."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.node_pb2 import NodeInfo

from server.config import RunConfigError
from server.names import SiteNames, read_site_keys


class _Grid:
    def __init__(self, nodes: list[NodeInfo]):
        self.nodes = nodes

    def get_nodes(self):
        return list(self.nodes)

    def get_node_ids(self):
        return [n.node_id for n in self.nodes]


def _key():
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def _ssh(key) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " site"


def _pem(key) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_name_follows_its_key_to_a_new_node_id_and_never_a_claim():
    a, b = _key(), _key()
    names = SiteNames.from_keys({"a": _ssh(a), "b": _ssh(b)})
    names.refresh(_Grid([NodeInfo(node_id=7, public_key=_pem(a)), NodeInfo(node_id=8, public_key=b"\x01" * 32)]))
    assert names.check(7, "a") is None and names.label(7) == "a"
    assert "not enrolled (its public key is not a key" in names.check(8, "b")
    assert names.refusal(8).endswith("sent nothing") and names.refusal(7) is None
    # site b's node comes back under a new id, site a's node rejoins as 9: each keeps its own name, not the other's
    names.refresh(_Grid([NodeInfo(node_id=9, public_key=_pem(a)), NodeInfo(node_id=10, public_key=_pem(b))]))
    assert names.check(9, "a") is None and names.check(10, "b") is None
    assert names.check(9, "b") == "node 9 enrolled as 'a' and now calls itself 'b'; 'b' belongs to node 10"
    assert "unknown to the grid" in names.check(7, "a")


def test_two_sites_may_not_enrol_one_key_and_a_bad_key_is_named():
    k = _ssh(_key())
    with pytest.raises(ValueError, match="sites 'a' and 'b' enrol the same public key"):
        SiteNames.from_keys({"a": k, "b": k})
    with pytest.raises(ValueError, match="site 'c': not an OpenSSH or PEM public key"):
        SiteNames.from_keys({"c": "ecdsa-sha2-nistp256 AAAA"})


def test_partitions_follow_the_registration_order_and_a_tie_is_refused():
    names = SiteNames.from_partitions(["site0", "site1"])
    names.refresh(_Grid([NodeInfo(node_id=50, registered_at="2026-01-01T00:00:00.000002+00:00"),
                         NodeInfo(node_id=99, registered_at="2026-01-01T00:00:00.000001+00:00"),
                         NodeInfo(node_id=10, registered_at="2026-01-01T00:00:00.000003+00:00")]))
    assert (names.label(99), names.label(50)) == ("site0", "site1")
    assert "partition 2, the simulation enrols 2 site(s)" in names.refusal(10)
    tie = [NodeInfo(node_id=n, registered_at="2026-01-01T00:00:00+00:00") for n in (1, 2)]
    with pytest.raises(RunConfigError, match="share a registration time"):
        names.refresh(_Grid(tie))


def test_site_keys_csv_errors_name_the_file_and_row(tmp_path):
    path = tmp_path / "registered_sites.csv"
    path.write_text("site,public_key\na,ssh-key-a\na,ssh-key-b\n")
    with pytest.raises(RunConfigError, match=r"registered_sites.csv row 3"):
        read_site_keys(path)
    path.write_text("name,key\n")
    with pytest.raises(RunConfigError, match="first row must be 'site,public_key'"):
        read_site_keys(path)
