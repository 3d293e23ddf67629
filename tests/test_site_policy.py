"""The site policy file and state folder: clear errors naming the line, the key or the folder; `site policy init`
writes a policy that `site policy check` reads back; the accountant is the one of magnet_core.federation.dp."""

from __future__ import annotations

import os
import sys

import pytest

from client.accountant import SiteAccountant, round_multiplier
from client.policy import PolicyError, load_policy, parse_policy, template
from client.site_state import SiteState, StateFolderError
from magnet_core.federation.dp import rdp_epsilon


def test_a_bad_value_is_named_with_its_file_line_and_key(tmp_path):
    path = tmp_path / "policy.toml"
    text = template("ov").replace("local_epochs = [1, 20]", "local_epochs = [20, 1]")
    path.write_text(text)
    line = text.splitlines().index("local_epochs = [20, 1]") + 1
    with pytest.raises(PolicyError, match=rf"policy.toml line {line}: ranges.local_epochs: .*low 20 is above high 1"):
        load_policy(path)
    path.write_text(template("ov") + "\n[privacy]\nnoise = 2\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(path)
    with pytest.raises(PolicyError, match=r"line 2: typo_key: Extra inputs are not permitted"):
        parse_policy('consortium = "ov"\ntypo_key = 1\n', "p.toml")


def test_a_refusal_names_the_line_of_the_rule(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(template("ov"))
    policy = load_policy(path)
    assert policy.where("privacy.epsilon_budget") == f"{path} line 17: privacy.epsilon_budget = 10.0"
    assert policy.where("ranges.rounds") == f"{path} line 23: ranges.rounds = [1, 100]"
    assert parse_policy('consortium = "ov"\n', str(path)).where("min_count").endswith("(default): min_count = 5")
    # a policy written before the rule existed releases no class prototypes
    assert parse_policy('consortium = "ov"\n', str(path)).release_class_prototypes is False
    assert policy.where("release_class_prototypes") == f"{path} line 6: release_class_prototypes = False"
    # nor single-step updates (fedsgd's gradient, one local epoch in the clear)
    assert parse_policy('consortium = "ov"\n', str(path)).release_gradients is False
    assert policy.where("release_gradients") == f"{path} line 7: release_gradients = False"


def test_a_state_folder_open_to_others_is_refused(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with pytest.raises(StateFolderError, match="open to others .mode 755"):
        SiteState(folder)


def test_the_sites_accountant_composes_rounds_with_the_rdp_accountant(tmp_path):
    with SiteState(tmp_path / "state") as state:
        for r in (1, 2, 3):
            state.accountant.charge("ov", 1, r, round_multiplier(1.0, threshold=3, colluding_sites=0))
        state.save()
    with SiteState(tmp_path / "state") as state:  # persisted across runs
        assert state.accountant.spent("ov", 1e-5) == pytest.approx(rdp_epsilon([1.0] * 3, 1e-5))
        assert state.accountant.spent("other", 1e-5) == 0.0
    # one colluding site of a threshold of 3: the round counts with z * sqrt(2 / 3)
    assert round_multiplier(1.0, 3, 1) == pytest.approx((2 / 3) ** 0.5)
    assert SiteAccountant(tmp_path / "state").multipliers("ov") == [1.0, 1.0, 1.0]


def test_policy_init_writes_a_policy_that_check_reads(tmp_path, capsys, monkeypatch):
    from simulations.cli import main

    path = tmp_path / "site" / "policy.toml"
    monkeypatch.setattr(sys, "argv", ["magnet-fl", "site", "policy", "init", str(path), "--consortium", "ov",
                                      "--min-count", "7"])
    assert main() == 0
    assert load_policy(path).min_count == 7 and (path.stat().st_mode & 0o777) == 0o600
    monkeypatch.setattr(sys, "argv", ["magnet-fl", "site", "policy", "init", str(path), "--consortium", "ov"])
    assert main() == 1 and "exists" in capsys.readouterr().out  # never overwritten
    monkeypatch.setattr(sys, "argv", ["magnet-fl", "site", "policy", "check", str(path)])
    assert main() == 0
    out = capsys.readouterr().out
    assert "policy is valid" in out and "epsilon 0 at delta 1e-05 (budget 10)" in out
