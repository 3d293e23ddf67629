"""Seeds and study runs on parallel worker processes give exactly the results of running them one by one, in task
order, with progress forwarded and each worker under the thread policy."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import pytest

from magnet_core.model.threads import THREADS_ENV, available_cores
from simulations.cli import main
from simulations.parallel import AUTO, parse_workers, resolve_workers, run_tasks


def _late_first(task: tuple[int, int], advance) -> dict:
    """Earlier tasks sleep longer, so they finish after later ones when run in parallel."""
    i, n = task
    import torch

    time.sleep(0.4 * (n - i))
    advance(i + 1)
    return {"i": i, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _fails_on_two(task: int, advance) -> int:
    if task == 2:
        raise ValueError("task two is bad")
    return task


def test_parallel_results_and_callbacks_come_in_task_order_with_progress_and_the_thread_policy():
    tasks = [(i, 4) for i in range(4)]
    advanced, seen = [], []
    results = run_tasks(_late_first, tasks, workers=2, advance=advanced.append,
                        on_result=lambda i, r: seen.append(i))
    assert [r["i"] for r in results] == [0, 1, 2, 3]
    assert seen == [0, 1, 2, 3]  # on_result in task order though task 1 finished before task 0
    assert sorted(advanced) == [1, 2, 3, 4]  # every advance() of every worker reached the parent
    assert len({r["pid"] for r in results}) == 2 and os.getpid() not in {r["pid"] for r in results}
    forced = os.environ.get(THREADS_ENV)
    expected = int(forced) if forced else max(1, available_cores() // 2)
    assert {r["threads"] for r in results} == {expected}  # the policy for 2 workers, applied in each
    assert {r["wait_policy"] for r in results} <= {"PASSIVE", os.environ.get("OMP_WAIT_POLICY")}


def test_one_worker_runs_in_this_process():
    results = run_tasks(_late_first, [(0, 1), (1, 1)], workers=1)
    assert {r["pid"] for r in results} == {os.getpid()}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_task_raises_its_own_error_naming_the_task(workers):
    with pytest.raises(ValueError, match="task two is bad") as info:
        run_tasks(_fails_on_two, [0, 1, 2, 3], workers=workers, label=lambda t: f"task #{t}")
    assert any("task #2" in note for note in getattr(info.value, "__notes__", []))


def test_workers_argument():
    assert parse_workers("3") == 3 and parse_workers("auto") == AUTO
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_workers(bad)
    assert resolve_workers(8, 3) == 3  # never more processes than runs
    assert resolve_workers(AUTO, 100) == available_cores()
    with pytest.raises(ValueError, match="positive integer"):
        resolve_workers(0, 3)


@pytest.fixture
def one_thread(monkeypatch):
    """The serial reference run at one thread in this process (the workers' thread count on a 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv(THREADS_ENV, "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_centralized_seeds_in_parallel_train_the_same_weights_and_metrics_as_one_by_one(ov_path, one_thread):
    from magnet_core.cohort.data import load_for_seed
    from magnet_core.model.config import get_preset
    from simulations.centralized import SeedRun, train_seed

    preset = get_preset("ov")
    preset = preset.model_copy(update={"train": preset.train.model_copy(update={"epochs": 15})})
    runs = [SeedRun(load_for_seed(ov_path, seed, log=lambda *a, **k: None), preset, seed) for seed in (10, 20, 30)]
    serial = run_tasks(train_seed, runs, workers=1)
    epochs: list[int] = []
    parallel = run_tasks(train_seed, runs, workers=2, advance=epochs.append)
    assert sum(epochs) == 3 * 15
    for one, two in zip(serial, parallel):
        assert one.metrics == two.metrics  # exactly, float for float
        assert one.params.keys() == two.params.keys()
        for key in one.params:
            np.testing.assert_array_equal(one.params[key], two.params[key], err_msg=key)
    assert serial[0].metrics != serial[1].metrics  # the seeds differ: equality above is not vacuous


def test_centralized_cli_with_workers_writes_the_same_results(ov_path, one_thread, tmp_path, capsys):
    args = ["centralized", "--data", str(ov_path), "--preset", "ov", "--seeds", "20,10", "--epochs", "10"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.index("seed 20: test MCC") < out.index("seed 10: test MCC")  # printed in the order given
    import json

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["workers"] == 1 and two["workers"] == 2
    assert one["metrics"] == two["metrics"]
    assert len(two["seconds_per_seed"]) == 2


STUDY = """
name = "par"
dataset = "tcga-ov-magnet"
preset = "ov"
rounds = 2
local_epochs = 1
seeds = [10, 20]
methods = ["centralized", "local_only", "federated"]

[[cells]]
id = "two-sites"
x = 2
scenario = { num_sites = 2, partition = "iid" }

[[cells]]
id = "no-mirna"
x = 3
scenario = { num_sites = 3, partition = "iid", sites = { "2" = { miRNA = "absent" } } }
"""


def test_a_study_on_two_workers_writes_the_same_results_as_one_by_one(data_root, one_thread, tmp_path):
    spec = tmp_path / "par.toml"
    spec.write_text(STUDY)
    frames = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main(["study", "--data", str(data_root), "--study", str(spec), "--out", str(out),
                     "--workers", workers]) == 0
        frames[workers] = pd.read_csv(out / "par_tidy.csv").drop(columns=["seconds", "seconds_per_round"])
        assert not list(out.rglob(".*.tmp-*"))  # no temporary file left behind
    one, two = frames["1"], frames["2"]
    assert len(one) == 2 * 2 * 3 and one["error"].isna().all()  # cells x seeds x methods, none failed
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert one["mcc"].nunique() > 1


def test_parallel_study_needs_the_inprocess_engine(data_root, tmp_path, capsys):
    spec = tmp_path / "par.toml"
    spec.write_text(STUDY)
    code = main(["study", "--data", str(data_root), "--study", str(spec), "--out", str(tmp_path / "o"),
                 "--engine", "flower", "--workers", "2"])
    assert code == 2
    assert "needs --engine inprocess" in capsys.readouterr().err
