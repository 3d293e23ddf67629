"""Nested (per-split) tuning for a study: each (cell, seed) chooses its methods' settings on its own validation
patients, so a setting is never chosen on a patient that the same split later tests on.

For a method with a grid (a study's ``[tune]`` table, checked by :func:`simulations.tune.check_grid`), every
setting of the grid is trained on the validation-only view of THAT cell and seed
(:func:`magnet_core.consortium.simulated.validation_view`: the split's test patients are dropped before anything
else, the rest get the view's own train / validation split) and scored on the view's validation patients as the
coordinator sees them (pooled under k; the evaluation the study declares, ``RunSpec.validation_metric``: under
"consortium" a site-specific model is scored on every site's validation patients). The setting with the highest
validation MCC is chosen (ties: the grid's order) and the reported run (the split's training patients, scored
on its test patients) uses it; that run's validation MCC is the chosen setting's, with no further training. The
validation pass runs before the reported run: no test label is read before the final evaluation.

"personalized" tunes only the part each site fine-tunes: the global model it starts from is the same for every
part, so it is trained once on the view (the modality-aware FedAvg run) and each part fine-tuned from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Mapping, Sequence

from magnet_core.consortium.methods import REFERENCE_METHODS
from server.loop import CHECKPOINT

from .simulate import (
    RunSpec,
    as_validation_view,
    consortium_of,
    final_params,
    personalized_evaluation,
    run_methods,
    validation_scores,
)
from .tune import PERSONALIZE_KEY, choose, settings_of

RULE = ("nested per split: for each cell, seed and tuned method, every setting of the method's grid is trained on "
        "the validation-only view of that cell and seed (its test patients dropped first, the rest re-split into "
        "training and validation patients) and the setting with the highest pooled validation MCC (under the "
        "study's declared evaluation) is chosen (ties: "
        "the grid's order); the reported run trains on the split's training patients with it and is scored on its "
        "test patients, and its validation MCC is the chosen setting's")


@dataclasses.dataclass
class ValidationPass:
    """What the validation-only view of one (cell, seed) gave: per method its validation MCC (a tuned method: the
    chosen setting's), per tuned method its tuning record, and per tuned method that could not choose, why."""

    val_mcc: dict[str, float | None]
    tuned: dict[str, dict[str, Any]]
    errors: dict[str, str]

    def choices(self) -> dict[str, dict[str, Any]]:
        return {m: t["choice"] for m, t in self.tuned.items() if t.get("choice") is not None}

    def reported_spec(self, spec: RunSpec) -> RunSpec:
        """``spec`` with every chosen setting: FederatedConfig fields per method, the personalized part."""
        choices = self.choices()
        method_overrides = {**spec.method_overrides}
        for method, choice in choices.items():
            fields = {k.replace("-", "_"): v for k, v in choice.items() if k != PERSONALIZE_KEY}
            if fields:
                method_overrides[method] = {**method_overrides.get(method, {}), **fields}
        part = choices.get("personalized", {}).get(PERSONALIZE_KEY, spec.personalize_part)
        return dataclasses.replace(spec, method_overrides=method_overrides, personalize_part=part,
                                   record_validation=False)


def validation_pass(spec: RunSpec, methods: Sequence[str], grids: Mapping[str, Mapping[str, list[Any]]],
                    record_untuned: bool) -> ValidationPass:
    """Tune every method of ``methods`` that has a grid, and (``record_untuned``) score the other trained methods
    once (not the references, centralized and local-only: a best-method rule never picks them), all on
    the validation-only view of ``spec``'s data and seed. Reads no test patient: the view has none."""
    tuned_methods = [m for m in methods if m in grids]
    untuned = [m for m in methods if m not in grids and m not in REFERENCE_METHODS] if record_untuned else []
    base = list(untuned)
    if "personalized" in tuned_methods and "federated" not in base:
        base.append("federated")  # the global model every part is fine-tuned from
    scores = validation_scores(spec, base) if base else {}
    val_mcc: dict[str, float | None] = {m: _finite(scores.get(m)) for m in untuned}
    tuned: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for method in tuned_methods:
        settings = settings_of(dict(grids[method]))
        t0 = time.process_time()
        if method == "personalized":
            values = personalized_scores(spec, [s[PERSONALIZE_KEY] for s in settings])
        else:
            values = [setting_score(spec, method, s, i) for i, s in enumerate(settings)]
        record: dict[str, Any] = {"grid": {k: list(v) for k, v in grids[method].items()},
                                  "settings": [{"setting": s, "val_mcc": v} for s, v in zip(settings, values)],
                                  "rule": RULE, "validation_metric": spec.validation_metric,
                                  "choice": None, "choice_index": None,
                                  "cpu_seconds": time.process_time() - t0}  # this process's CPU for the grid
        try:
            best = choose([[v] for v in values])
        except ValueError as exc:
            errors[method] = f"tuning: {exc}"
        else:
            record.update(choice=settings[best], choice_index=best)
            val_mcc[method] = values[best]
        tuned[method] = record
    return ValidationPass(val_mcc, tuned, errors)


def setting_score(spec: RunSpec, method: str, setting: dict[str, Any], index: int) -> float | None:
    """One training of ``method`` with ``setting`` on the validation-only view; its pooled validation MCC."""
    fields = {k.replace("-", "_"): v for k, v in setting.items()}
    view = dataclasses.replace(spec, data_path=as_validation_view(spec.data_path), record_validation=False,
                               out_dir=spec.out_dir / "validation" / f"tune-{method}-{index}",
                               method_overrides={**spec.method_overrides,
                                                 method: {**spec.method_overrides.get(method, {}), **fields}})
    results, _, _ = run_methods(view, [method])
    # the finished run keeps its final model, history and report; its resume checkpoint (about three times the
    # model's size, never read again: study runs start over) would make every grid value cost that much disk
    (view.out_dir / "runs" / f"{method}-seed{view.seed}" / CHECKPOINT).unlink(missing_ok=True)
    return _finite(results.get(method, {}).get(spec.validation_metric))


def personalized_scores(spec: RunSpec, parts: Sequence[str]) -> list[float | None]:
    """Each part fine-tuned from the modality-aware FedAvg model that :func:`validation_pass` trained on the view
    (``simulations.simulate.validation_scores`` writes it under ``validation/``); each part's validation MCC."""
    view = dataclasses.replace(spec, data_path=as_validation_view(spec.data_path), record_validation=False,
                               out_dir=spec.out_dir / "validation")  # where validation_scores ran it
    fed_dir = view.out_dir / "runs" / f"federated-seed{view.seed}"
    global_params = final_params(fed_dir)
    _, _, runtimes = consortium_of(view)
    return [_finite(personalized_evaluation(view, runtimes, global_params, part,
                                            fed_dir / f"personalization-{part}.json").get(spec.validation_metric))
            for part in parts]


def compact(record: Mapping[str, Any] | None) -> str:
    """A tuning record as the tidy CSV's ``tuned`` cell (compact JSON: the choice, each setting's validation MCC in
    the grid's order, and which validation score chose); "" for a method without a grid."""
    if not record:
        return ""
    grid = [{**r["setting"], "val_mcc": r["val_mcc"]} for r in record["settings"]]
    return json.dumps({"choice": record["choice"], "grid": grid,
                       "validation_metric": record.get("validation_metric", "mcc")}, separators=(",", ":"))


def expand(text: str) -> tuple[list[dict[str, Any]], list[float | None], Any, str]:
    """The inverse of :func:`compact`: (the grid's settings in order, their validation scores, the choice, the
    validation metric). Raises json.JSONDecodeError / KeyError / TypeError / AttributeError on a malformed cell."""
    record = json.loads(text)
    grid = [{k: v for k, v in g.items() if k != "val_mcc"} for g in record["grid"]]
    return grid, [g.get("val_mcc") for g in record["grid"]], record["choice"], record.get("validation_metric", "mcc")


def _finite(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
