"""``magnet-fl simulate``: a federated consortium vs centralized and local-only references on the same patients."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import tomllib
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from magnet_core.artefacts.report import write_report
from magnet_core.cohort.data import Cohort
from magnet_core.cohort.generated import GENERATED_NOTICE
from magnet_core.consortium import methods as vocabulary
from magnet_core.consortium.methods import DEFAULT_SEEDS, METHOD_NAMES, REFERENCE_METHODS
from magnet_core.consortium.scenarios import load_scenario
from magnet_core.consortium.simulated import VALIDATION_PREFIX, load_consortium
from magnet_core.federation.privacy import DEFAULT_MAX_BINS, EvalRelease, release_eval
from magnet_core.model.config import PRESETS, Preset, get_preset
from magnet_core.model.metrics import EvalCounts, summarize
from magnet_core.model.personalize import personalize_sites
from magnet_core.model.prototypes import prediction_params
from magnet_core.model.site import TEST_GRAPHS, SiteRuntime
from magnet_core.model.train import make_optimizer, train_epochs
from server.config import FederatedConfig

from .cli import comma_list, existing_dir, parse_seeds, positive_int
from .outputs import check_output, run_staged
from .pooled_evaluation import CONSORTIUM, GROUPS, group_prefix, pooled, pooled_as_released, secure_pooled
from .reporting import console, print_comparison, write_json


@dataclasses.dataclass(frozen=True)
class FederatedMethod:
    """A federated method as FederatedConfig settings: ``fixed`` define it (a --set override that contradicts one
    is refused: the method would no longer be what its name says); ``defaults`` are its tuned values, which
    --set may change."""

    fixed: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # one full-batch step per round (fedsgd): the run has rounds x local epochs rounds of one epoch each, the same
    # number of epochs of gradient computation as every other method and centralized training
    one_step: bool = False

    def schedule(self, rounds: int, local_epochs: int) -> tuple[int, int]:
        """(server rounds, local epochs) of a run with the study's ``rounds`` x ``local_epochs`` budget."""
        return (rounds * local_epochs, 1) if self.one_step else (rounds, local_epochs)


# The tunables' built-in values, derived by the procedure declared before the studies it reads had finished (issue
# 23): `magnet-fl defaults --study docs/studies/label-skew --study docs/studies/gap` pooled the settings those studies
# chose per split on the consortium evaluation of each split's validation patients (simulations/nested.py) and each
# default is the setting chosen in the most cell-seeds (ties: the grid's order, the smallest change first). The
# counts, how many choices were ties and the values before: benchmarks/results/derived_defaults.json;
# tests/test_defaults.py checks these values against it. No test patient took part. FedProx's mu = 0.01 and
# logit-adjusted FedAvg's tau = 0.5 win on tied votes (with ties split they would be 1.0 and 1.0): the validation
# patients did not separate those settings. `magnet-fl tune` chooses them for new data on validation patients only;
# a default changes only by a recorded decision, never silently.
FEDPROX_MU = 0.01
FEDADAM_LR = 0.01
FEDYOGI_LR = 0.01
LOGIT_ADJUST_TAU = 0.5
FEDLC_TAU = 0.1
# personalized: the part each site fine-tunes (magnet_core.model.personalize.PARTS)
PERSONALIZE_PART = "head"
# fedproto: the weight lambda of FedProto's prototype term (Tan et al.'s public code uses 1), derived as the others
# from the label-skew study's per-split choices on validation patients (it is not in the gap study)
FEDPROTO_WEIGHT = 0.1
_NO_PROTO = {"prototype_weight": 0.0}
_PLAIN = {"proximal_mu": 0.0, "server_optimizer": "none", "label_adjustment": "none", **_NO_PROTO}
# A new federated method is one entry here plus its entry in magnet_core.consortium.methods.METHODS.
FEDERATED_METHODS: dict[str, FederatedMethod] = {
    "federated": FederatedMethod({"aggregation": "modality-aware", **_PLAIN}),
    "fedavg_plain": FederatedMethod({"aggregation": "fedavg", **_PLAIN}),
    "fedprox": FederatedMethod({"server_optimizer": "none", "label_adjustment": "none", **_NO_PROTO},
                               {"aggregation": "modality-aware", "proximal_mu": FEDPROX_MU}),
    "fedadam": FederatedMethod({"server_optimizer": "adam", "proximal_mu": 0.0, "label_adjustment": "none",
                                **_NO_PROTO},
                               {"aggregation": "modality-aware", "server_lr": FEDADAM_LR}),
    "fedyogi": FederatedMethod({"server_optimizer": "yogi", "proximal_mu": 0.0, "label_adjustment": "none",
                                **_NO_PROTO},
                               {"aggregation": "modality-aware", "server_lr": FEDYOGI_LR}),
    # label skew: each site's local cross-entropy is logit-adjusted by its own training-label counts
    # (magnet_core.model.loss.label_offsets: Menon et al. 2021 / Ren et al. 2020; Zhang et al. 2022)
    "logit_adjusted": FederatedMethod({"server_optimizer": "none", "proximal_mu": 0.0,
                                       "label_adjustment": "logit-adjust", **_NO_PROTO},
                                      {"aggregation": "modality-aware", "label_tau": LOGIT_ADJUST_TAU}),
    "fedlc": FederatedMethod({"server_optimizer": "none", "proximal_mu": 0.0, "label_adjustment": "fedlc",
                              **_NO_PROTO},
                             {"aggregation": "modality-aware", "label_tau": FEDLC_TAU}),
    # class prototypes of the fused embedding shared under k, FedProto's local term (magnet_core.model.prototypes:
    # Tan et al. 2022; with a shared model, as FedProc, Mu et al. 2023)
    "fedproto": FederatedMethod({"server_optimizer": "none", "proximal_mu": 0.0, "label_adjustment": "none"},
                                {"aggregation": "modality-aware", "prototype_weight": FEDPROTO_WEIGHT}),
    # one full-batch gradient per site and round, averaged by training patients, the centralized optimiser (the
    # preset's Adam and StepLR schedule) at the coordinator (FedSGD, McMahan et al. 2017; server-side optimiser,
    # Reddi et al. 2021): one optimiser over the sites' own graphs, with ten times the rounds; nothing to tune
    "fedsgd": FederatedMethod({"aggregation": "fedavg", "local_update": "gradient", "server_optimizer": "preset-adam",
                               "proximal_mu": 0.0, "label_adjustment": "none", **_NO_PROTO}, one_step=True),
}
METHODS = METHOD_NAMES
# Without --data: the generated cohort and scenario of the first run (README "Two commands"), where sites differ
# enough that one site alone learns less than the consortium (magnet_core.cohort.generated.GENERATED_VARIANTS).
DEMO_DATA, DEMO_SCENARIO = "generated:demo", "demo-6"
DEFAULT_METHODS = ("federated", "centralized", "local_only", "fedavg_plain")  # simulate's default (demo budget)
# run-config keys simulate sets itself (from its own options, or per method and seed): --set may not touch them
MANAGED_KEYS = frozenset({"num_server_rounds", "local_epochs", "seed", "preset", "data_path", "scenario", "modalities",
                          "min_sites", "out_dir", "overwrite", "resume", "test_graph", "report", "manifest",
                          "signing_key", "signing_cert"})
ROUND_FIELDS = ("method", "seed", "round", "mcc", "acc", "f1", "auroc", "auroc_low", "auroc_high", "server_mcc",
                "train_loss", "sites_aggregated", "sites_rejected", "seconds", "local_epochs_done")
TABLE_CAPTION = ("Own sites' test patients: each site scores its own test patients with the model it would use "
                 "(local-only: its own). Consortium test patients: every model of the method scores every site's "
                 "test patients. Pooled over: test sites, their distinct test patients (and models scored), per seed.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=existing_dir, default=None,
                   help=f"cohort folder; omitted: the generated demo cohort ({DEMO_DATA})")
    p.add_argument("--scenario", default=None,
                   help=f"built-in scenario name or a scenario TOML file (default: {DEMO_SCENARIO} on the generated "
                        "cohort, iid-3 with --data)")
    p.add_argument("--rounds", type=positive_int, default=RunSpec.rounds,
                   help=f"federated rounds (default {RunSpec.rounds})")
    p.add_argument("--local-epochs", type=positive_int, default=RunSpec.local_epochs,
                   help=f"local epochs per round (default {RunSpec.local_epochs})")
    p.add_argument("--seeds", type=parse_seeds, default=list(DEFAULT_SEEDS))
    p.add_argument("--preset", default=RunSpec.preset, choices=sorted(PRESETS))
    p.add_argument("--test-graph", choices=TEST_GRAPHS, default=RunSpec.test_graph,
                   help="evaluation graph: among-test (the paper's), attach-to-train (deployment rule) or isolated "
                        "(each test patient scored alone: no neighbour brings its site's label mix in)")
    p.add_argument("--engine", choices=("flower", "inprocess"), default="flower",
                   help="flower: Flower's simulation engine (Ray); inprocess: same code, no transport")
    p.add_argument("--ray-address", default=None,
                   help="HOST:PORT of an existing Ray cluster for --engine flower (default: start a local one)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), type=comma_list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                   help="override a run-config field of the federated methods (repeatable), e.g. "
                        "--set dp-clip-norm=1 --set proximal-mu=0.1; checked by the run configuration")
    p.add_argument("--record-validation", action="store_true",
                   help="also run every method on the validation-only view (test patients dropped first) and record "
                        f"its validation MCC as {VALIDATION_MCC!r} (doubles the run time)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in --out (default: refuse a folder that holds results)")


def key_value(text: str) -> tuple[str, Any]:
    """An argparse type: KEY=VALUE, the value read as a TOML value (true, 0.8, "text") or else as text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def parse_overrides(pairs: list[tuple[str, Any]], methods: list[str]) -> dict[str, Any]:
    """--set pairs as FederatedConfig fields (kebab-case keys), checked: known, not managed by simulate, not
    contradicting a selected method, and accepted by FederatedConfig for every selected federated method.
    One ValueError names the key and the problem."""
    fields = FederatedConfig.model_fields
    out: dict[str, Any] = {}
    for key, value in pairs:
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(f"--set {key}: not a run-config field; known: "
                             f"{', '.join(sorted(k.replace('_', '-') for k in fields if k not in MANAGED_KEYS))}")
        if name in MANAGED_KEYS:
            raise ValueError(f"--set {key}: set by simulate itself (use its own options, e.g. --rounds, --seeds, "
                             f"--preset, --scenario, --test-graph)")
        out[name] = value
    FederatedConfig.from_run_config({k.replace("_", "-"): v for k, v in out.items()})  # names a bad value
    for method in methods:
        if method not in FEDERATED_METHODS:
            continue
        for name, value in out.items():
            fixed = FEDERATED_METHODS[method].fixed
            if name in fixed and fixed[name] != value:
                raise ValueError(f"--set {name.replace('_', '-')}={value!r} contradicts method {method!r} "
                                 f"({name.replace('_', '-')} = {fixed[name]!r} defines it); choose --methods "
                                 f"without it")
        method_config(method, "", "demo-3", 0, overrides=out)  # every bad value named before any work
    return out


def method_config(method: str, data_path: str, scenario: str, seed: int, overrides: dict[str, Any] | None = None,
                  **settings: Any) -> FederatedConfig:
    """The FederatedConfig of a federated method: ``settings`` (rounds, preset, ...), then the method's tuned
    defaults, then --set ``overrides``, then the settings that define the method."""
    m = FEDERATED_METHODS[method]
    if m.one_step:  # the same budget of epochs, one per round
        defaults = FederatedConfig.model_fields
        rounds, epochs = m.schedule(settings.get("num_server_rounds", defaults["num_server_rounds"].default),
                                    settings.get("local_epochs", defaults["local_epochs"].default))
        settings = {**settings, "num_server_rounds": rounds, "local_epochs": epochs}
    data = {"data_path": data_path, "scenario": scenario, "seed": seed, **settings, **m.defaults,
            **(overrides or {}), **m.fixed}
    return FederatedConfig.from_run_config({k.replace("_", "-"): v for k, v in data.items()})


def concat_cohorts(parts: list[Cohort]) -> Cohort:
    """Pool sites' patients into one cohort (for the centralized reference)."""
    first = parts[0]
    return dataclasses.replace(
        first,
        sample_ids=np.concatenate([c.sample_ids for c in parts]),
        labels=np.concatenate([c.labels for c in parts]),
        X={m: np.concatenate([c.X[m] for c in parts]) for m in first.modalities},
        mask=np.concatenate([c.mask for c in parts]),
        split=np.concatenate([c.split for c in parts]),
        paired=np.concatenate([c.paired for c in parts]),
        name="pooled",
    )


def train_alone(runtime: SiteRuntime, preset: Preset, epochs: int, seed: int) -> dict[str, np.ndarray]:
    """Train a fresh model on one runtime's training patients (StepLR as the paper); return its params."""
    torch.manual_seed(seed)
    opt, sched = make_optimizer(runtime.model, preset.train)
    if runtime.train.n:
        train_epochs(runtime.model, runtime.train, preset.train, epochs, optimizer=opt, scheduler=sched)
    return runtime.get_params()


def fresh_runtime(name: str, cohort: Cohort, preset: Preset, seed: int) -> SiteRuntime:
    torch.manual_seed(seed)
    return SiteRuntime.build(name, cohort, preset.model, preset.graph.sparsity, preset.graph.rule, preset.graph.k)


def scoring_runtime(name: str, cohort: Cohort, preset: Preset) -> SiteRuntime:
    """A site's runtime for scoring models it is given (``evaluate_counts`` and personalization load the weights
    first): it works in the process's shared scratch model (magnet_core.model.site.scratch_model), so n sites do
    not hold n models."""
    return SiteRuntime.build(name, cohort, preset.model, preset.graph.sparsity, preset.graph.rule, preset.graph.k,
                             shared_model=True)


def release_settings(overrides: dict[str, Any] | None = None) -> tuple[int, int]:
    """(minimum count k, score bins) the sites release their evaluations with in this run (--set may change them)."""
    cfg = method_config("federated", "", "demo-3", 0, overrides)
    return cfg.min_count, min(cfg.histogram_bins, DEFAULT_MAX_BINS)


def evaluate(pairs: Iterable[tuple[str, SiteRuntime]], params: Mapping[str, dict[str, np.ndarray]],
             test_graph: str, release: tuple[int, int]) -> list[tuple[str, EvalRelease]]:
    """(model, site) pairs: the model's evaluation counts on the site's test patients, released by that site under
    the minimum count k with at most its cap of score bins (exactly as the federated evaluation is)."""
    k, bins = release
    return [(model, release_eval(counts, k, bins)) for model, counts in count_pairs(pairs, params, test_graph)]


def count_pairs(pairs: Iterable[tuple[str, SiteRuntime]], params: Mapping[str, dict[str, np.ndarray]],
                test_graph: str) -> list[tuple[str, EvalCounts]]:
    """(model, site) pairs: the model's evaluation counts on the site's test patients (before any release)."""
    return [(model, site.evaluate_counts(params[model], test_graph=test_graph)) for model, site in pairs]


def evaluated_both_ways(runtimes: list[SiteRuntime], params: Mapping[str, dict[str, np.ndarray]], test_graph: str,
                        release: tuple[int, int], secure: bool = False) -> dict:
    """A method's two evaluations (simulations.pooled_evaluation): ``params`` holds one model per site (keyed by
    site name) or a single model (any other key). ``secure``: both pooled by secure evaluation (k on the sums)."""
    per_site = set(params) == {s.name for s in runtimes}
    own_pairs = [(s.name if per_site else next(iter(params)), s) for s in runtimes]
    every_pairs = [(m, s) for m in params for s in runtimes]
    if secure:
        k, bins = release
        own_counts = count_pairs(own_pairs, params, test_graph)
        every_counts = own_counts if not per_site else count_pairs(every_pairs, params, test_graph)
        return {**secure_pooled(own_counts, k, bins), **secure_pooled(every_counts, k, bins, CONSORTIUM)}
    own = evaluate(own_pairs, params, test_graph, release)
    everyone = own if not per_site else evaluate(every_pairs, params, test_graph, release)
    return {**pooled(own), **pooled(everyone, CONSORTIUM)}


@dataclasses.dataclass
class RunSpec:
    """One consortium run: the data, scenario, seed and training budget shared by every method."""

    data_path: str  # "" = generated cohort
    scenario: str  # built-in name or TOML file
    seed: int
    preset: str = FederatedConfig.model_fields["preset"].default
    rounds: int = FederatedConfig.model_fields["num_server_rounds"].default
    local_epochs: int = FederatedConfig.model_fields["local_epochs"].default
    modalities: str = ""  # comma-separated subset ("" = all)
    engine: str = "inprocess"
    out_dir: Path = Path("runs/simulate")
    ray_address: str | None = None
    test_graph: str = FederatedConfig.model_fields["test_graph"].default
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # --set: FederatedConfig field -> value
    personalize_part: str = PERSONALIZE_PART  # what "personalized" fine-tunes (magnet_core.model.personalize.PARTS)
    # per federated method, FederatedConfig fields over ``overrides`` (a study's settings chosen per split on
    # validation patients: simulations/nested.py)
    method_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # also run every method on the validation-only view of the same data and seed and record its score as
    # VALIDATION_MCC (what a best-method rule or a tuner may read; test patients take no part in it)
    record_validation: bool = False
    # which evaluation of the validation-only view is the validation score (simulations/pooled_evaluation.py):
    # "mcc" (each site's own validation patients) or "consortium_mcc" (every model of the method scores every
    # site's validation patients: a site-specific model is not rewarded for knowing its own site's label mix)
    validation_metric: str = "mcc"

    def __post_init__(self) -> None:
        if self.validation_metric not in VALIDATION_METRICS:
            raise ValueError(f"validation_metric {self.validation_metric!r}: one of {sorted(VALIDATION_METRICS)}")


# the validation scores a run can be chosen by: own sites' or the consortium's validation patients
VALIDATION_METRICS = frozenset({"mcc", "consortium_mcc"})
# a method's validation MCC in its results: pooled over the sites' validation patients of the validation-only view
# (magnet_core.consortium.simulated.validation_view), as the coordinator sees them (under k); never a test score
VALIDATION_MCC = "val_mcc"


def validation_scores(spec: RunSpec, methods: list[str], advance=lambda n: None) -> dict[str, float | None]:
    """Each method's MCC on the sites' validation patients: the same run (method, scenario, seed, budget,
    settings) on the validation-only view of ``spec``'s data, which drops the test patients before anything else
    (training on the remaining patients' training part, scoring on their validation part)."""
    view = dataclasses.replace(spec, data_path=as_validation_view(spec.data_path), record_validation=False,
                               out_dir=spec.out_dir / "validation")
    results, _, _ = run_methods(view, methods, advance=advance)
    return {m: results.get(m, {}).get(spec.validation_metric) for m in methods}


def as_validation_view(data_path: str) -> str:
    """The data path of the validation-only view of ``data_path`` (itself when it already is one)."""
    return data_path if data_path.startswith(VALIDATION_PREFIX) else VALIDATION_PREFIX + data_path


def run_methods(spec: RunSpec, methods: list[str], advance=lambda n: None) -> tuple[dict, list, dict]:
    """Run the requested methods on the same sites; returns (metrics per method, per-round rows, seconds per
    method). ``advance(n)`` is called with the number of rounds (or round-equivalents) completed."""
    preset, sites, runtimes = consortium_of(spec)
    epochs = spec.rounds * spec.local_epochs
    release = release_settings(spec.overrides)
    secure = bool(spec.overrides.get("secure_evaluation"))  # every method pooled by secure evaluation (k on sums)
    results: dict[str, dict] = {}
    rounds: list[dict] = []
    seconds: dict[str, float] = {}

    if "centralized" in methods:
        t0 = time.perf_counter()
        pooled = fresh_runtime("pooled", concat_cohorts(list(sites)), preset, spec.seed)
        params = train_alone(pooled, preset, epochs, spec.seed)
        results["centralized"] = evaluated_both_ways(runtimes, {"centralized": params}, spec.test_graph, release,
                                                     secure)
        seconds["centralized"] = time.perf_counter() - t0
        advance(spec.rounds)
    if "local_only" in methods:
        t0 = time.perf_counter()
        own = {}
        for s in runtimes:
            alone = fresh_runtime(s.name, s.cohort, preset, spec.seed)
            own[s.name] = train_alone(alone, preset, epochs, spec.seed)
        results["local_only"] = evaluated_both_ways(runtimes, own, spec.test_graph, release, secure)
        seconds["local_only"] = time.perf_counter() - t0
        advance(spec.rounds)
    for method in FEDERATED_METHODS:
        if method not in methods:
            continue
        cfg = method_config(method, spec.data_path, spec.scenario, spec.seed,
                            {**spec.overrides, **spec.method_overrides.get(method, {})},
                            num_server_rounds=spec.rounds, local_epochs=spec.local_epochs, preset=preset.name,
                            modalities=spec.modalities, min_sites=len(sites), overwrite=True, report=False,
                            out_dir=str(spec.out_dir / "runs" / f"{method}-seed{spec.seed}"),
                            test_graph=spec.test_graph)
        t0 = time.perf_counter()
        share = spec.rounds / cfg.num_server_rounds  # progress in the study's rounds
        history = run_engine(spec.engine, cfg, len(sites), on_round=lambda r: advance(share),
                             ray_address=spec.ray_address)
        seconds[method] = time.perf_counter() - t0
        write_report(cfg.out_dir)  # each federated run (a simulate seed, a study cell) gets its report once, at the end
        results[method] = federated_evaluation(runtimes, history[-1], prediction_params(final_params(cfg.out_dir)),
                                               spec.test_graph, release, secure)
        results[method + "_server"] = history[-1].get("server") or {}
        for rec in history:
            g = rec["global"]
            rounds.append({"method": method, "seed": spec.seed, "round": rec["round"],
                           **{k: g.get(k) for k in ("mcc", "acc", "f1", "auroc", "auroc_low", "auroc_high")},
                           "server_mcc": (rec.get("server") or {}).get("mcc"), "train_loss": rec.get("train_loss"),
                           "sites_aggregated": len(rec["accepted"]), "sites_rejected": len(rec["rejected"]),
                           "seconds": rec["seconds"], "local_epochs_done": rec["round"] * cfg.local_epochs})
    if "personalized" in methods:  # each site fine-tunes the final modality-aware global model on its own patients
        t0 = time.perf_counter()
        fed_dir = spec.out_dir / "runs" / f"federated-seed{spec.seed}"
        if "federated" not in methods:  # the global model personalization starts from
            cfg = method_config("federated", spec.data_path, spec.scenario, spec.seed, spec.overrides,
                                num_server_rounds=spec.rounds, local_epochs=spec.local_epochs, preset=preset.name,
                                modalities=spec.modalities, min_sites=len(sites), overwrite=True, report=False,
                                out_dir=str(fed_dir), test_graph=spec.test_graph)
            run_engine(spec.engine, cfg, len(sites), on_round=lambda r: advance(1), ray_address=spec.ray_address)
        results["personalized"] = personalized_evaluation(spec, runtimes, final_params(fed_dir), spec.personalize_part,
                                                          fed_dir / "personalization.json")
        seconds["personalized"] = time.perf_counter() - t0
    if spec.record_validation and not spec.data_path.startswith(VALIDATION_PREFIX):
        for method, score in validation_scores(spec, methods).items():
            results[method][VALIDATION_MCC] = score
    return results, rounds, seconds


def consortium_of(spec: RunSpec) -> tuple[Preset, list[Cohort], list[SiteRuntime]]:
    """The run's preset, its sites' cohorts and their scoring runtimes (one shared model)."""
    preset = get_preset(spec.preset)
    _, sites = load_consortium(spec.data_path, spec.scenario, spec.seed, spec.modalities)
    return preset, list(sites), [scoring_runtime(s.name, s, preset) for s in sites]


def personalized_evaluation(spec: RunSpec, runtimes: list[SiteRuntime], global_params: dict[str, np.ndarray],
                            part: str, record: Path) -> dict:
    """Every site fine-tunes ``part`` of the global model on its own patients; the personalized models' two
    evaluations. What each site did is written to ``record``."""
    preset = get_preset(spec.preset)
    own, records = personalize_sites(runtimes, global_params, part, preset.train, seed=spec.seed)
    write_json(record, {"part": part, "sites": [r.model_dump() for r in records]})
    return evaluated_both_ways(runtimes, own, spec.test_graph, release_settings(spec.overrides),
                               bool(spec.overrides.get("secure_evaluation")))


def final_params(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The final global model a federated run wrote (``model.pt``)."""
    return {k: v.numpy() for k, v in torch.load(Path(run_dir) / "model.pt", weights_only=True).items()}


def federated_evaluation(runtimes: list[SiteRuntime], last: Mapping[str, Any], params: dict[str, np.ndarray],
                         test_graph: str, release: tuple[int, int], secure: bool = False) -> dict:
    """A federated method's two evaluations: on the sites' own test patients, the coordinator's pooled metrics of
    the last round (over the sites it pooled); on the consortium's test patients, the final global model scored
    on every site's test patients here, released and pooled the same way (``secure``: by secure evaluation)."""
    counts = count_pairs([("global", s) for s in runtimes], {"global": params}, test_graph)
    everyone = [(m, release_eval(c, *release)) for m, c in counts]
    pooled_over = (last.get("pooled_over") or {}).get("sites") or []
    own = pooled_as_released(last["global"], everyone, pooled_over, last.get("withheld") or {})
    secure = (last.get("screening") or {}).get("secure_evaluation")
    if secure and secure.get("status") == "pooled":  # the coverage of the secure sum (k applied to the sum)
        for g in GROUPS:
            n = (secure.get("patients") or {}).get(g, 0)
            own.update({f"{group_prefix(g)}sites": len(secure["sites"]) if n else 0, f"{group_prefix(g)}patients": n,
                        f"{group_prefix(g)}models": 1 if n else 0, f"{group_prefix(g)}pairs": len(secure["sites"])
                        if n else 0})
    if secure:
        return {**own, **secure_pooled(counts, *release, prefix=CONSORTIUM)}
    return {**own, **pooled(everyone, CONSORTIUM)}


def method_settings(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The strategy settings a federated method ran with (kebab-case), for results.json."""
    cfg = method_config(method, "", "demo-3", 0, overrides)
    # preset-adam takes its step size, betas and constant from the preset, not from the server-* settings
    server = ("server_lr", "server_beta1", "server_beta2", "server_tau") if cfg.server_optimizer != "preset-adam" \
        else ()
    keys = ("aggregation", "robust", "local_update", "proximal_mu", "server_optimizer", *server, "label_adjustment",
            "label_tau", "prototype_weight", *overrides)
    return {k.replace("_", "-"): getattr(cfg, k) for k in dict.fromkeys(keys)}


def data_path_of(args: argparse.Namespace) -> str:
    """The run's data path: --data, or the generated demo cohort."""
    return str(args.data) if args.data else DEMO_DATA


def run_seed(args: argparse.Namespace, seed: int, methods: list[str], progress: Progress, task) -> tuple[dict, list]:
    spec = RunSpec(data_path=data_path_of(args), scenario=args.scenario, seed=seed,
                   preset=args.preset, rounds=args.rounds, local_epochs=args.local_epochs, engine=args.engine,
                   out_dir=args.out, ray_address=args.ray_address, test_graph=args.test_graph,
                   overrides=dict(getattr(args, "override_fields", {})),
                   record_validation=bool(getattr(args, "record_validation", False)))
    progress.update(task, description=f"seed {seed}")
    results, rounds, _ = run_methods(spec, methods, advance=lambda n: progress.advance(task, n))
    return results, rounds


def run_engine(engine: str, cfg: FederatedConfig, num_sites: int, on_round, ray_address: str | None = None
               ) -> list[dict]:
    from .engine import run_flower, run_inprocess

    if engine == "inprocess":
        return run_inprocess(cfg, num_sites, on_round=on_round)[1]
    return run_flower(cfg, num_sites, ray_address=ray_address, on_round=on_round)[1]


def evaluation_text(test_graph: str) -> str:
    """How results.json's metrics were obtained (its "evaluation" field)."""
    return (f"Two evaluations of every method, test graph rule {test_graph!r}. Keys without prefix: each site scores "
            "its own test patients with the model it would use (local-only and personalized: its own model; the "
            "other methods: the one global model; for the federated methods, the coordinator's pooled metrics of "
            "the last round). Keys prefixed 'consortium_': every model of the method scores every site's test "
            "patients, one release per (model, site) pair. In both, each site releases its confusion matrices and "
            "score histograms under the minimum count k (a group of fewer than k patients is withheld) and the "
            "releases are summed: MCC, accuracy and F1 are exactly those of the pooled predictions; AUROC is the "
            "midpoint of the interval auroc_low..auroc_high that the binned scores allow. AUPRC is not released "
            "(average precision needs the order of scores inside a bin): every auprc value is null. 'sites', "
            "'patients' and 'models' (with the same prefixes, and paired_/unpaired_ per group) give the test sites "
            "that released the group, their distinct test patients and the models scored.")


def write_rounds_csv(path: Path, rounds: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ROUND_FIELDS)
        writer.writeheader()
        writer.writerows(rounds)


def plot_rounds(path: Path, rounds: list[dict], results: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in FEDERATED_METHODS:
        color = vocabulary.color(method, "tab:gray")
        rows = [r for r in rounds if r["method"] == method and r["mcc"] is not None]
        if not rows:
            continue
        # x: local epochs done per site, so that fedsgd's rounds of one epoch line up with the others' rounds
        rs = sorted({r["local_epochs_done"] for r in rows})
        by_round = [[r["mcc"] for r in rows if r["local_epochs_done"] == k] for k in rs]
        mean = np.array([np.mean(v) for v in by_round])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in by_round])  # sample std
        ax.plot(rs, mean, marker="o" if len(rs) <= 50 else None, ms=3, color=color, label=vocabulary.label(method))
        ax.fill_between(rs, mean - std, mean + std, color=color, alpha=0.15)
    for method in REFERENCE_METHODS:
        stat = results.get(method, {}).get("mcc")
        if stat and stat.get("mean") is not None:
            ax.axhline(stat["mean"], color=vocabulary.color(method, "tab:gray"), ls="--",
                       label=f"{vocabulary.label(method)} (final)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("local epochs per site (rounds x local epochs)")
    ax.set_ylabel("global test MCC (pooled exactly)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        raise ValueError(f"--methods: unknown {bad or 'none given'}; choose from {list(METHODS)}")
    args.override_fields = parse_overrides(list(getattr(args, "overrides", None) or []), methods)
    if args.scenario is None:
        args.scenario = DEMO_SCENARIO if args.data is None else "iid-3"
    if not getattr(args, "_staged", False):  # checks before any work, then the run writes into a staging folder
        check_output(args.out, args.overwrite)
        load_scenario(args.scenario)
        for seed in args.seeds:  # every seed's data and sites are read (and cached) before any training
            load_consortium(data_path_of(args), args.scenario, seed, "")
        return run_staged(args, "simulate", run)
    scenario = load_scenario(args.scenario)
    generated = args.data is None
    if generated:
        console.print(f"[bold yellow]Using a {GENERATED_NOTICE}; pass --data PATH for real data.[/]")
    args.out.mkdir(parents=True, exist_ok=True)
    n_fed = sum(m in methods for m in FEDERATED_METHODS) + ("personalized" in methods and "federated" not in methods)
    n_ref = sum(m in methods for m in REFERENCE_METHODS)
    t0 = time.perf_counter()
    per_seed: dict[str, list[dict]] = {}
    rounds: list[dict] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("simulate", total=len(args.seeds) * args.rounds * (n_fed + n_ref))
        for seed in args.seeds:
            progress.update(task, description=f"seed {seed}")
            res, rr = run_seed(args, seed, methods, progress, task)
            for k, v in res.items():
                per_seed.setdefault(k, []).append(v)
            rounds.extend(rr)
            progress.console.print(f"seed {seed}: " + ", ".join(
                f"{k} MCC {v.get('mcc', float('nan')):.3f}" for k, v in res.items()
                if not k.endswith("_server") and v.get("mcc") is not None))
    wall = time.perf_counter() - t0
    results = {k: summarize(v) for k, v in per_seed.items() if not k.endswith("_server")}
    server = {k[: -len("_server")]: summarize(v) for k, v in per_seed.items() if k.endswith("_server")}
    title = f"{scenario.name} on {'generated cohort' if generated else args.data.name} ({len(args.seeds)} seeds)"
    if generated:
        title += f" — {GENERATED_NOTICE}"
    print_comparison(title, results,
                     caption=TABLE_CAPTION + f" Mean ± sample std (ddof 1) over {len(args.seeds)} seed(s).")
    payload = {
        "mode": "simulate", "scenario": scenario.model_dump(), "data": DEMO_DATA if generated else str(args.data),
        "generated_data": generated, "engine": args.engine, "preset": args.preset, "seeds": args.seeds,
        "methods": methods,
        "overrides": {k.replace("_", "-"): v for k, v in args.override_fields.items()},
        "method_settings": {m: method_settings(m, args.override_fields) for m in methods if m in FEDERATED_METHODS},
        "rounds_config": {"rounds": args.rounds, "local_epochs": args.local_epochs},
        "test_graph": args.test_graph,
        "evaluation": evaluation_text(args.test_graph),
        "results": results, "server_side_held_out": server, "rounds": rounds, "wall_seconds": wall,
    }
    write_json(args.out / "results.json", payload)
    write_rounds_csv(args.out / "rounds.csv", rounds)
    plot_rounds(args.out / "mcc_per_round.png", rounds, results, title)
    shown = getattr(args, "out_final", args.out)  # the staging folder is renamed to --out when the run succeeds
    console.print(f"wrote {shown}/results.json, rounds.csv, mcc_per_round.png ({wall:.1f} s)"
                  + (f" — {GENERATED_NOTICE}" if generated else ""))
    console.print(f"report: {write_report(args.out, shown_as=getattr(args, 'out_final', args.out))}"
                  + (f" — {GENERATED_NOTICE}" if generated else ""))
    return 0
