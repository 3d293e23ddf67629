"""Many small sites (issue 25 item 3): what a simulated consortium holds grows with its patients, not with copies per
site, and a round's coordinator work grows linearly in the sites.

* The simulated sites of one process work in one shared model (each message loads the weights it carries first),
  so n sites hold one model's storage, not n (4.7 MB each for the OV preset: 470 MB at 100 sites).
* A process that simulates one consortium after another (a study's worker) keeps only the current one's sites.
* The update screen judges the direction of large steps only (only they can be rejected), so an honest round
  looks at each step a bounded number of times instead of once per pair of sites.
* The simulation's scoring runtimes share that model too; a run's results are those of separate models.
"""

from __future__ import annotations

import numpy as np
import pytest

from client import handlers
from magnet_core.federation.screening import ScreenMemory, screen_updates
from server.config import FederatedConfig
from simulations.engine import run_inprocess

SITES = 6


def _scenario(tmp_path, n: int, name: str = "many") -> str:
    path = tmp_path / f"{name}-{n}.toml"
    path.write_text(f'name = "{name}-{n}"\nnum_sites = {n}\npartition = "iid"\n')
    return str(path)


def _cfg(tmp_path, scenario: str, seed: int = 1) -> FederatedConfig:
    return FederatedConfig(data_path="generated:60", scenario=scenario, seed=seed, num_server_rounds=1,
                           local_epochs=1, min_sites=SITES, min_count=5, overwrite=True, report=False,
                           out_dir=str(tmp_path / f"run-{seed}"))


def _sim_sites() -> list:
    return [rt for key, rt in handlers._SITES.items() if key[0] == "sim"]


def test_simulated_sites_share_one_model_not_one_each(tmp_path):
    handlers.forget_sites()
    run_inprocess(_cfg(tmp_path, _scenario(tmp_path, SITES)), SITES)
    sites = _sim_sites()
    assert len(sites) == SITES
    # the parameter storage the sites hold: one model's, whatever the number of sites
    storages = {p.data_ptr() for rt in sites for p in rt.model.state_dict().values()}
    one_model = {p.data_ptr() for p in sites[0].model.state_dict().values()}
    assert storages == one_model, f"{len(storages) // len(one_model)} models' storage for {SITES} sites"
    # and each site still holds only its own patients (no copy of the cohort per site)
    assert sum(rt.cohort.labels.shape[0] for rt in sites) == 60


def test_a_process_keeps_only_the_consortium_it_is_simulating(tmp_path):
    handlers.forget_sites()
    first = _scenario(tmp_path, SITES, "first")
    run_inprocess(_cfg(tmp_path, first, seed=1), SITES)
    run_inprocess(_cfg(tmp_path, _scenario(tmp_path, SITES, "second"), seed=2), SITES)
    kept = {key[2] for key in handlers._SITES if key[0] == "sim"}
    assert kept == {str(tmp_path / f"second-{SITES}.toml")}
    assert len(_sim_sites()) == SITES


class _CountingSteps(dict):
    """node -> step; counts how often a step is read (each pairwise cosine reads two)."""

    reads = 0

    def __getitem__(self, key):
        type(self).reads += 1
        return super().__getitem__(key)


@pytest.mark.parametrize("n", [40])
def test_an_honest_round_screen_reads_each_step_a_bounded_number_of_times(n):
    rng = np.random.default_rng(0)
    glob = {"w": rng.normal(size=2000).astype(np.float32)}
    base = rng.normal(size=2000).astype(np.float32) * 0.05
    steps = _CountingSteps({i: base + rng.normal(size=2000).astype(np.float32) * 0.01 for i in range(1, n + 1)})
    _CountingSteps.reads = 0
    decisions = screen_updates(glob, steps, ScreenMemory())
    assert all(d.reason is None for d in decisions.values())  # honest: nobody rejected
    assert _CountingSteps.reads <= 2 * n, f"{_CountingSteps.reads} reads of {n} steps (pairs: {n * (n - 1)})"


def test_a_large_opposed_step_is_still_rejected_among_many():
    rng = np.random.default_rng(1)
    glob = {"w": rng.normal(size=500).astype(np.float32) * 10}
    base = rng.normal(size=500).astype(np.float32) * 0.05
    steps = {i: base + rng.normal(size=500).astype(np.float32) * 0.005 for i in range(1, 31)}
    steps[31] = -base * 30  # opposed to all and 30x their size
    steps[32] = base * 30  # as large, along the others: clipped, not rejected
    decisions = screen_updates(glob, steps, ScreenMemory())
    assert decisions[31].reason and "opposed and large" in decisions[31].reason
    assert decisions[32].reason is None and decisions[32].bound is not None
    assert all(decisions[i].reason is None for i in range(1, 31))


def test_every_method_gets_a_global_metric_from_sites_below_k_under_secure_evaluation(tmp_path):
    """The sites study's 20- and 50-site cells (each site holds fewer than k test patients): the reference methods
    too are pooled by secure evaluation (k on the consortium's sums), and the metric is exactly that of the pooled
    predictions; under the plain rule every site withholds, so no metric exists."""
    from magnet_core.consortium.simulated import load_consortium
    from magnet_core.model.config import get_preset
    from magnet_core.model.metrics import metrics_from_confusion
    from simulations.simulate import RunSpec, fresh_runtime, run_methods, train_alone

    scenario = _scenario(tmp_path, SITES)
    spec = RunSpec(data_path="generated:60", scenario=scenario, seed=3, rounds=1, local_epochs=1,
                   out_dir=tmp_path / "out")
    secure = RunSpec(**{**spec.__dict__, "overrides": {"secure_evaluation": True}})
    _, sites = load_consortium("generated:60", scenario, 3, "")
    assert max(int((s.split == "test").sum()) for s in sites) < 5  # every site below k = 5
    plain, _, _ = run_methods(spec, ["centralized", "local_only"])
    summed, _, _ = run_methods(secure, ["centralized", "local_only"])
    for method in ("centralized", "local_only"):
        assert plain[method]["mcc"] is None and plain[method]["sites"] == 0
        assert summed[method]["mcc"] is not None and summed[method]["sites"] == sum(
            int((s.split == "test").sum()) > 0 for s in sites)
    # local-only, own sites' test patients: each site's own model on its own test patients, pooled exactly
    preset = get_preset(spec.preset)
    counts = []
    for s in sites:
        own = train_alone(fresh_runtime(s.name, s, preset, 3), preset, 1, 3)
        counts.append(fresh_runtime(s.name, s, preset, 3).evaluate_counts(own))
    exact = metrics_from_confusion(sum(np.asarray(c.confusion["all"]) for c in counts))
    assert summed["local_only"]["mcc"] == exact["mcc"]
    assert summed["local_only"]["patients"] == sum(c.num for c in counts)


def test_the_coordinator_screens_steps_computed_on_demand_with_the_same_decisions():
    """The coordinator no longer keeps one float64 step per site for the screen (StepsOnDemand computes a step when
    the screen reads it): the decisions are those of the materialised steps, a rejection included."""
    from magnet_core.federation.aggregate import StepsOnDemand, flat_delta

    rng = np.random.default_rng(2)
    glob = {"a": rng.normal(size=(30, 10)).astype(np.float32), "b": rng.normal(size=40).astype(np.float32)}
    step = {k: rng.normal(size=v.shape).astype(np.float32) * 0.05 for k, v in glob.items()}
    updates = {i: {k: glob[k] + step[k] + rng.normal(size=v.shape).astype(np.float32) * 0.01
                   for k, v in glob.items()} for i in range(1, 9)}
    updates[9] = {k: glob[k] - 40 * step[k] for k in glob}
    lazy = StepsOnDemand(glob, updates)
    eager = {node: flat_delta(glob, u) for node, u in updates.items()}
    assert list(lazy) == list(eager) and len(lazy) == 9
    assert screen_updates(glob, lazy, ScreenMemory()) == screen_updates(glob, eager, ScreenMemory())
    assert not screen_updates(glob, lazy, ScreenMemory())[9].accepted
