"""Every number in README.md, docs/**/*.md and benchmarks/README.md comes from a committed result file (issue 23).

Three checks, each a pure function of the repository root so that a planted wrong number can be shown to fail:

* ``claim_problems``: each claim below formats values read from a stored result (a study's summary JSON or tidy
  CSV, ``benchmarks/results/*.json``, ``docs/studies/privacy/*``) into the sentence the document must contain;
  a claim whose text is missing (a number changed in the document or in the result) is a problem.
* ``uncovered_numbers``: every decimal number, and every number with a unit (s, ms, x, %, GiB) or of the form
  a/b, in those documents must lie inside a claim's text or inside an allow-listed snippet of non-result numbers
  (versions, defaults, settings, counts of things). Code blocks, inline code, link targets and HTML comments are
  not read. The generated study reports are checked whole by ``test_study_reports_are_generated_from_their_csv``.
* ``test_study_reports_are_generated_from_their_csv``: each ``docs/studies/<name>/<name>_report.md`` equals what
  ``simulations.study.reanalyse`` writes from the committed tidy CSV and study spec.

Markdown is compared with runs of whitespace folded to one space, so line wrapping does not matter.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import tomllib

from magnet_core.consortium import methods as method_names
from simulations import statistics as st

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("extensibility", "fedsgd-gradient-screen", "gap", "heterogeneity", "label-skew", "label-skew-fedsgd",
           "label-skew-isolated", "mnar", "rate", "sites", "stress", "test-graph")
DATA_NOTE = "real TCGA data from `../shared/data`"  # what the committed reports were regenerated with
DOCUMENTS = ("README.md", "docs/studies/README.md", "benchmarks/README.md", "docs/deployment.md",
             "docs/secure-aggregation.md")


# ------------------------------------------------------------------------------------------------ reading results


def _load_json(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def f3(v: float) -> str:
    return f"{v:.3f}"


def s3(v: float) -> str:
    return f"{v:+.3f}"


def ci(lo: float, hi: float) -> str:
    return f"{lo:+.3f} to {hi:+.3f}"


def _summary(root: Path, study: str) -> dict:
    return _load_json(root, f"docs/studies/{study}/{study}_summary.json")


def cell(root: Path, study: str, cell_id: str, method: str, metric: str = "mcc") -> SimpleNamespace:
    """A cell's MCC (``metric``: "mcc", own sites' test patients, or "consortium_mcc"): ``m`` mean, ``s`` sample
    std (ddof 1), ``ms`` 'mean ± std', ``n`` seeds."""
    rows = [r for r in _summary(root, study)["rows"] if r["cell"] == cell_id and r["method"] == method]
    assert len(rows) == 1, (study, cell_id, method)
    r = rows[0]
    return SimpleNamespace(m=f3(r[f"{metric}_mean"]), s=f3(r[f"{metric}_std"]), n=str(r[f"{metric}_n"]),
                           ms=f"{f3(r[f'{metric}_mean'])} ± {f3(r[f'{metric}_std'])}")


def _ns(c: dict) -> SimpleNamespace:
    return SimpleNamespace(d=s3(c["mean_diff"]), ci=ci(c["ci_low"], c["ci_high"]), lo=s3(c["ci_low"]),
                           hi=s3(c["ci_high"]), dci=f"{s3(c['mean_diff'])}, 95% CI {ci(c['ci_low'], c['ci_high'])}",
                           p=c["p_value"], holm=c.get("p_holm"), bh=c.get("p_bh"))


def cmp(root: Path, study: str, cell_a: str, a: str, b: str, cell_b: str | None = None) -> SimpleNamespace:
    """A paired comparison stored in the study's summary JSON (``a`` minus ``b``; cell contrasts: ``a == b``)."""
    found = [c for c in _summary(root, study)["comparisons"]
             if c["cell"] == cell_a and c["cell_b"] == (cell_b or cell_a) and c["method"] == a and c["method_b"] == b]
    assert len(found) == 1, (study, cell_a, a, b, cell_b)
    return _ns(found[0])


def multiplicity(root: Path, study: str) -> SimpleNamespace:
    """How many comparisons a report makes, how many read helps/hurts on their own interval, how many keep
    p < 0.05 after Holm and after Benjamini-Hochberg (over the report)."""
    comps = _summary(root, study)["comparisons"]
    return SimpleNamespace(n=str(len(comps)),
                           detected=str(sum(c["verdict"] != "no difference detected" for c in comps)),
                           holm=str(sum(c["p_holm"] is not None and c["p_holm"] < 0.05 for c in comps)),
                           bh=str(sum(c["p_bh"] is not None and c["p_bh"] < 0.05 for c in comps)),
                           chance=str(round(0.05 * len(comps))))


def _tidy(root: Path, study: str) -> pd.DataFrame:
    return pd.read_csv(root / f"docs/studies/{study}/{study}_tidy.csv")


def versus_federated(root: Path, study: str = "gap") -> pd.DataFrame:
    """Every trained method minus modality-aware FedAvg, per cell, paired by seed, recomputed from the tidy CSV on the
    study's declared evaluation (the report compares with plain FedAvg instead), with Holm / BH adjusted over these
    comparisons."""
    df = _tidy(root, study)
    metric = _summary(root, study)["evaluation"]["metric"]
    trained = [m for m in _summary(root, study)["methods"] if m not in (*REFERENCES, "federated")]
    rows = []
    for cell_id in dict.fromkeys(df["cell"]):
        sub = df[df["cell"] == cell_id]
        base = st.values_by_unit(sub[sub["method"] == "federated"], metric)
        for m in trained:
            c = st.paired_comparison(st.values_by_unit(sub[sub["method"] == m], metric), base)
            rows.append({"cell": cell_id, "method": m, **c.to_dict()})
    out = pd.DataFrame(rows)
    out["p_holm"] = st.holm(out["p_value"].astype(float))
    out["p_bh"] = st.benjamini_hochberg(out["p_value"].astype(float))
    return out


def vs_fed(root: Path, cell_id: str, method: str) -> SimpleNamespace:
    t = versus_federated(root)
    row = t[(t["cell"] == cell_id) & (t["method"] == method)]
    assert len(row) == 1
    return _ns(row.iloc[0].to_dict())


# ------------------------------------------------------------------------------------------------ generated passages


REFERENCES = ("local_only", "centralized")


def _target(root: Path, study: str) -> float:
    return tomllib.loads((root / f"docs/studies/{study}/study.toml").read_text())["target_gap"]


def _pair(comps: pd.DataFrame, cell_id: str, method: str, ref: str) -> pd.Series:
    """The stored paired comparison ``method`` minus ``ref`` in one cell."""
    return comps[(comps["cell"] == cell_id) & (comps["method"] == method) & (comps["method_b"] == ref)].iloc[0]


def _meets(comps: pd.DataFrame, cell_id: str, method: str, target: float) -> bool:
    """The studies' target on the means: at or above local-only and within ``target`` of centralized."""
    return (_pair(comps, cell_id, method, "local_only")["mean_diff"] >= 0
            and _pair(comps, cell_id, method, "centralized")["mean_diff"] >= -target)


def gap_tables(root: Path) -> str:
    """The two gap tables of docs/studies/README.md, generated from gap_summary.json: per cell, the method the
    declared rule names (highest mean validation MCC) against the references on the declared evaluation; per
    method, how often the rule names it, meets the target on the means, and differs from a reference on its own
    interval and after Holm adjustment (over the report's family)."""
    s = _summary(root, "gap")
    target = _target(root, "gap")
    metric = s["evaluation"]["metric"]
    rows = pd.DataFrame(s["rows"])
    comps = pd.DataFrame(s["comparisons"])
    chosen = s["best_method"]["chosen"]
    trained = [m for m in s["methods"] if m not in REFERENCES]

    def dci(c: pd.Series) -> str:
        return f"{s3(c['mean_diff'])} ({ci(c['ci_low'], c['ci_high'])})"

    lines = ["| cell | seeds | local-only | centralized | named by the rule | named − local-only (95% CI) | "
             f"named − centralized (95% CI) | Holm p | target on the means | "
             f"loss > {target} ruled out (corrected CI) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cells = list(dict.fromkeys(rows["cell"]))
    for c in cells:
        sub = rows[rows["cell"] == c].set_index("method")
        best = chosen[c]
        lo, ce = _pair(comps, c, best, "local_only"), _pair(comps, c, best, "centralized")
        ms = {m: f"{f3(sub.loc[m, metric + '_mean'])} ± {f3(sub.loc[m, metric + '_std'])}" for m in sub.index}
        lines.append(f"| {c} | {sub.loc[best, metric + '_n']} | {ms['local_only']} | {ms['centralized']} | "
                     f"{method_names.label(best)} {ms[best]} | {dci(lo)} | {dci(ce)} | {f3(ce['p_holm'])} | "
                     f"{'met' if _meets(comps, c, best, target) else 'not met'} | "
                     f"{'yes' if ce['nb_ci_low'] >= -target else 'no'} |")

    def count(m: str, ref: str, verdict: str) -> str:
        sel = comps[(comps["method"] == m) & (comps["method_b"] == ref) & (comps["verdict"] == verdict)]
        return f"{len(sel)} / {int((sel['p_holm'] < 0.05).sum())}"

    lines += ["", f"| method | cells where the rule names it | cells meeting the target on the means (of {len(cells)}) "
              "| above local-only (own interval / Holm) | below local-only (own interval / Holm) "
              "| below centralized (own interval / Holm) |", "|---|---|---|---|---|---|"]
    for m in trained:
        lines.append(f"| {method_names.label(m)} | {sum(chosen[c] == m for c in cells)} | "
                     f"{sum(_meets(comps, c, m, target) for c in cells)} | {count(m, 'local_only', 'helps')} | "
                     f"{count(m, 'local_only', 'hurts')} | {count(m, 'centralized', 'hurts')} |")
    return "\n".join(lines)


GP = "benchmarks/results/graph_partition_label_skew.json"  # every cell at torch's default (2 threads)
GP1 = "benchmarks/results/graph_partition_label_skew_brca_1_thread.json"  # the BRCA cell at 1 thread, OV at 2


def graph_partition_lines(root: Path, rel: str = GP) -> str:
    """The label-skew gap split into graph partition and federated optimisation (benchmarks/graph_partition.py),
    one line per cell, generated from its result file."""
    r = _load_json(root, rel)
    lines = []
    for cid, c in r["cells"].items():
        m, p, q = c["means"], c["primary"], c["secondary"]
        named = method_names.label(c["named_method"])
        same = sum(v["centralized_reproduced"] for v in c["seeds"].values())
        threads = c["threads"]
        lines.append(
            f"* `{cid}` ({p['n']} seeds, {threads} torch thread{'s' if threads > 1 else ''}): centralized "
            f"{f3(m['centralized'])}, one optimiser on site-local graphs {f3(m['site_graphs'])}, {named} (stored) "
            f"{f3(m[c['named_method']])}. Site-local graphs minus centralized {s3(p['mean_diff'])} (95% CI "
            f"{ci(p['ci_low'], p['ci_high'])}, Holm p {f3(p['holm_p'])}); {named} minus site-local graphs "
            f"{s3(q['mean_diff'])} (95% CI {ci(q['ci_low'], q['ci_high'])}, Holm p {f3(q['holm_p'])}). The "
            f"recomputed centralized run equals the stored one in {same} of {len(c['seeds'])} seeds.")
    return "\n".join(lines)


GP3 = "benchmarks/results/graph_partition_label_skew_test_edges.json"  # run 2's settings, plus the tertiary


def edgeless_lines(root: Path) -> str:
    """The tertiary comparison of benchmarks/graph_partition.py (every test-graph edge removed), one line per cell."""
    r = _load_json(root, GP3)
    lines = []
    for cid, c in r["cells"].items():
        p, t = c["primary"], c["tertiary"]
        lines.append(f"* `{cid}`: with every test-graph edge removed, site-local graphs minus centralized "
                     f"{s3(t['mean_diff'])} (95% CI {ci(t['ci_low'], t['ci_high'])}, Holm p {f3(t['holm_p'])}); with "
                     f"the test graph, {s3(p['mean_diff'])}.")
    return "\n".join(lines)


DRIFT = ("benchmarks/results/drift_probe_brca.json", "benchmarks/results/drift_probe_ov_alpha01.json")
DRIFT_LABELS = {"scaffold": "SCAFFOLD", "stateful": "local Adam kept across rounds",
                "fedavg_1_epoch": "1 local epoch x 10 times the rounds",
                "site_graphs": "one optimiser on site-local graphs"}


def drift_probe_lines(root: Path) -> str:
    """benchmarks/drift_probe.py's results (validation patients only), one line per cell, from its result files."""
    lines = []
    for rel in DRIFT:
        r = _load_json(root, rel)
        parts = []
        for v, label in DRIFT_LABELS.items():
            c = r["minus_fedavg"][v]
            parts.append(f"{label} {f3(r['means'][v])} ({s3(c['mean_diff'])}, 95% CI {ci(c['ci_low'], c['ci_high'])}, "
                         f"Holm p {f3(c['holm_p'])})")
        lines.append(f"* `{r['cell']}` ({len(r['seeds'])} seeds, {r['threads']} torch thread"
                     f"{'s' if r['threads'] > 1 else ''}): FedAvg {f3(r['means']['fedavg'])}; minus FedAvg: "
                     + "; ".join(parts) + ".")
    return "\n".join(lines)


def _listed(items: list[str]) -> str:
    return "none" if not items else "; ".join(items)


def _gap_brief(root: Path) -> SimpleNamespace:
    """The README's summary of the gap study: how many cells the rule's method meets the target in (on the means)
    and rules out a larger loss in, how often the rule names each method, and the report's multiplicity."""
    s = _summary(root, "gap")
    target = _target(root, "gap")
    comps = pd.DataFrame(s["comparisons"])
    chosen = s["best_method"]["chosen"]

    met = sum(_meets(comps, c, m, target) for c, m in chosen.items())
    ruled = sum(_pair(comps, c, m, "centralized")["nb_ci_low"] >= -target for c, m in chosen.items())
    counts = pd.Series(list(chosen.values())).value_counts()
    order = sorted(counts.index, key=lambda m: (-counts[m], s["methods"].index(m)))
    named = ", ".join(f"{method_names.label(m)} in {counts[m]}" for m in order)
    return SimpleNamespace(met=str(met), ruled=str(ruled), cells=str(len(chosen)), named=named,
                           m=multiplicity(root, "gap"))


def _same_cell_twice(root: Path) -> SimpleNamespace:
    """The gap study's rjive-disjoint cell and the stress study's disjoint cell (same scenario) on their shared
    seeds: whether each method's per-seed MCC (own sites' test patients, which both record) agrees to 3 decimals,
    and plain FedAvg's mean ± sample std in each."""
    g, s = _tidy(root, "gap"), _tidy(root, "stress")
    g, s = g[g["cell"] == "rjive-disjoint"], s[s["cell"] == "disjoint"]
    seeds = sorted(set(g["seed"]) & set(s["seed"]))

    def per_seed(df: pd.DataFrame, m: str) -> list[str]:
        rows = df[(df["method"] == m) & df["seed"].isin(seeds)].sort_values("seed")
        assert len(rows) == len(seeds) > 1, (m, len(rows), seeds)  # every shared seed, in both studies
        return [f3(v) for v in rows["mcc"]]

    agree = {m: per_seed(g, m) == per_seed(s, m) for m in ("centralized", "local_only", "fedavg_plain", "federated")}

    def ms(df: pd.DataFrame) -> str:
        v = df[(df["method"] == "fedavg_plain") & df["seed"].isin(seeds)]["mcc"]
        return f"{f3(v.mean())} ± {f3(v.std(ddof=1))}"

    assert seeds == list(range(seeds[0], seeds[-1] + 10, 10)), seeds  # "10-50": every tenth seed between
    return SimpleNamespace(seeds=f"{seeds[0]}-{seeds[-1]}",
                           three="agree" if all(agree[m] for m in ("centralized", "local_only", "fedavg_plain"))
                           else "DO NOT all agree",
                           fed="does not" if not agree["federated"] else "DOES TOO", g=ms(g), s=ms(s))


def _reproduced(root: Path) -> SimpleNamespace:
    """benchmarks/results/reproduce_label_skew_{1_thread,2_threads}.json: the same stored label-skew rows (run
    before this session's BRCA rerun) rerun in fresh processes at 1 and at 2 torch threads; how many reproduce
    exactly at each, and the BRCA seed-10 modality-aware FedAvg row as the example."""
    one = _load_json(root, "benchmarks/results/reproduce_label_skew_1_thread.json")
    two = _load_json(root, "benchmarks/results/reproduce_label_skew_2_threads.json")
    assert (one["threads"], two["threads"]) == (1, 2) and [r["seed"] for r in one["rows"]] == \
        [r["seed"] for r in two["rows"]]
    ex = next(r for r in one["rows"] if (r["cell"], r["method"], r["seed"]) == ("rjive-label-skew-3", "federated", 10))
    return SimpleNamespace(n=str(len(one["rows"])), one=str(sum(r["same"] for r in one["rows"])),
                           two=str(sum(r["same"] for r in two["rows"])), got=f3(ex["rerun"]["mcc"]),
                           stored=f3(ex["stored"]["mcc"]), cpu=one["machine"]["cpu_capability"])


def _stress_clip0(root: Path) -> str:
    """benchmarks/results/reproduce_stress_clip0.json: the stress study's disjoint rows rerun with clip-factor 0."""
    d = _load_json(root, "benchmarks/results/reproduce_stress_clip0.json")
    assert d["settings_added"] == {"clip-factor": 0}
    rows = d["rows"]
    return (f"{sum(r['same'] for r in rows)} of {len(rows)} rows ("
            + ", ".join(f"{method_names.label(r['method'])} seed {r['seed']}" for r in rows) + ")")


def defaults_table(root: Path) -> str:
    """The derivation of the built-in defaults (benchmarks/results/derived_defaults.json) as the table in
    docs/studies/README.md: per tuned method, each setting's choices (of them decided by a tie), the derived value,
    the value with tied votes split and the value the derivation replaced."""
    d = _load_json(root, "benchmarks/results/derived_defaults.json")

    def show(setting: dict) -> str:
        return ", ".join(f"`{k}` {v}" for k, v in setting.items())

    lines = ["| method | choices per setting (of them ties), over " + " and ".join(
        f"{s['cell_seeds']} {name} cell-seeds" for name, s in d["studies"].items())
        + " | derived | with tied votes split | before |", "|---|---|---|---|---|"]
    for method, m in d["methods"].items():
        counts = "; ".join(f"{show(g)}: {n} ({k})" for g, n, k in zip(m["grid"], m["counts"], m["tied"]))
        lines.append(f"| {method_names.label(method)} | {counts} | {show(m['derived'])} | "
                     f"{show(m['split_ties']['derived'])} | {show(m['built_in'])} |")
    ms = d["methods"].values()
    tied, total = sum(sum(m["tied"]) for m in ms), sum(m["cell_seeds"] for m in ms)
    differ = [method_names.label(k) for k, m in d["methods"].items() if not m["split_ties"]["same"]]
    changed = [method_names.label(k) for k, m in d["methods"].items() if m["derived"] != m["built_in"]]
    lines += ["", f"* {tied} of the {total} choices were ties on validation MCC, decided by the grid's order. With "
              f"tied votes split equally, the derived value changes for {len(differ)} of {len(d['methods'])} methods"
              + (f" ({', '.join(differ)}): for them the validation patients did not separate the settings, and "
                 "the default is the declared rule's tie-break rather than a measured preference." if differ
                 else "."),
              f"* The derivation changed the built-in value of {len(changed)} of {len(d['methods'])} methods"
              + (f" ({', '.join(changed)})." if changed else ".")]
    return "\n".join(lines)


def _derived(root: Path) -> SimpleNamespace:
    """The built-in defaults as benchmarks/results/derived_defaults.json derived them (tests/test_defaults.py checks
    simulations/simulate.py against the same file), and the methods whose value is a tie-break."""
    m = _load_json(root, "benchmarks/results/derived_defaults.json")["methods"]
    lr = {m[k]["derived"]["server-lr"] for k in ("fedadam", "fedyogi")}
    tie = [method_names.label(k) for k, v in m.items() if not v["split_ties"]["same"]]
    return SimpleNamespace(mu=m["fedprox"]["derived"]["proximal-mu"],
                           lr=lr.pop() if len(lr) == 1 else f"{m['fedadam']['derived']['server-lr']} / "
                                                             f"{m['fedyogi']['derived']['server-lr']}",
                           la=m["logit_adjusted"]["derived"]["label-tau"], lc=m["fedlc"]["derived"]["label-tau"],
                           fp=m["fedproto"]["derived"]["prototype-weight"],
                           part={"head": "the classifier head", "head+graph": "the classifier head and the last "
                                 "graph layer"}[m["personalized"]["derived"]["personalize-part"]],
                           tie=" and ".join(tie))


def _gap_recommend(root: Path) -> SimpleNamespace:
    """What the README's recommendation rests on: the comparisons with modality-aware FedAvg (recomputed) and how
    many keep p < 0.05 after Holm; modality-aware FedAvg's cells meeting the target on the means, above local-only
    (own interval / Holm) and below it; and the reference every Holm survivor of the report is compared with."""
    s = _summary(root, "gap")
    target = _target(root, "gap")
    comps = pd.DataFrame(s["comparisons"])
    v = versus_federated(root)
    fed = comps[comps["method"] == "federated"]
    lo = fed[fed["method_b"] == "local_only"]
    meets = sum(_meets(comps, c, "federated", target) for c in lo["cell"])
    kept = comps[comps["p_holm"] < 0.05]
    only_local = set(kept["method_b"]) <= {"local_only"} and set(kept["verdict"]) <= {"helps"}
    vs_c = comps[comps["method_b"] == "centralized"]
    ruled = vs_c[vs_c["nb_ci_low"] >= -target]
    cells = dict.fromkeys(ruled["cell"])
    assert not ((v["verdict"] == "helps") & (v["p_holm"] < 0.05)).any(), "the README's recommendation is stale"
    return SimpleNamespace(n=str(len(v)), holm=str(int((v["p_holm"] < 0.05).sum())),
                           bh=str(int((v["p_bh"] < 0.05).sum())), meets=str(meets), cells=str(len(lo)),
                           above=str(int((lo["verdict"] == "helps").sum())),
                           above_holm=str(int(((lo["verdict"] == "helps") & (lo["p_holm"] < 0.05)).sum())),
                           below=str(int((lo["verdict"] == "hurts").sum())),
                           survivors=("none" if kept.empty else "every one of them a trained method above "
                                      "local-only" if only_local else "NOT only trained methods above local-only"),
                           rn=str(len(ruled)), rt=str(len(vs_c)),
                           rlist="; ".join(f"{c}: " + ", ".join(method_names.label(m) for m in
                                                                 ruled[ruled["cell"] == c]["method"]) for c in cells)
                           or "none")


def gap_findings(root: Path) -> str:
    """The gap section's counted findings (docs/studies/README.md), generated from gap_summary.json and, for the
    comparisons with modality-aware FedAvg, recomputed from gap_tidy.csv."""
    s = _summary(root, "gap")
    target = _target(root, "gap")
    comps = pd.DataFrame(s["comparisons"])
    chosen = s["best_method"]["chosen"]
    cells = list(chosen)

    met = [c for c in cells if _meets(comps, c, chosen[c], target)]
    ruled = [c for c in cells if _pair(comps, c, chosen[c], "centralized")["nb_ci_low"] >= -target]
    label = method_names.label

    def named(c: pd.Series) -> str:
        return (f"{label(c['method'])} vs {label(c['method_b'])} on {c['cell']} ({s3(c['mean_diff'])}, 95% CI "
                f"{ci(c['ci_low'], c['ci_high'])}, Holm p {f3(c['p_holm'])})")

    m = multiplicity(root, "gap")
    kept = comps[comps["p_holm"] < 0.05]
    holm = []
    for ref, word in (("local_only", "local-only"), ("centralized", "centralized"), ("fedavg_plain", "plain FedAvg")):
        for verdict in ("helps", "hurts"):
            sel = kept[(kept["method_b"] == ref) & (kept["verdict"] == verdict)]
            if len(sel):
                holm.append(f"{len(sel)} {'above' if verdict == 'helps' else 'below'} {word} (in "
                            f"{', '.join(dict.fromkeys(sel['cell']))})")
    other = kept[~kept["method_b"].isin(["local_only", "centralized", "fedavg_plain"])]
    holm += [named(c) for _, c in other.iterrows()]
    v = versus_federated(root)
    v_det = [f"{label(r['method'])} on {r['cell']} {s3(r['mean_diff'])} ({ci(r['ci_low'], r['ci_high'])})"
             for _, r in v[v["verdict"] != "no difference detected"].iterrows()]
    v_holm = [f"{label(r['method'])} on {r['cell']}" for _, r in v[v["p_holm"] < 0.05].iterrows()]
    v_bh = [f"{label(r['method'])} on {r['cell']}" for _, r in v[v["p_bh"] < 0.05].iterrows()]
    return "\n".join([
        f"* The method the rule names meets the target on the means in {len(met)} of {len(cells)} cells "
        f"({_listed(met)}); its resampling-corrected interval rules out a loss of more than {target} to "
        f"centralized in {len(ruled)} "
        f"({_listed(ruled)}).",
        f"* Multiplicity: the report makes {m.n} comparisons; {m.detected} read \"helps\"/\"hurts\" on their own "
        f"95% interval, and about {m.chance} would if no difference were real. Adjusted over the report's family, "
        f"{m.holm} keep p < 0.05 after Holm and {m.bh} after Benjamini-Hochberg. Those after Holm, by "
        f"reference: {_listed(holm)}; none other.",
        f"* Against modality-aware FedAvg (not in the report, which compares with plain FedAvg; recomputed from "
        f"`gap_tidy.csv` on the same evaluation, paired by seed, {len(v)} comparisons, about {round(0.05 * len(v))} of "
        f"which would read so by chance): a difference on its own (unadjusted) interval: {_listed(v_det)}. "
        f"Adjusted over these {len(v)}, p < 0.05 after Holm: {_listed(v_holm)}; after Benjamini-Hochberg: "
        f"{_listed(v_bh)}.",
    ])


# ------------------------------------------------------------------------------------------------ claims


@dataclass(frozen=True)
class Claim:
    """``text`` (a str.format template) filled with values read from stored results must appear in ``doc``."""

    doc: str
    text: str
    source: str  # the result file(s) the values come from, for the failure message
    values: tuple = ()  # (name, function(root) -> value) pairs

    def render(self, root: Path) -> str:
        return self.text.format(**{name: fn(root) for name, fn in self.values})


def _c(doc, source, text, **values):
    return Claim(doc, text, source, tuple(values.items()))


R, S, B = "README.md", "docs/studies/README.md", "benchmarks/README.md"
SA = "docs/secure-aggregation.md"
D = "docs/deployment.md"
PRIV = "docs/studies/privacy/privacy_summary.json"


def _side(root):
    """benchmarks/results/reference_side_by_side.json: the 5-seed OV run, ours (serial, --workers 2) vs reference."""
    d = _load_json(root, "benchmarks/results/reference_side_by_side.json")
    ours, two, ref = d["ours"], d["ours_workers2"], d["reference"]
    seeds = [str(x) for x in d["seeds"]]
    loads = [x[0] for x in (d["load_average_start"], d["load_average_end"], ours["load_average_before"],
                            ours["load_average_after"], two["load_average_before"], two["load_average_after"],
                            ref["load_average_before"], ref["load_average_after"])]

    def mean_sd(side):
        v = [side["mcc_per_seed"][k] for k in seeds]
        return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}"

    rows = [("reference (`main_inference.py`)", ref), ("magnet-fl, one seed after another", ours),
            ("magnet-fl `--workers 2`, 1 thread each", two)]
    table = "\n".join([f"| {len(seeds)} OV seeds, 200 epochs, 1 thread | wall s | in-program s | "
                        "test MCC mean ± sd (ddof 1) |", "|---|---|---|---|"]
                       + [f"| {name} | {side['process_wall_seconds']:.1f} | {side['in_program_seconds']:.1f} | "
                          f"{mean_sd(side)} |" for name, side in rows])
    before = {str(r["seed"]): r["mcc"] for r in _load_json(root, "tests/data/training_trace_before.json")["runs"]}
    v = ref["versions"]
    r = d["ratios"]

    def secs(side):
        return " / ".join(f"{x:.1f}" for x in side["seconds_per_seed"])

    return SimpleNamespace(
        load=f"{min(loads):.1f}-{max(loads):.1f}", commit=d["magnet_fl_commit"][:7]
        + (" with uncommitted changes" if d["magnet_fl_uncommitted_changes"] else ""),
        versions=f"torch {v['torch']}, lightning {v['lightning']}, torch_geometric {v['torch_geometric']}",
        table=table, ratio=f"{r['reference_over_ours_wall']:.2f}x",
        own=f"{r['reference_own_timer_over_ours_sum_of_seeds']:.2f}x",
        per_seed=", ".join(f"seed {k} {ours['mcc_per_seed'][k]:.3f} vs {ref['mcc_per_seed'][k]:.3f}" for k in seeds),
        same="the same" if all(ours["mcc_per_seed"][k] == before.get(k) for k in seeds) else "NOT the same",
        same2="the same" if two["mcc_per_seed"] == ours["mcc_per_seed"] else "NOT the same",
        speedup=f"{r['workers2_speedup_over_serial']:.2f}x",
        per_seed_seconds=f"one by one {secs(ours)} s, on two workers {secs(two)} s (seeds {', '.join(seeds)})")


def _priv(mode: str, key: str = "mcc"):
    def get(root):
        m = _load_json(root, PRIV)["modes"][mode]
        if key == "mcc":
            return f"{f3(m['mcc']['mean'])} ± {f3(m['mcc']['std'])}"
        if key == "minus":
            d = m["mcc_minus_plain"]
            return f"{s3(d['mean_diff'])} [{s3(d['ci_low'])}, {s3(d['ci_high'])}]"
        return f"{m['epsilon']:.1f}"
    return get


def _priv_adjusted(root):
    """Holm / BH over the privacy table's five paired differences from plain."""
    modes = _load_json(root, PRIV)["modes"]
    ps = [modes[k]["mcc_minus_plain"]["p_value"] for k in modes if "mcc_minus_plain" in modes[k]]
    return SimpleNamespace(n=str(len(ps)), holm=str(int((st.holm(ps) < 0.05).sum())),
                           bh=str(int((st.benjamini_hochberg(ps) < 0.05).sum())),
                           detected=str(sum(modes[k]["mcc_minus_plain"]["verdict"] != "no difference detected"
                                            for k in modes if "mcc_minus_plain" in modes[k])))


def _plain_seeds(root):
    df = pd.read_csv(root / "docs/studies/privacy/privacy_tidy.csv")
    return " ".join(f3(v) for v in df[df["mode"] == "plain"].sort_values("seed")["mcc"])


def _bench(rel: str, *path, fmt="{:.1f}"):
    def get(root):
        v = _load_json(root, f"benchmarks/results/{rel}")
        for p in path:
            v = v[p]
        return fmt.format(v)
    return get


def _secagg_auth_cost(root):
    """benchmarks/results/secagg_auth_cost.json: authenticated over plain secure aggregation, protocol only: extra
    bytes per site (no dropout) and extra seconds per site and at the coordinator (every row)."""
    rows = _load_json(root, "benchmarks/results/secagg_auth_cost.json")["cost"]
    pairs = [(a, p) for a in rows for p in rows if a["mode"] == "authenticated" and p["mode"] == "plain-secagg"
             and (a["sites"], a["dropped_before_masking"]) == (p["sites"], p["dropped_before_masking"])]

    def at(n):
        return next((a, p) for a, p in pairs if a["sites"] == n and a["dropped_before_masking"] == 0)

    (a3, p3), (a5, p5) = at(3), at(5)
    extra = [a[k] - p[k] for a, p in pairs for k in ("secure_site_seconds", "secure_server_seconds")]
    kb = "{:.1f}".format
    return SimpleNamespace(
        up3=f"{a3['secure_upload_bytes_per_site'] - p3['secure_upload_bytes_per_site']:.0f}",
        down3=kb((a3["secure_extra_download_bytes_per_site"] - p3["secure_extra_download_bytes_per_site"]) / 1e3),
        up5=kb((a5["secure_upload_bytes_per_site"] - p5["secure_upload_bytes_per_site"]) / 1e3),
        down5=kb((a5["secure_extra_download_bytes_per_site"] - p5["secure_extra_download_bytes_per_site"]) / 1e3),
        mb=f"{a5['secure_upload_bytes_per_site'] / 1e6:.2f}", lo=f"{min(extra):.1f}", hi=f"{max(extra):.1f}")


def _consistency_cost(root):
    """benchmarks/results/secagg_consistency_cost.json, its authenticated rows: what the consistency check (stage
    3a) adds per site (bytes both ways without dropout, 3 and 5 sites) and its CPU time per site and at the
    coordinator (largest over the rows)."""
    rows = [r for r in _load_json(root, "benchmarks/results/secagg_consistency_cost.json")["cost"]
            if r["mode"] == "authenticated"]

    def at(n):
        return next(r for r in rows if r["sites"] == n and r["dropped_before_masking"] == 0)

    ms = "{:.1f}".format
    return SimpleNamespace(
        up3=f"{at(3)['consistency_upload_bytes_per_site']:.0f}",
        down3=f"{at(3)['consistency_download_bytes_per_site']:.0f}",
        up5=f"{at(5)['consistency_upload_bytes_per_site']:.0f}",
        down5=f"{at(5)['consistency_download_bytes_per_site']:.0f}",
        site=ms(1e3 * max(r["consistency_site_cpu_seconds"] for r in rows)),
        server=ms(1e3 * max(r["consistency_server_cpu_seconds"] for r in rows)),
        load=f"{max(_load_json(root, 'benchmarks/results/secagg_consistency_cost.json')['loadavg_before']):.1f}")


def _sci(v: float) -> str:
    """7.45e-9, as the documents write a small number."""
    mant, exp = f"{v:.2e}".split("e")
    return f"{mant}e{int(exp)}"


def _secagg_plain_cost(root):
    """benchmarks/results/secagg_auth_cost.json, its plain-secagg rows: the cost table of docs/secure-aggregation.md,
    the upload ratio, the extra download per site, the largest secure-vs-plain difference of every row."""
    rows = _load_json(root, "benchmarks/results/secagg_auth_cost.json")["cost"]
    plain = sorted((r for r in rows if r["mode"] == "plain-secagg"),
                   key=lambda r: (r["sites"], r["dropped_before_masking"]))
    table = "\n".join(["| sites | dropped before masking | site seconds | server seconds (plain) | upload per site, "
                       "secure vs plain |", "|---|---|---|---|---|"]
                      + [f"| {r['sites']} | {r['dropped_before_masking']} | {r['secure_site_seconds']:.2f} | "
                         f"{r['secure_server_seconds']:.2f} ({r['plain_server_seconds']:.3f}) | "
                         f"{r['secure_upload_bytes_per_site'] / 1e6:.2f} MB vs "
                         f"{r['plain_upload_bytes_per_site'] / 1e6:.2f} MB |" for r in plain])
    ratios = {f"{r['secure_upload_bytes_per_site'] / r['plain_upload_bytes_per_site']:.1f}x" for r in plain}
    assert len(ratios) == 1, ratios
    down = {r["sites"]: r["secure_extra_download_bytes_per_site"] for r in plain if r["dropped_before_masking"] == 0}
    return SimpleNamespace(table=table, ratio=ratios.pop(), down=f"about {down[3] / 1e3:.1f} kB (3 sites) to "
                           f"{down[5] / 1e3:.1f} kB (5 sites)", diff=_sci(max(r["max_abs_difference_vs_plain"]
                                                                                for r in rows)))


def _privacy_table(root):
    """docs/studies/privacy/privacy_summary.json: section 7's table of docs/secure-aggregation.md."""
    modes = _load_json(root, PRIV)["modes"]
    lines = ["| mode | seeds | final MCC mean ± sd [95% t CI] | MCC − plain [95% CI], paired t p | final epsilon (RDP) "
             "at delta 1e-5 |", "|---|---|---|---|---|"]
    for name, m in modes.items():
        c = m["mcc"]
        d = m.get("mcc_minus_plain")
        diff = f"{s3(d['mean_diff'])} [{s3(d['ci_low'])}, {s3(d['ci_high'])}], p = {d['p_value']:.3f}" if d else ""
        eps = "∞ (no DP)" if m.get("epsilon") is None else f"{m['epsilon']:.1f} ({m['epsilon_rdp']:.1f})"
        lines.append(f"| {name} | {','.join(str(x) for x in m['seeds'])} | {f3(c['mean'])} ± {f3(c['std'])} "
                     f"[{f3(c['ci_low'])}, {f3(c['ci_high'])}] | {diff} | {eps} |")
    return "\n".join(lines)


def _privacy_eps(root):
    modes = _load_json(root, PRIV)["modes"]
    z1, z05 = modes["dp-central-z1"], modes["dp-central-z0.5"]
    return SimpleNamespace(z1=f"{z1['epsilon']:.1f}", z1rdp=f"{z1['epsilon_rdp']:.1f}", z05=f"{z05['epsilon']:.1f}")


def _clip(root):
    q = _load_json(root, "docs/studies/privacy/clip.json")["quantiles"]
    return SimpleNamespace(c=f3(_load_json(root, "docs/studies/privacy/clip.json")["clip_norm"]),
                           q25=f"{q['q25']:.2f}", q75=f"{q['q75']:.2f}", q90=f"{q['q90']:.2f}")


DR = "benchmarks/results/deploy_round.json"


def _deploy_round(root):
    """benchmarks/results/deploy_round.json: the time-per-round table of docs/deployment.md, the train message's
    steps, the median seconds per round."""
    d = _load_json(root, DR)
    t = d["steps"]["train"]
    table = "\n".join([
        "| `deploy supernode --worker` (fast polling, forked ClientApps, the model as one flat array) | |", "|---|---|",
        f"| median seconds per round | **{d['median_seconds_per_round']:.2f}** ({len(d['seconds_per_round'])} rounds, "
        f"load {_deploy_load(root)}) |",
        f"| CPU seconds per round, all processes (median) | {d['median_cpu_seconds_per_round']:.1f} |",
        f"| train message, sent → reply seen by the coordinator (median of {t['total']['n']}) | "
        f"{t['total']['median']:.1f} s |"])
    steps = " / ".join(f"{t[k]['median']:.2f}" for k in ("download", "push", "seen")) + " s"
    return SimpleNamespace(table=table, steps=steps, median=f"{d['median_seconds_per_round']:.2f}")


def _engines_round(root):
    d = _load_json(root, "benchmarks/results/engines.json")
    reps = len(d["walls"]["inprocess"])
    return (f"{d['rounds']} rounds of {d['sites']} OV sites x {d['local_epochs']} local epochs in "
            f"{d['median']['inprocess']:.1f} s (median of {reps} runs; `benchmarks/results/engines.json`)")


def _deploy_secagg(mode: str):
    """benchmarks/results/deploy_round_secagg_{mode}.json: seconds per round, the secure sum's seconds, and the
    bytes per site and round (range over sites and rounds)."""
    def get(root):
        d = _load_json(root, f"benchmarks/results/deploy_round_secagg_{mode}.json")

        def span(key):
            v = [b[key] for r in d["secure_aggregation"] for b in r["bytes_per_site"].values()]
            return f"{min(v):,}" if min(v) == max(v) else f"{min(v):,}-{max(v):,}"

        return SimpleNamespace(sec=", ".join(f"{x:.2f}" for x in d["seconds_per_round"]),
                               sa=", ".join(f"{r['seconds']:.2f}" for r in d["secure_aggregation"]),
                               up=span("up"), down=span("down_besides_model"))
    return get


def _bounded(root):
    """benchmarks/results/bounded_influence.json: final-round MCC per seed of each variant, paired differences."""
    d = _load_json(root, "benchmarks/results/bounded_influence.json")
    v = d["variants"]

    def per_seed(name):
        return ", ".join(f"seed {r['seed']} {f3(r['mcc'])}" for r in v[name]["runs"])

    def pair(name):
        p = d["paired"][f"bounded - {name}"]
        return f"{s3(p['mean'])}, 95% CI {ci(*p['ci95'])}"

    rejected = sum(r["rejected_updates"] for x in v.values() for r in x["runs"])
    clipped = {sum(r["clipped_updates"] for r in v[n]["runs"]) for n in ("bounded", "old-default")}
    updates = {sum(r["accepted_updates"] + r["rejected_updates"] for r in x["runs"]) for x in v.values()}
    assert len(clipped) == 1 and len(updates) == 1, (clipped, updates)
    return SimpleNamespace(b=per_seed("bounded"), o=per_seed("old-default"), u=per_seed("unclipped"),
                           bo=pair("old-default"), bu=pair("unclipped"), clipped=clipped.pop(), updates=updates.pop(),
                           rejected="No update was" if rejected == 0 else f"{rejected} updates were")


def _bounded5(root):
    """benchmarks/results/bounded_influence_ov_5_seeds.json and bounded_influence_brca_label_skew.json: this
    default against the default the issue was filed on, 5 seeds each."""
    out = {}
    for key, rel in (("ov", "bounded_influence_ov_5_seeds.json"), ("br", "bounded_influence_brca_label_skew.json")):
        d = _load_json(root, f"benchmarks/results/{rel}")
        p = d["paired"]["bounded - old-default"]
        out[key] = f"{s3(p['mean'])} (95% CI {ci(*p['ci95'])})"
        out[key + "_n"] = p["seeds"]
        out[key + "_rej"] = sum(r["rejected_updates"] for r in d["variants"]["bounded"]["runs"])
        out[key + "_old"] = sum(r["rejected_updates"] for r in d["variants"]["old-default"]["runs"])
    return SimpleNamespace(**out)


def _engines_pair_range(root):
    r = _load_json(root, "benchmarks/results/engines.json")["per_rep_ratios"]
    return f"{min(r):.2f}-{max(r):.2f}x"


def _engines_mcc(root):
    d = _load_json(root, "benchmarks/results/engines.json")["final_mcc"]
    values = {round(v, 3) for runs in d.values() for v in runs}
    assert len(values) == 1, values  # "same final MCC in all runs"
    return f3(values.pop())


def _deploy_load(root):
    loads = [r[0] for r in _load_json(root, "benchmarks/results/deploy_round.json")["loadavg_per_round"]]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def _grq(rel, cohort, key):
    def get(root):
        s = _load_json(root, f"benchmarks/results/{rel}")["summary"]
        if key in ("dense", "topk"):
            r = s[f"{cohort}/{key}"]
            return f"{f3(r['mcc_mean'])} ± {f3(r['mcc_std'])}"
        d = s[f"{cohort}/topk-dense"]
        return SimpleNamespace(d=s3(d["mean"]), ci=ci(*d["ci95"]), p=f"{d['p_value']:.2f}")
    return get










def _m(study):
    return lambda root: multiplicity(root, study)


def _cm(study, cell_a, a, b, cell_b=None):
    return lambda root: cmp(root, study, cell_a, a, b, cell_b)


def _cell(study, cell_id, method, metric="mcc"):
    return lambda root: cell(root, study, cell_id, method, metric)


def _rate_max_abs(root):
    comps = [c for c in _summary(root, "rate")["comparisons"] if c["method"] == "federated"
             and c["method_b"] == "fedavg_plain"]
    return f3(max(abs(c["mean_diff"]) for c in comps))


def _sites_min_bh(root):
    return f3(min(c["p_bh"] for c in _summary(root, "sites")["comparisons"] if c["p_bh"] is not None))




def _reference(root):
    """The reference-comparison figures: per-split MCC (same seed), draws per split, mean per-split differences."""
    d = _load_json(root, "benchmarks/results/reference_comparison.json")
    same = d["same_seed"]
    splits = same["splits"]
    draws = {side: {k: [v] for k, v in zip(splits, same[f"{side}_mcc"])} for side in ("reference", "ours")}
    for side in draws:
        for r in d["decoupled_rng"][side]:
            draws[side][r["split"]].append(r["mcc"])
    assert same["train_edges"]["reference"] == same["train_edges"]["ours"]
    assert same["test_edges"]["reference"] == same["test_edges"]["ours"]

    def count(side):
        ns = [len(draws[side][k]) for k in splits]
        return str(ns[0]) if min(ns) == max(ns) else f"{min(ns)} to {max(ns)}"
    per_split = [np.mean(draws["ours"][k]) - np.mean(draws["reference"][k]) for k in splits]
    return SimpleNamespace(ref=" ".join(f3(x) for x in same["reference_mcc"]),
                           ours=" ".join(f3(x) for x in same["ours_mcc"]), ours_draws=count("ours"),
                           ref_draws=count("reference"), gap=s3(float(np.mean(per_split))),
                           gap5=s3(float(np.mean(np.subtract(same["ours_mcc"], same["reference_mcc"])))))


def _trajectory(root):
    """benchmarks/results/reference_trajectory.json: float64 agreement, the reference on our starting weights."""
    d = _load_json(root, "benchmarks/results/reference_trajectory.json")
    runs, splits = d["runs"], [10, 20, 30, 40, 50]
    off64 = runs["10/off64/200"]["test"]
    assert off64["predictions_differ"] == 0 and off64["mcc_ref"] == off64["mcc_ours"]
    swapped = [runs[f"{s}/ref_masks/200"]["test"] for s in splits]
    stored = d["stored_same_seed_mcc"]
    assert stored["splits"] == splits
    ref_w = [t["mcc_ref"] for t in swapped]
    flips, ntest = [t["predictions_differ"] for t in swapped], [t["n_test"] for t in swapped]
    off32 = runs["10/off/200"]["test"]
    return SimpleNamespace(w64=f"{d['summary']['10/off64/200']['last_max_weight_diff']:.1e}", m64=f3(off64["mcc_ref"]),
                           refw=" ".join(f3(x) for x in ref_w), refo=" ".join(f3(x) for x in stored["reference_mcc"]),
                           shift=s3(float(np.mean(ref_w) - np.mean(stored["reference_mcc"]))),
                           flips=f"{min(flips)} to {max(flips)}", ntest=f"{min(ntest)} to {max(ntest)}",
                           same=s3(float(np.mean([t["mcc_ours"] - t["mcc_ref"] for t in swapped]))),
                           f32=f"{off32['predictions_differ']} of {off32['n_test']}")


def _reference_draws(root):
    """reference_comparison.json's 'draws_within_split' analysis and 'init_and_dropout_checks'."""
    d = _load_json(root, "benchmarks/results/reference_comparison.json")
    a = d["draws_within_split"]["analysis"]
    prim = a["primary"]

    def count(side):
        ns = prim["draws_per_split"][side]
        return str(ns[0]) if min(ns) == max(ns) else f"{min(ns)} to {max(ns)}"
    assert a["reproduction"]["all_reproduced"] or not a["reproduction"]["stored_draws_reused"]
    chk = d["init_and_dropout_checks"]
    calls = chk["dropout_calls"]
    ps = {c[1] for key in calls if key.endswith(("training_step", "_test")) for c in calls[key]}
    assert len(ps) == 1
    train_on = [all(c[0] for c in calls[k]) for k in ("reference_training_step", "ours_training_step")]
    test_off = [not any(c[0] for c in calls[k]) for k in ("reference_test", "ours_test")]
    assert all(train_on) and all(test_off) and chk["test_labels_equal"]
    assert len(calls["reference_training_step"]) == len(calls["ours_training_step"])
    return SimpleNamespace(ours_n=count("ours"), ref_n=count("reference"), gap=s3(prim["estimate"]),
                           ci=ci(*prim["paired_t_ci95"]), p=f3(a["permutation_within_split"]["p_two_sided"]),
                           higher=str(prim["splits_ours_higher"]), seeds=str(chk["init_seeds"]),
                           pct=f"{100 * (np.exp(chk['init_max_abs_log_std_ratio']) - 1):.2f}%", drop=f"{ps.pop():.1f}",
                           calls=str(len(calls["ours_training_step"])),
                           gap0=s3(a["with_same_seed_draw"]["estimate"]),
                           ci0=ci(*a["with_same_seed_draw"]["paired_t_ci95"]))


def _epochs(root):
    """benchmarks/results/epoch_profile.json: per-epoch medians before / after, the load range, the setting."""
    d = _load_json(root, "benchmarks/results/epoch_profile.json")["trees"]
    b, a = d["before"], d["after"]
    loads = [x for t in (b, a) for turn in t["load1_per_turn"] for x in turn]
    return SimpleNamespace(bc=f"{b['epoch_cpu_ms_median']:.1f}", bw=f"{b['epoch_wall_ms_median']:.1f}",
                           ac=f"{a['epoch_cpu_ms_median']:.1f}", aw=f"{a['epoch_wall_ms_median']:.1f}",
                           load=f"{min(loads):.1f}-{max(loads):.1f}", n=f"{a['patients']}",
                           edges=f"{a['edges']:,}", epochs=f"{a['epochs_timed']}")


def _demo(root) -> SimpleNamespace:
    """The README's first run (benchmarks/results/demo.json): its time and the paired differences over 3 seeds."""
    d = _load_json(root, "benchmarks/results/demo.json")

    def diff(evaluation: str, pair: str) -> SimpleNamespace:
        return _ns(d[evaluation]["paired_differences"][pair])

    return SimpleNamespace(t=f"{d['readme_command_seconds']:.0f} s", load=f"{d['loadavg_before'][0]:.1f}",
                           own=diff("own", "federated - local_only"),
                           cons=diff("consortium", "federated - local_only"),
                           cen=diff("own", "federated - centralized"),
                           fed=f3(d["own"]["mcc_mean"]["federated"]), cent=f3(d["own"]["mcc_mean"]["centralized"]),
                           loc=f3(d["own"]["mcc_mean"]["local_only"]),
                           locc=f3(d["consortium"]["mcc_mean"]["local_only"]))


def _many_sites(root):
    """benchmarks/results/many_sites.json: in-process CPU seconds per training patient and round, the consortium
    grown by 60-patient sites (label site-size-60) vs the OV cohort split ever finer (label after)."""
    runs = _load_json(root, "benchmarks/results/many_sites.json")["runs"]

    def series(label):
        rows = sorted((r for r in runs if r["label"] == label and r["engine"] == "inprocess"), key=lambda r: r["sites"])
        assert [r["sites"] for r in rows] == [5, 20, 50, 100], label
        return rows

    fixed, split = series("site-size-60"), series("after")
    per_site = [r["cpu_s_per_site_per_round"] for r in fixed + split]
    return SimpleNamespace(
        fixed=" / ".join(f"{r['cpu_s_per_train_patient_per_round']:.4f}" for r in fixed),
        rss=" / ".join(f"{r['coordinator_peak_rss_mb']:.0f}" for r in fixed),
        ov_train=split[0]["train_patients"],
        split=" / ".join(f"{r['cpu_s_per_train_patient_per_round']:.4f}" for r in split),
        site=f"{min(per_site):.2f} to {max(per_site):.2f}")


def _inband(root):
    """benchmarks/results/inband_attacker_*.json (issue 22): the in-band replacer among three OV sites under
    robust='auto', the noise floor between runs with no attacker, the honest cost of 'auto' and two colluders of
    four."""
    ov = _load_json(root, "benchmarks/results/inband_attacker_ov.json")
    att = [g for g in ov["gaps"] if g["case"] == "attacked3" and g["rule"] == "auto" and g["against"] == "honest3"]
    below = sum(min(g["difference"][1:5]) >= -0.05 for g in att)
    both = sum(g["within_0.05_every_round_after_the_first"] for g in att)
    floor = [g for g in ov["noise_floor"] if g["rule"] == "auto"]
    absent = [g for g in floor if g["pair"] == "honest3 - absent3"]
    rules = [g for g in floor if g["pair"] != "honest3 - absent3"]
    assert not any(g["within_0.05_every_round_after_the_first"] for g in floor)

    def cost(d, metric):
        c = next(c for c in d["honest_cost"] if c["metric"] == f"final-round {metric}")
        return f"{s3(c['mean'])} (95% CI {ci(*c['ci95'])})", sum(x < 0 for x in c["differences"]), len(c["seeds"])

    brca = _load_json(root, "benchmarks/results/inband_attacker_brca_label_skew.json")
    b_server, b_lower, b_n = cost(brca, "server_mcc")
    b_global, _, _ = cost(brca, "global_mcc")
    o_server, _, o_n = cost(ov, "server_mcc")
    rejected = sum(len(x) for r in brca["runs"] for x in r["rejected"])
    col = _load_json(root, "benchmarks/results/inband_attacker_colluders_ov.json")
    accepted = all(len(a) == 4 for r in col["runs"] for a in r["accepted"])
    gap = {rule: np.mean([g["difference"][-1] for g in col["gaps"] if g["rule"] == rule]) for rule in ("mean", "auto")}
    return SimpleNamespace(
        n=len(att), below=below, both=both, seeds=", ".join(str(g["seed"]) for g in absent),
        absent=f3(max(g["max_abs_after_round_1"] for g in absent)),
        rules=f3(max(g["max_abs_after_round_1"] for g in rules)),
        b_server=b_server, b_lower=b_lower, b_n=b_n, b_global=b_global, o_server=o_server, o_n=o_n,
        rejected="no honest update was rejected" if rejected == 0 else f"{rejected} honest updates were rejected",
        accepted="all four sites were accepted in every round under both rules" if accepted else "NOT all accepted",
        col_mean=s3(gap["mean"]), col_auto=s3(gap["auto"]), col_n=len(col["seeds"]))


LS = "label-skew"
LSI = "label-skew-isolated"  # the same BRCA cell, every patient scored alone (test graph isolated)


def _label_skew(cell_id, study=LS):
    """docs/studies/label-skew (issue 23): the cell's best trained method as the study's declared rule named it
    (highest mean validation MCC; the summary's ``best_method.chosen``), its MCC on the consortium's test patients
    (the declared evaluation) against centralized and local-only with the report's paired comparisons, whether the
    target (at or above local-only and within ``target_gap`` of centralized, on the means) is met, and local-only
    on both evaluations."""

    def get(root):
        summary = _summary(root, study)
        best = summary["best_method"]["chosen"][cell_id]
        raw = {b: next(c for c in summary["comparisons"] if c["cell"] == cell_id and c["cell_b"] == cell_id
                       and c["method"] == best and c["method_b"] == b) for b in ("centralized", "local_only")}
        assert summary["evaluation"]["metric"] == "consortium_mcc"
        target = tomllib.loads((root / f"docs/studies/{study}/study.toml").read_text())["target_gap"]
        met = raw["local_only"]["mean_diff"] >= 0 and raw["centralized"]["mean_diff"] >= -target
        vc, vl = cmp(root, study, cell_id, best, "centralized"), cmp(root, study, cell_id, best, "local_only")
        return SimpleNamespace(
            best=method_names.label(best), b=cell(root, study, cell_id, best, "consortium_mcc"),
            c=cell(root, study, cell_id, "centralized", "consortium_mcc"),
            lc=cell(root, study, cell_id, "local_only", "consortium_mcc"), lo=cell(root, study, cell_id, "local_only"),
            vc=vc, vl=vl, hc=f"{vc.holm:.3f}", hl=f"{vl.holm:.3f}", met="met" if met else "not met",
            rule_out="rules out" if raw["centralized"]["nb_ci_low"] >= -target else "does not rule out",
            target=target)

    return get



def _label_skew_claim(study: str, cell_id: str, scored: str = "") -> Claim:
    """docs/studies/README.md's line for one cell of a label-skew study (``scored``: how its patients were scored)."""
    return _c(S, f"{study}_summary.json",
              f"`{cell_id}`: the rule names {{x.best}}, {{x.b.ms}} on the consortium's test patients{scored} "
              "(centralized {x.c.ms}; local-only {x.lc.ms}, and {x.lo.ms} on its own sites' test patients); {x.best} "
              "minus centralized {x.vc.dci} (Holm p {x.hc}), minus local-only {x.vl.dci}; the target is {x.met} on "
              "the means, and the resampling-corrected interval {x.rule_out} a loss of more than {x.target}",
              x=_label_skew(cell_id, study))


def label_skew_findings(root: Path, study_name: str = LS) -> str:
    """docs/studies/label-skew's counted findings, generated: in how many cells the target is shown (met on the means
    and a larger loss ruled out by the resampling-corrected interval); per cell, the rule's pick with its mean
    validation MCC and the runner-up's, whether every trained federated method is below centralized on the means,
    and the named method's loss to centralized on the plain and corrected intervals with both adjusted p-values;
    and, where a cell has more than five seeds, what the rule and the target read on its first five alone."""
    from simulations.study import best_methods, load_study

    s = _summary(root, study_name)
    target = _target(root, study_name)
    metric = s["evaluation"]["metric"]
    comps = pd.DataFrame(s["comparisons"])
    rows = pd.DataFrame(s["rows"]).set_index(["cell", "method"])
    chosen = s["best_method"]["chosen"]
    trained = [m for m in s["methods"] if m not in REFERENCES]
    tidy = _tidy(root, study_name)
    label = method_names.label

    met = {c: _meets(comps, c, m, target) for c, m in chosen.items()}
    shown = [c for c, m in chosen.items() if met[c] and _pair(comps, c, m, "centralized")["nb_ci_low"] >= -target]
    lines = [f"* The target is shown (met on the means, and a loss of more than {target} to centralized ruled out by "
             f"the resampling-corrected interval) in {len(shown)} of {len(chosen)} cells"
             + (f": {', '.join(shown)}." if shown else ".")]
    for c, best in chosen.items():
        val = tidy[tidy["cell"] == c].groupby("method")["val_mcc"].mean()[trained].sort_values(ascending=False,
                                                                                             kind="stable")
        runner = next(m for m in val.index if m != best)
        ce = _pair(comps, c, best, "centralized")
        below = all(rows.loc[(c, m), f"{metric}_mean"] < rows.loc[(c, "centralized"), f"{metric}_mean"]
                    for m in trained)
        lines.append(
            f"* `{c}` ({ce['n']} seeds): the rule names {label(best)} by mean validation MCC {f3(val[best])} "
            f"(next: {label(runner)} {f3(val[runner])}); the target is {'met' if met[c] else 'not met'} on the "
            f"means; {label(best)} minus centralized {s3(ce['mean_diff'])}, plain 95% CI "
            f"{ci(ce['ci_low'], ce['ci_high'])} ({'excludes' if ce['ci_high'] < 0 or ce['ci_low'] > 0 else 'contains'}"
            f" 0), corrected {ci(ce['nb_ci_low'], ce['nb_ci_high'])} ("
            f"{'excludes' if ce['nb_ci_high'] < 0 or ce['nb_ci_low'] > 0 else 'contains'} 0), Holm p "
            f"{f3(ce['p_holm'])}, Benjamini-Hochberg p {f3(ce['p_bh'])}"
            + ("; every trained federated method is below centralized on the means." if below else "."))
    study = load_study(root / f"docs/studies/{study_name}/study.toml")
    for c in chosen:
        seeds = sorted(tidy[tidy["cell"] == c]["seed"].unique())
        if len(seeds) <= 5:
            continue
        first = tidy[(tidy["cell"] == c) & tidy["seed"].isin(seeds[:5])]
        pick = best_methods(study, first)[c]
        d = {ref: st.paired_comparison(st.values_by_unit(first[first["method"] == pick], metric),
                                       st.values_by_unit(first[first["method"] == ref], metric)).mean_diff
             for ref in REFERENCES}
        five_met = d["local_only"] >= 0 and d["centralized"] >= -target
        changed = [w for w, x in (("the named method", pick != chosen[c]), ("the target's reading",
                                                                           five_met != met[c])) if x]
        lines.append(f"* On its first five seeds ({seeds[0]}-{seeds[4]}) alone, `{c}` would have the rule name "
                     f"{label(pick)}, {s3(d['centralized'])} from centralized on the means, and the target "
                     f"{'met' if five_met else 'not met'}; the other seeds changed "
                     f"{' and '.join(changed) if changed else 'neither'}.")
    return "\n".join(lines)


LSF = "label-skew-fedsgd"  # the label-skew cells scored alone, with fedsgd among the methods
SCREEN = "benchmarks/results/screening_label_skew_fedsgd.json"


def fedsgd_lines(root: Path) -> str:
    """docs/studies/README.md's declared first reading of label-skew-fedsgd, one line per cell: FedSGD against
    centralized (plain and corrected intervals, adjusted p) and plain FedAvg, and where its mean validation MCC ranks
    among the trained methods (what the best-method rule reads)."""
    s = _summary(root, LSF)
    comps = pd.DataFrame(s["comparisons"])
    tidy = _tidy(root, LSF)
    trained = [m for m in s["methods"] if m not in REFERENCES]
    lines = []
    for cid in s["best_method"]["chosen"]:
        ce, pf = _pair(comps, cid, "fedsgd", "centralized"), _pair(comps, cid, "fedsgd", "fedavg_plain")
        val = tidy[tidy["cell"] == cid].groupby("method")["val_mcc"].mean()[trained].sort_values(ascending=False,
                                                                                               kind="stable")
        f, c = cell(root, LSF, cid, "fedsgd", "consortium_mcc"), cell(root, LSF, cid, "centralized", "consortium_mcc")
        within = _meets(comps, cid, "fedsgd", _target(root, LSF))
        named = s["best_method"]["chosen"][cid] == "fedsgd"
        lines.append(f"* `{cid}` ({ce['n']} seeds): FedSGD {f.ms} (centralized {c.ms}); FedSGD minus centralized "
                     f"{s3(ce['mean_diff'])}, 95% CI {ci(ce['ci_low'], ce['ci_high'])}, corrected "
                     f"{ci(ce['nb_ci_low'], ce['nb_ci_high'])}, Holm p {f3(ce['p_holm'])}, Benjamini-Hochberg p "
                     f"{f3(ce['p_bh'])}; minus plain FedAvg {s3(pf['mean_diff'])}, 95% CI "
                     f"{ci(pf['ci_low'], pf['ci_high'])}; its mean validation MCC {f3(val['fedsgd'])} ranks "
                     f"{list(val.index).index('fedsgd') + 1} of {len(val)} trained methods, so it is "
                     f"{'' if named else 'not '}the method the rule names; on the unrounded means FedSGD is "
                     f"{'within' if within else 'outside'} the target's margin ({ce['mean_diff']:+.4f}).")
    return "\n".join(lines)


def screening_lines(root: Path) -> str:
    """benchmarks/results/screening_label_skew_fedsgd.json: per cell, what the coordinator's update screen did to
    FedSGD's honest gradients against the other federated methods' honest updates."""
    r = _load_json(root, SCREEN)
    lines = []
    for cid, methods in r["cells"].items():
        g = methods["fedsgd"]
        others = {m: v for m, v in methods.items() if m != "fedsgd"}
        lowest = min(v["mean_clip_factor"] for v in others.values())
        share = max(v["share_shortened_over_10pct"] for v in others.values())
        rej = sum(v["rejected_site_rounds"] for v in others.values())
        rounds = sum(v["site_rounds"] for v in others.values())
        lines.append(f"* `{cid}`: FedSGD's gradients ({g['runs']} runs, {g['site_rounds']} site-rounds): mean clip "
                     f"factor {f3(g['mean_clip_factor'])} (smallest {f3(g['min_clip_factor'])}), "
                     f"{g['share_shortened_over_10pct']:.0%} shortened by more than 10 %, "
                     f"{g['rejected_site_rounds']} site-rounds rejected; the {len(others)} other federated methods' "
                     f"updates ({rounds} site-rounds): mean clip factor {f3(lowest)} or higher, at most "
                     f"{share:.0%} shortened by more than 10 %, {rej} rejected (personalized has no coordinator "
                     "runs of its own: it fine-tunes modality-aware FedAvg's model).")
    return "\n".join(lines)


CLIP_PROBE = "benchmarks/results/fedsgd_clip_probe_brca.json"


def clip_probe_line(root: Path) -> str:
    """benchmarks/fedsgd_clip_probe.py (validation patients only): FedSGD with the clip off minus with it, paired by
    seed, and whether the check seed reproduced the stored validation MCC."""
    r = _load_json(root, CLIP_PROBE)
    c, chk = r["clip_off_minus_on"], r["check"]
    return (f"on validation patients (`benchmarks/fedsgd_clip_probe.py`, `{r['cell']}`, {c['n']} seeds), FedSGD with "
            f"the clip off scores {f3(r['means']['clip_off'])} against {f3(r['means']['clip_on'])} with it, a paired "
            f"difference of {s3(c['mean_diff'])} (95% CI {ci(c['ci_low'], c['ci_high'])}); a rerun of seed "
            f"{chk['seed']} with the clip gave {'the stored' if chk['equals_stored'] else 'NOT the stored'} "
            "validation MCC")


GRADIENT_SCREEN = {"alpha-0.1": "benchmarks/results/fedsgd_gradient_screen_alpha-0.1.json",
                   "alpha-1.0": "benchmarks/results/fedsgd_gradient_screen_alpha-1.0.json",
                   "rjive-label-skew-3": "benchmarks/results/fedsgd_gradient_screen_brca.json"}


STEP_SCREEN_VALIDATION = "benchmarks/results/screening_label_skew_fedsgd_validation.json"


def gradient_screen_lines(root: Path) -> str:
    """benchmarks/fedsgd_clip_probe.py --variant gradient-screen (validation patients only), one line per cell: what
    the gradient screen did to FedSGD's honest gradients against what the step screen did in the study's runs of
    the same validation-only view (benchmarks/screening_record.py --view validation), FedSGD's validation MCC paired
    with the study's, and whether the check seed reproduced the stored validation MCC under the study's settings."""
    step_cells = _load_json(root, STEP_SCREEN_VALIDATION)["cells"]
    lines = []
    for cell, path in GRADIENT_SCREEN.items():
        r = _load_json(root, path)
        assert r["cell"] == cell and r["variant"] == "gradient-screen", path
        g, c, chk, st = r["screening"], r["gradient_screen_minus_on"], r["check"], step_cells[cell]["fedsgd"]
        assert (st["runs"], st["site_rounds"]) == (g["runs"], g["site_rounds"]), cell
        lines.append(f"* `{cell}` ({c['n']} seeds, {g['site_rounds']} site-rounds): the gradient screen rejected "
                     f"{g['rejected_site_rounds']} honest gradients and shortened {g['share_shortened_over_10pct']:.0%}"
                     f" by more than 10 % (mean clip factor {f3(g['mean_clip_factor'])}); the step screen, in "
                     f"the study's validation-only runs of the same seeds, rejected {st['rejected_site_rounds']} and "
                     f"shortened {st['share_shortened_over_10pct']:.0%} "
                     f"(mean clip factor {f3(st['mean_clip_factor'])}). "
                     f"FedSGD's validation MCC {f3(r['means']['gradient_screen'])} against "
                     f"{f3(r['means']['clip_on'])} under the step screen, a paired difference of "
                     f"{s3(c['mean_diff'])} (95% CI {ci(c['ci_low'], c['ci_high'])}); a rerun of seed {chk['seed']} "
                     f"with the study's settings gave {'the stored' if chk['equals_stored'] else 'NOT the stored'} "
                     "validation MCC.")
    return "\n".join(lines)


FGS = "fedsgd-gradient-screen"  # the default fedsgd (gradient screen) in the label-skew cells, scored alone


def fgs_references(root: Path) -> str:
    """fedsgd-gradient-screen's centralized and local-only rows against label-skew-fedsgd's (same code, machine and
    threads): on how many cell-seeds the consortium MCC is the same."""
    new, old = _tidy(root, FGS), _tidy(root, LSF)
    parts = []
    for m in ("centralized", "local_only"):
        a = new[new["method"] == m].set_index(["cell", "seed"])["consortium_mcc"]
        b = old[old["method"] == m].set_index(["cell", "seed"])["consortium_mcc"]
        j = a.to_frame("new").join(b.to_frame("old"), how="left")
        parts.append(f"{int((j['new'] == j['old']).sum())} of {len(j)}")
    return (f"centralized's and local-only's consortium MCCs equal label-skew-fedsgd's on {parts[0]} and {parts[1]} "
            "cell-seeds")


FGS_SCREEN = "benchmarks/results/screening_fedsgd_gradient_screen.json"


def fgs_screen_line(root: Path) -> str:
    """benchmarks/screening_record.py on fedsgd-gradient-screen's reported runs: what the gradient screen did to
    FedSGD's honest gradients, summed over the cells."""
    cells = _load_json(root, FGS_SCREEN)["cells"]
    g = [c["fedsgd"] for c in cells.values()]
    shares = [x["share_shortened_over_10pct"] for x in g]
    return (f"in this study's runs the gradient screen rejected {sum(x['rejected_site_rounds'] for x in g)} of "
            f"{sum(x['site_rounds'] for x in g)} site-rounds of FedSGD's honest gradients and shortened "
            f"{min(shares):.0%} to {max(shares):.0%} of them by more than 10 % per cell "
            f"(`benchmarks/screening_record.py`, `{FGS_SCREEN}`)")


def fgs_reading(root: Path) -> str:
    """fedsgd-gradient-screen's declared reading: in how many cells FedSGD meets the target on the means, in how many
    its resampling-corrected interval rules out a loss larger than the margin, and in how many its plain interval
    against centralized contains 0."""
    s = _summary(root, FGS)
    comps = pd.DataFrame(s["comparisons"])
    target, cells = _target(root, FGS), list(s["best_method"]["chosen"])
    met = [c for c in cells if _meets(comps, c, "fedsgd", target)]
    shown = [c for c in met if _pair(comps, c, "fedsgd", "centralized")["nb_ci_low"] >= -target]
    zero = [c for c in cells if _pair(comps, c, "fedsgd", "centralized")["ci_low"] <= 0
            <= _pair(comps, c, "fedsgd", "centralized")["ci_high"]]
    return (f"FedSGD with the gradient screen meets the target on the means in {len(met)} of {len(cells)} cells, its "
            f"resampling-corrected interval rules out a loss of more than {target} to centralized in {len(shown)}, "
            f"and its plain interval against centralized contains 0 in {len(zero)}")


def fedsgd_vs_one_optimiser(root: Path) -> str:
    """Exploratory, chosen after both results were read: FedSGD (label-skew-fedsgd, BRCA) minus the graph-partition
    diagnostic's one optimiser on site-local graphs scored with every test edge removed (the same patients scored
    alone), paired by seed, and whether the two runs' centralized references agree on every seed."""
    seeds = _load_json(root, GP3)["cells"]["rjive-label-skew-3"]["seeds"]
    tidy = _tidy(root, LSF)
    cell_rows = tidy[tidy["cell"] == "rjive-label-skew-3"]
    fed = cell_rows[cell_rows["method"] == "fedsgd"].set_index("seed")["consortium_mcc"]
    cen = cell_rows[cell_rows["method"] == "centralized"].set_index("seed")["consortium_mcc"]
    one = {int(k): v["site_graphs"]["consortium_mcc_no_test_edges"] for k, v in seeds.items()}
    same = all(v["centralized"]["consortium_mcc_no_test_edges"] == cen[int(k)] for k, v in seeds.items())
    from simulations.study import test_train_ratios

    ratios = test_train_ratios(cell_rows[cell_rows["method"] == "fedsgd"])
    c = st.paired_comparison({k: fed[k] for k in one}, one, ratios=ratios)
    return (f"FedSGD minus the diagnostic's one optimiser on site-local graphs, scored with every test edge removed "
            f"(paired by seed over {c.n} seeds; a comparison chosen after both results were read, outside the "
            f"report's family): {s3(c.mean_diff)}, 95% CI {ci(c.ci_low, c.ci_high)}, corrected "
            f"{ci(c.nb_ci_low, c.nb_ci_high)}; the two runs' centralized references "
            f"{'are equal on every seed' if same else 'DIFFER'}")


REUSE = "benchmarks/results/reproduce_label_skew_isolated_reuse.json"


def reuse_check(root: Path) -> str:
    """benchmarks/reproduce_rows.py on label-skew-isolated rows that label-skew-fedsgd reuses: how many of the rows
    rerun in fresh processes after fedsgd's commits equal the stored ones in every bit."""
    d = _load_json(root, REUSE)
    assert d["study"] == LSI
    rows = d["rows"]
    return (f"`benchmarks/reproduce_rows.py` reran {len(rows)} of the reused rows ("
            + ", ".join(f"{method_names.label(r['method'])} seed {r['seed']}" for r in rows)
            + f") in fresh processes at {d['threads']} torch thread{'s' if d['threads'] > 1 else ''} on the code "
            f"after `fedsgd`'s commits: {sum(r['same'] for r in rows)} of {len(rows)} equal the stored values in "
            "every bit")


def corrected_margin_sentence(root: Path) -> str:
    """label-skew-fedsgd's BRCA cell: the named method's resampling-corrected half-width against the target's margin,
    and what that means for showing the target (the lower bound mean - h >= -margin needs mean >= h - margin)."""
    s = _summary(root, LSF)
    best = s["best_method"]["chosen"]["rjive-label-skew-3"]
    c = _pair(pd.DataFrame(s["comparisons"]), "rjive-label-skew-3", best, "centralized")
    h, margin = (c["nb_ci_high"] - c["nb_ci_low"]) / 2, _target(root, LSF)
    # the Nadeau-Bengio variance (1/J + n_test/n_train) s^2 keeps n_test/n_train s^2 however many seeds J there are
    floor = 1.959964 * c["std_diff"] * np.sqrt(c["test_train_ratio"])
    need = (f"score above centralized on the means by at least {f3(h - margin)}" if h > margin else
            f"lose no more than {f3(margin - h)} to centralized on the means")
    return (f"With {c['n']} seeds the resampling-corrected interval of the named method is {f3(h)} wide on each "
            f"side, against the target's margin of {margin}, so a named method with this spread would have to {need} "
            f"for the target to be shown; more seeds would not remove that: the correction keeps the test/train "
            f"ratio's share of the variance, and with this spread and ratio the half-width stays above {f3(floor)} "
            f"however many seeds are run")


def label_skew_study_claims(study: str) -> list[Claim]:
    """A label-skew study's generated findings, its best-method rule's sensitivity and its multiplicity line."""
    return [
        Claim(S, "{t}", f"{study}_summary.json, {study}_tidy.csv (generated findings)",
              (("t", lambda root: label_skew_findings(root, study)),)),
        Claim(S, "{t}", f"{study}_summary.json (generated sensitivity)", (("t", held_out_names(study)),)),
        multiplicity_claim(study),
    ]


def multiplicity_claim(study: str) -> Claim:
    """A study's multiplicity line: comparisons made, read on their own interval, kept after Holm and BH."""
    return _c(S, f"{study}_summary.json",
              f"({study}) The report makes {{m.n}} comparisons; {{m.detected}} read \"helps\"/\"hurts\" on their own "
              "interval, {m.holm} keep p < 0.05 after Holm adjustment and {m.bh} after Benjamini-Hochberg", m=_m(study))


def scored_alone_cells(study: str) -> Claim:
    """One generated line per cell of a label-skew study scored alone (test graph isolated): the rule's method."""
    return Claim(S, "{t}", f"{study}_summary.json (generated per-cell lines)",
                 (("t", lambda root: "\n".join("* " + _label_skew_claim(study, c, ", each scored alone").render(root)
                                                + "." for c in _summary(root, study)["best_method"]["chosen"])),))


def held_out_names(study: str):
    """docs/studies/README.md's sentence on the best-method rule's leave-one-seed-out sensitivity, generated from the
    study's summary (``best_method.held_out_chosen``, written by simulations.study.held_out_best): the method the
    rule would name per cell, whether that method meets the target on the means, and how many cells differ."""
    def get(root: Path) -> str:
        s = _summary(root, study)
        target = _target(root, study)
        comps = pd.DataFrame(s["comparisons"])
        chosen, held = s["best_method"]["chosen"], s["best_method"]["held_out_chosen"]
        ties = s["best_method"]["held_out_ties"]
        differ = [c for c in chosen if held[c] != chosen[c]]
        ruled = [c for c, m in held.items() if _pair(comps, c, m, "centralized")["nb_ci_low"] >= -target]
        names = "; ".join(
            f"`{c}` {method_names.label(m)}"
            + (f" (tied with {', '.join(method_names.label(t) for t in ties[c])})" if c in ties else "")
            + f", whose reported runs {'meet' if _meets(comps, c, m, target) else 'do not meet'} the target on the "
              "means" for c, m in held.items())
        return (f"* ({study}) Sensitivity of the best-method rule, not the rule: with each tuned method's validation "
                f"MCC read at the setting its grid chose on the cell's other seeds (leave one seed out; seeds re-split "
                f"the same patients, so this reduces a tuned method's advantage without removing it), the rule would "
                f"name {names}; {len(differ)} of {len(chosen)} cells differ from the declared rule's names. The "
                f"resampling-corrected interval of the method so named rules out a loss of more than {target} to "
                f"centralized in {len(ruled)} of {len(chosen)} cells.")

    return get


CLAIMS: list[Claim] = [
    # ---------------------------------------------------------------- README.md
    _c(B, "benchmarks/results/epoch_profile.json",
       "(shared, load average {e.load} during the run; `results/epoch_profile.json`), OV seed 10, {e.n} training "
       "patients, {e.edges} edges, 1 thread, {e.epochs} timed epochs per tree: before (914b358) {e.bc} ms CPU / "
       "{e.bw} ms wall per epoch (median), after {e.ac} ms CPU / {e.aw} ms wall.", e=_epochs),
    _c(R, "benchmarks/results/demo.json",
       "The command took {d.t} here (one torch thread; load average {d.load} from other jobs)", d=_demo),
    _c(R, "benchmarks/results/demo.json",
       "mean MCC federated {d.fed}, centralized {d.cent}, local-only {d.loc} on the sites' own test patients and "
       "{d.locc} on the consortium's; federated - local-only {d.own.dci} (own sites' test patients) and "
       "{d.cons.dci} (consortium test patients); federated - centralized {d.cen.dci}", d=_demo),
    _c(R, "benchmarks/results/reference_comparison.json",
       "test MCC per split {r.ref} (reference) and {r.ours} (ours)", r=_reference),
    _c(R, "benchmarks/results/reference_comparison.json",
       "weights have the same distribution (each parameter's std, averaged over {q.seeds} seeds, differs by at most "
       "{q.pct} between the codes); in both codes dropout (p = {q.drop}) acts at the same {q.calls} places",
       q=_reference_draws),
    _c(R, "benchmarks/results/reference_comparison.json",
       "ours {q.ours_n} draws per split, the reference {q.ref_n}; every stored draw it re-ran was reproduced exactly), "
       "the mean over splits of the per-split mean differences is {q.gap}, paired 95% CI {q.ci} over the 5 splits "
       "(ours higher on {q.higher} of 5), permutation test of the code label within split p = {q.p}; with the first "
       "run's draw added, {q.gap0} ({q.ci0}), against {r.gap5} with one draw each.", q=_reference_draws,
       r=_reference),
    _c(R, "benchmarks/results/reference_trajectory.json",
       "dropout off and run in float64, agree to {t.w64} in every weight after 200 epochs on split 10 (same test "
       "predictions, MCC {t.m64} in both)", t=_trajectory),
    _c(R, "benchmarks/results/reference_trajectory.json",
       "the reference reaches test MCC {t.refw} on splits 10 to 50 (from its own weights: {t.refo}), {t.shift} on "
       "average, and ends {t.flips} of {t.ntest} test predictions away from ours on the same weights and masks (mean "
       "difference {t.same} over the 5 splits). So the same-seed gap ({r.gap5}) is", t=_trajectory, r=_reference),
    _c(R, "benchmarks/results/reference_trajectory.json",
       "summation order alone left the codes {t.f32} predictions apart after 200 epochs.", t=_trajectory),
    _c(R, "docs/studies/privacy/privacy_tidy.csv, privacy_summary.json (mode plain)",
       "modality-aware FedAvg **{ms}** (per seed {seeds})", ms=_priv("plain"), seeds=_plain_seeds),
    _c(R, PRIV, "final MCC (mean ± sample std) was {sa} with secure aggregation and {pl} without",
       sa=_priv("secagg"), pl=_priv("plain")),
    _c(R, PRIV, "secure aggregation scored lower on these seeds (paired difference {d.dci};",
       d=lambda root: _ns(_load_json(root, PRIV)["modes"]["secagg"]["mcc_minus_plain"])),
    _c(R, "docs/studies/privacy/clip.json", "clip C = {c} = the median honest step norm of seed 10's plain run",
       c=lambda root: f3(_load_json(root, "docs/studies/privacy/clip.json")["clip_norm"])),
    *[_c(R, PRIV, f"| {label} | {{mcc}} | {{minus}} | {{eps}} |", mcc=_priv(mode), minus=_priv(mode, "minus"),
         eps=_priv(mode, "eps"))
      for label, mode in (("central DP, z = 0.5", "dp-central-z0.5"), ("central DP, z = 1", "dp-central-z1"),
                          ("distributed DP under secure aggregation, z = 0.5", "dp-secagg-z0.5"),
                          ("distributed DP under secure aggregation, z = 1", "dp-secagg-z1"))],
    _c(R, PRIV, "| plain | {mcc} | | |", mcc=_priv("plain")),
    _c(R, PRIV, "| secure aggregation | {mcc} | {minus} | |", mcc=_priv("secagg"), minus=_priv("secagg", "minus")),
    _c(R, PRIV, "{a.detected} of the {a.n} differences from plain exclude 0 on their own interval; adjusted over "
       "the {a.n} (Holm or Benjamini-Hochberg), {a.holm} keep p < 0.05", a=_priv_adjusted),
    _c(R, PRIV, "epsilon {lo} to {hi}", lo=_priv("dp-secagg-z1", "eps"), hi=_priv("dp-central-z0.5", "eps")),
    _c(R, "benchmarks/results/contention.json",
       "the 5-seed OV centralized job took {a} s alone and {b} s beside a competing 2-thread CPU job ({r}x",
       a=_bench("contention.json", "alone", "wall_s"), b=_bench("contention.json", "beside_2_thread_job", "wall_s"),
       r=_bench("contention.json", "ratio", fmt="{:.2f}")),
    _c(R, "benchmarks/results/engines.json",
       "same final MCC ({mcc}) with either, 5 runs of each alternating, every run a fresh process, no other job "
       "running: median {fl} s vs {ip} s (**{r}x**, per-pair ratios {pr}; whole processes with Python start-up and "
       "imports {pfl} s vs {pip} s, {pr2}x)", mcc=_engines_mcc,
       fl=_bench("engines.json", "median", "flower"), ip=_bench("engines.json", "median", "inprocess"),
       r=_bench("engines.json", "ratio_of_medians", fmt="{:.2f}"), pr=_engines_pair_range,
       pfl=_bench("engines.json", "process_median", "flower"),
       pip=_bench("engines.json", "process_median", "inprocess"),
       pr2=_bench("engines.json", "process_ratio_of_medians", fmt="{:.2f}")),
    _c(R, "benchmarks/results/large_site_training.json",
       "an epoch took {w} s wall ({c} s CPU over 2 threads) and {m} GiB peak, building the graph {g} s",
       w=_bench("large_site_training.json", "rows", 0, "epochs", 1, "wall_s"),
       c=_bench("large_site_training.json", "rows", 0, "epochs", 1, "cpu_s"),
       m=_bench("large_site_training.json", "rows", 0, "peak_rss_gib", fmt="{:.2f}"),
       g=_bench("large_site_training.json", "rows", 0, "graph_build_wall_s")),
    _c(R, "benchmarks/results/graph_rule_quality.json",
       "tcga-ov-magnet {ot} vs {od} (paired difference {o.d}, 95% CI {o.ci}), tcga-brca-rjive {bt} vs {bd} ({b.d}, "
       "95% CI {b.ci})",
       ot=_grq("graph_rule_quality.json", "tcga-ov-magnet", "topk"),
       od=_grq("graph_rule_quality.json", "tcga-ov-magnet", "dense"),
       o=_grq("graph_rule_quality.json", "tcga-ov-magnet", "diff"),
       bt=_grq("graph_rule_quality.json", "tcga-brca-rjive", "topk"),
       bd=_grq("graph_rule_quality.json", "tcga-brca-rjive", "dense"),
       b=_grq("graph_rule_quality.json", "tcga-brca-rjive", "diff")),
    _c(B, "benchmarks/results/bounded_influence.json",
       "Per seed: bounded influence (this default) {x.b}; the previous default (majority direction vote, agreement "
       "rule, trust weights; commit d89f934) {x.o}; bounded influence without clipping {x.u}. {x.rejected} rejected "
       "in any variant; the bound clipped {x.clipped} of the {x.updates} updates of each variant with clipping. "
       "Bounded minus previous default: {x.bo}; bounded minus unclipped: {x.bu} (two comparisons, unadjusted).",
       x=_bounded),
    _c(R, "benchmarks/results/deploy_round.json",
       "{m} s per round (median of 5 rounds, load average {load} from other jobs",
       m=_bench("deploy_round.json", "median_seconds_per_round", fmt="{:.2f}"), load=_deploy_load),
    _c(R, "docs/studies/gap/gap_summary.json, gap_tidy.csv (recomputed)",
       "after Holm adjustment, {x.survivors}. Against modality-aware FedAvg ({x.n} comparisons, recomputed from "
       "`gap_tidy.csv`), {x.holm} differences keep p < 0.05 after Holm adjustment and {x.bh} after "
       "Benjamini-Hochberg", x=_gap_recommend),
    _c(R, "docs/studies/gap/gap_summary.json",
       "modality-aware FedAvg meets the target on the means in {x.meets} of {x.cells} cells, is above local-only in "
       "{x.above} on its own interval ({x.above_holm} after Holm adjustment) and below it in {x.below}",
       x=_gap_recommend),
    _c(R, "docs/studies/gap/gap_summary.json",
       "Against centralized, the resampling-corrected interval rules out a loss of more than 0.03 for {x.rn} of the "
       "{x.rt} (trained method, cell) pairs ({x.rlist})", x=_gap_recommend),
    _c(S, "gap_summary.json",
       "the resampling-corrected interval rules out a loss of more than 0.03 to centralized for {x.rn} of the {x.rt} "
       "(trained method, cell) pairs ({x.rlist})", x=_gap_recommend),
    _c(R, "benchmarks/results/derived_defaults.json",
       "`fedprox` (a proximal term at the sites, mu = {x.mu}), `fedadam` and `fedyogi` (a server-side Adam / Yogi step "
       "on the modality-aware aggregate, Reddi et al. 2021; server lr {x.lr}; an encoder no site trained that round "
       "does not move), `logit_adjusted` and `fedlc` (for label skew: each site's cross-entropy corrected by its own "
       "training-label counts, Menon et al. 2021 with tau = {x.la} and Zhang et al. 2022 with tau = {x.lc}), "
       "`fedproto` (modality-aware FedAvg whose sites also pull each patient's fused embedding towards the "
       "consortium's prototype of its class, FedProto's local term, Tan et al. 2022, with lambda = {x.fp}; the "
       "prototypes travel inside the model, a site releases a class mean only for a class with at least k training "
       "patients and only if its policy sets `release_class_prototypes = true`, and such runs aggregate in the clear, "
       "without secure sums or DP) and "
       "`personalized` (modality-aware FedAvg, then each site fine-tunes {x.part} on its own training patients",
       x=_derived),
    _c(R, "benchmarks/results/derived_defaults.json",
       "For {x.tie} the winner is a tie-break: the validation patients did not separate their settings", x=_derived),
    _c(R, "docs/studies/gap/gap_summary.json",
       "the method the declared rule names meets the target on the means in {x.met} of {x.cells} cells, and its "
       "resampling-corrected interval rules out a loss of more than 0.03 to centralized in {x.ruled}. The rule "
       "names {x.named}. The "
       "report makes {x.m.n} comparisons; {x.m.detected} read \"helps\"/\"hurts\" on their own interval, "
       "{x.m.holm} keep p < 0.05 after Holm adjustment and {x.m.bh} after Benjamini-Hochberg", x=_gap_brief),
    # ---------------------------------------------------------------- docs/studies/README.md
    _c(S, "gap_tidy.csv, stress_tidy.csv",
       "on their shared seeds ({x.seeds}) their centralized, local-only and plain FedAvg MCCs {x.three} to every "
       "printed digit (plain FedAvg {x.g} in the gap study, {x.s} in the stress study). Modality-aware FedAvg "
       "{x.fed}", x=_same_cell_twice),
    Claim(S, "{t}", "benchmarks/results/derived_defaults.json (generated table)", (("t", defaults_table),)),
    Claim(S, "{t}", GP + " (generated lines)", (("t", graph_partition_lines),)),
    Claim(S, "{t}", GP1 + " (generated lines)", (("t", lambda root: graph_partition_lines(root, GP1)),)),
    Claim(S, "{t}", ", ".join(DRIFT) + " (generated lines)", (("t", drift_probe_lines),)),
    Claim(S, "{t}", GP3 + " (generated lines)", (("t", edgeless_lines),)),
    _c(S, "benchmarks/results/reproduce_stress_clip0.json",
       "with `clip-factor = 0` added to the study's settings, this session's code reproduces the stress study's stored "
       "values exactly in {x}", x=_stress_clip0),
    _c(S, "benchmarks/results/reproduce_label_skew_{1_thread,2_threads}.json",
       "of {x.n} stored rows of the label-skew study (as stored before its BRCA cell was rerun) rerun in fresh "
       "processes, {x.one} reproduce exactly at 1 torch "
       "thread and {x.two} at 2 (e.g. the BRCA cell's seed-10 modality-aware FedAvg: {x.got} at 1 thread, stored "
       "{x.stored})", x=_reproduced),
    _c(S, "test-graph_summary.json", "(e.g. 10 sites, modality-aware FedAvg: {x.d} MCC, 95% CI {x.ci})",
       x=_cm("test-graph", "sites-10-attach", "federated", "federated", "sites-10-among")),
    _c(S, "test-graph_summary.json",
       "Modality-aware FedAvg: {a2.ms} / {a5.ms} / {a10.ms} (among-test) and {t2.ms} / {t5.ms} / {t10.ms} "
       "(attach-to-train) at 2 / 5 / 10 sites",
       a2=_cell("test-graph", "sites-2-among", "federated"), a5=_cell("test-graph", "sites-5-among", "federated"),
       a10=_cell("test-graph", "sites-10-among", "federated"),
       t2=_cell("test-graph", "sites-2-attach", "federated"), t5=_cell("test-graph", "sites-5-attach", "federated"),
       t10=_cell("test-graph", "sites-10-attach", "federated")),
    _c(S, "test-graph_summary.json", "the report makes {m.n} comparisons; {m.detected} read \"helps\"/\"hurts\" on "
       "their own interval and {m.holm} keep p < 0.05 after Holm or Benjamini-Hochberg adjustment",
       m=_m("test-graph")),
    Claim(S, "{t}", "gap_summary.json (generated tables)", (("t", gap_tables),)),
    Claim(S, "{t}", "gap_summary.json, gap_tidy.csv (generated findings)", (("t", gap_findings),)),
    Claim(S, "{t}", "gap_summary.json (generated sensitivity)", (("t", held_out_names("gap")),)),
    # heterogeneity
    _c(S, "heterogeneity_summary.json",
       "modality-aware FedAvg vs local-only: no difference detected ({a.dci}); plain FedAvg likewise ({b.dci})",
       a=_cm("heterogeneity", "mRNA-concentrated", "federated", "local_only"),
       b=_cm("heterogeneity", "mRNA-concentrated", "fedavg_plain", "local_only")),
    _c(S, "heterogeneity_summary.json",
       "modality-aware FedAvg is below centralized ({a.dci}) and so is plain FedAvg ({b.dci})",
       a=_cm("heterogeneity", "mRNA-concentrated", "federated", "centralized"),
       b=_cm("heterogeneity", "mRNA-concentrated", "fedavg_plain", "centralized")),
    _c(S, "heterogeneity_summary.json",
       "modality-aware FedAvg scores lower with mRNA concentrated than with mRNA even ({a.dci}; plain FedAvg: no "
       "difference detected, {b.dci}), while local-only shows no difference ({c.dci}). For miRNA, local-only scores "
       "higher when the loss is concentrated ({d.dci})",
       a=_cm("heterogeneity", "mRNA-concentrated", "federated", "federated", "mRNA-even"),
       b=_cm("heterogeneity", "mRNA-concentrated", "fedavg_plain", "fedavg_plain", "mRNA-even"),
       c=_cm("heterogeneity", "mRNA-concentrated", "local_only", "local_only", "mRNA-even"),
       d=_cm("heterogeneity", "miRNA-concentrated", "local_only", "local_only", "miRNA-even")),
    _c(S, "heterogeneity_summary.json", "(e.g. mRNA-concentrated: {a.dci})",
       a=_cm("heterogeneity", "mRNA-concentrated", "federated", "fedavg_plain")),
    _c(S, "heterogeneity_summary.json", "plain FedAvg above local-only with miRNA even ({a.dci})",
       a=_cm("heterogeneity", "miRNA-even", "fedavg_plain", "local_only")),
    *[_c(S, f"{name}_summary.json", f"({name}) The report makes {{m.n}} comparisons; {{m.detected}} read "
         "\"helps\"/\"hurts\" (or higher/lower) on their own interval, about {m.chance} would by chance, and "
         "{m.holm} keep p < 0.05 after Holm or Benjamini-Hochberg adjustment", m=_m(name))
      for name in ("heterogeneity", "mnar", "rate", "stress", "extensibility", "sites")],
    # mnar
    _c(S, "mnar_summary.json",
       "largest mean shift plain FedAvg by subtype {a.dci}; modality-aware FedAvg by subtype {b.d} (95% CI {b.ci}), "
       "by own value {c.d} ({c.ci}), by site {d.d} ({d.ci}); centralized by subtype {e.d} ({e.ci})",
       a=_cm("mnar", "mnar-label", "fedavg_plain", "fedavg_plain", "mcar"),
       b=_cm("mnar", "mnar-label", "federated", "federated", "mcar"),
       c=_cm("mnar", "mnar-value", "federated", "federated", "mcar"),
       d=_cm("mnar", "by-site", "federated", "federated", "mcar"),
       e=_cm("mnar", "mnar-label", "centralized", "centralized", "mcar")),
    _c(S, "mnar_summary.json", "local-only scoring higher when missingness follows the patient's own mRNA level "
       "({a.dci})", a=_cm("mnar", "mnar-value", "local_only", "local_only", "mcar")),
    # rate
    _c(S, "rate_summary.json",
       "modality-aware FedAvg {a.d} (95% CI {a.ci}), centralized {b.d} ({b.ci}), local-only {c.d} ({c.ci}), plain "
       "FedAvg {d.d} ({d.ci}), all lower",
       a=_cm("rate", "rate-0.5", "federated", "federated", "rate-0.1"),
       b=_cm("rate", "rate-0.5", "centralized", "centralized", "rate-0.1"),
       c=_cm("rate", "rate-0.5", "local_only", "local_only", "rate-0.1"),
       d=_cm("rate", "rate-0.5", "fedavg_plain", "fedavg_plain", "rate-0.1")),
    _c(S, "rate_summary.json", "(e.g. modality-aware FedAvg {a.dci})",
       a=_cm("rate", "rate-0.8", "federated", "federated", "rate-0.5")),
    _c(S, "rate_summary.json",
       "modality-aware FedAvg is above local-only at 30, 50 and 80% ({a.d}, {b.d}, {c.d}; 95% CIs {a.ci}, {b.ci}, "
       "{c.ci}); at 10% only plain FedAvg is ({d.dci}; modality-aware {e.d}, {e.ci})",
       a=_cm("rate", "rate-0.3", "federated", "local_only"), b=_cm("rate", "rate-0.5", "federated", "local_only"),
       c=_cm("rate", "rate-0.8", "federated", "local_only"), d=_cm("rate", "rate-0.1", "fedavg_plain", "local_only"),
       e=_cm("rate", "rate-0.1", "federated", "local_only")),
    _c(S, "rate_summary.json", "below centralized only at 50%: modality-aware FedAvg {a.dci} (plain FedAvg {b.d}, "
       "{b.ci})", a=_cm("rate", "rate-0.5", "federated", "centralized"),
       b=_cm("rate", "rate-0.5", "fedavg_plain", "centralized")),
    _c(S, "rate_summary.json", "(largest |difference| {x})", x=_rate_max_abs),
    # stress
    _c(S, "stress_summary.json", "modality-aware FedAvg is above local-only ({a.dci}) and not detectably different "
       "from centralized ({b.dci})", a=_cm("stress", "baseline", "federated", "local_only"),
       b=_cm("stress", "baseline", "federated", "centralized")),
    _c(S, "stress_summary.json", "modality-aware FedAvg above plain FedAvg ({a.dci})",
       a=_cm("stress", "disjoint", "federated", "fedavg_plain")),
    _c(S, "stress_summary.json", "(plain FedAvg, disjoint vs complete: {a.dci})",
       a=_cm("stress", "disjoint", "fedavg_plain", "fedavg_plain", "baseline")),
    # extensibility
    _c(S, "extensibility_summary.json", "modality-aware FedAvg, mixOmics with protein vs without: {a.dci}; r.jive "
       "with DNA vs without: {b.dci}", a=_cm("extensibility", "mixomics-3", "federated", "federated", "mixomics-2"),
       b=_cm("extensibility", "rjive-3", "federated", "federated", "rjive-2")),
    _c(S, "extensibility_summary.json",
       "mixOmics with protein {a.d} (95% CI {a.ci}), mixOmics without {b.d} ({b.ci}), r.jive mRNA+miRNA {c.d} "
       "({c.ci}); not detected for r.jive with DNA: {d.d} ({d.ci})",
       a=_cm("extensibility", "mixomics-3", "federated", "local_only"),
       b=_cm("extensibility", "mixomics-2", "federated", "local_only"),
       c=_cm("extensibility", "rjive-2", "federated", "local_only"),
       d=_cm("extensibility", "rjive-3", "federated", "local_only")),
    # sites
    _c(S, "sites_summary.json", "modality-aware FedAvg {a.ms} / {b.ms} / {c.ms} at 2 / 5 / 10 sites",
       a=_cell("sites", "sites-2", "federated"), b=_cell("sites", "sites-5", "federated"),
       c=_cell("sites", "sites-10", "federated")),
    _c(S, "sites_summary.json", "above local-only only at 5 sites ({a.dci})",
       a=_cm("sites", "sites-5", "federated", "local_only")),
    _c(S, "sites_summary.json",
       "MCC at alpha 0.1: centralized {c.ms}, modality-aware FedAvg {f.ms}, plain FedAvg {p.ms}, local-only {lo.ms}",
       c=_cell("sites", "alpha-0.1", "centralized"), f=_cell("sites", "alpha-0.1", "federated"),
       p=_cell("sites", "alpha-0.1", "fedavg_plain"), lo=_cell("sites", "alpha-0.1", "local_only")),
    _c(S, "sites_summary.json",
       "both FedAvg variants are below local-only (modality-aware {a.dci} at alpha 0.1 and {b.dci} at alpha 1.0)",
       a=_cm("sites", "alpha-0.1", "federated", "local_only"), b=_cm("sites", "alpha-1.0", "federated", "local_only")),
    _c(S, "sites_summary.json",
       "modality-aware FedAvg minus centralized is {a.dci} at alpha 0.1 (plain FedAvg {b.dci}) and {c.dci} at "
       "alpha 1.0", a=_cm("sites", "alpha-0.1", "federated", "centralized"),
       b=_cm("sites", "alpha-0.1", "fedavg_plain", "centralized"),
       c=_cm("sites", "alpha-1.0", "federated", "centralized")),
    _c(S, "sites_summary.json",
       "At 20 sites (about 3 test patients per site, fewer than k = 5: only the secure sums give a metric) "
       "modality-aware FedAvg {a.ms}, plain FedAvg {b.ms}, centralized {c.ms}, local-only {d.ms}",
       a=_cell("sites", "sites-20", "federated"), b=_cell("sites", "sites-20", "fedavg_plain"),
       c=_cell("sites", "sites-20", "centralized"), d=_cell("sites", "sites-20", "local_only")),
    _c(S, "sites_summary.json",
       "modality-aware FedAvg minus local-only at 20 sites {e.dci}, minus centralized {f.dci}; 20 sites minus 2 "
       "sites, local-only {g.dci}, modality-aware FedAvg {h.dci}",
       e=_cm("sites", "sites-20", "federated", "local_only"), f=_cm("sites", "sites-20", "federated", "centralized"),
       g=_cm("sites", "sites-20", "local_only", "local_only", "sites-2"),
       h=_cm("sites", "sites-20", "federated", "federated", "sites-2")),
    _c(S, "sites_summary.json",
       "At 50 sites (about 1 test patient per site) modality-aware FedAvg {a.ms}, plain FedAvg {b.ms}, centralized "
       "{c.ms}, local-only {d.ms}; modality-aware FedAvg minus local-only {e.dci}, minus centralized {f.dci}; 50 "
       "sites minus 2 sites, local-only {g.dci}, modality-aware FedAvg {h.dci}",
       a=_cell("sites", "sites-50", "federated"), b=_cell("sites", "sites-50", "fedavg_plain"),
       c=_cell("sites", "sites-50", "centralized"), d=_cell("sites", "sites-50", "local_only"),
       e=_cm("sites", "sites-50", "federated", "local_only"), f=_cm("sites", "sites-50", "federated", "centralized"),
       g=_cm("sites", "sites-50", "local_only", "local_only", "sites-2"),
       h=_cm("sites", "sites-50", "federated", "federated", "sites-2")),
    _c(S, "sites_summary.json", "(smallest Benjamini-Hochberg p {x})", x=_sites_min_bh),
    *[_label_skew_claim(LS, cell_id) for cell_id in ("alpha-0.1", "alpha-1.0", "rjive-label-skew-3")],
    *label_skew_study_claims(LS),
    # the label-skew BRCA cell with every patient scored alone (test graph isolated)
    _label_skew_claim(LSI, "rjive-label-skew-3", ", each scored alone"),
    *label_skew_study_claims(LSI),
    # the label-skew cells scored alone, with fedsgd among the methods
    scored_alone_cells(LSF),
    Claim(S, "{t}", "label-skew-fedsgd_summary.json, label-skew-fedsgd_tidy.csv (generated FedSGD lines)",
          (("t", fedsgd_lines),)),
    Claim(S, "{t}", "benchmarks/results/screening_label_skew_fedsgd.json (generated)", (("t", screening_lines),)),
    Claim(S, "{t}", "benchmarks/results/fedsgd_clip_probe_brca.json (generated)", (("t", clip_probe_line),)),
    Claim(S, "{t}", "benchmarks/results/fedsgd_gradient_screen_*.json, screening_label_skew_fedsgd_validation.json "
          "(generated)", (("t", gradient_screen_lines),)),
    Claim(S, "{t}", "label-skew-fedsgd_tidy.csv, graph_partition_label_skew_test_edges.json (generated)",
          (("t", fedsgd_vs_one_optimiser),)),
    Claim(S, "{t}", "label-skew-fedsgd_summary.json (generated)", (("t", corrected_margin_sentence),)),
    Claim(S, "{t}", "benchmarks/results/reproduce_label_skew_isolated_reuse.json (generated)", (("t", reuse_check),)),
    *label_skew_study_claims(LSF),
    # the default fedsgd (gradient screen) in the label-skew cells
    scored_alone_cells(FGS),
    Claim(S, "{t}", "fedsgd-gradient-screen_tidy.csv, label-skew-fedsgd_tidy.csv (generated)",
          (("t", fgs_references),)),
    Claim(S, "{t}", "fedsgd-gradient-screen_summary.json (generated)", (("t", fgs_reading),)),
    Claim(S, "{t}", "benchmarks/results/screening_fedsgd_gradient_screen.json (generated)", (("t", fgs_screen_line),)),
    multiplicity_claim(FGS),
    # ---------------------------------------------------------------- docs/secure-aggregation.md (issue 21's costs)
    _c(SA, "benchmarks/results/secagg_auth_cost.json",
       "per site +{c.up3} B up and +{c.down3} kB down (3 sites), +{c.up5} kB up and +{c.down5} kB down (5 sites) on a "
       "{c.mb} MB upload; +{c.lo} to +{c.hi} s per site and per round", c=_secagg_auth_cost),
    _c(SA, "benchmarks/results/secagg_consistency_cost.json",
       "per site +{c.up3} B up and +{c.down3} B down (3 sites), +{c.up5} B up and +{c.down5} B down (5 sites), and "
       "at most {c.site} ms of CPU per site and {c.server} ms at the coordinator (load average up to {c.load} before "
       "the run)", c=_consistency_cost),
    _c(SA, "benchmarks/results/deploy_round_secagg_authenticated.json, deploy_round_secagg_plain.json",
       "Seconds per round (history `seconds`): authenticated {a.sec}; plain {p.sec}. Secure-aggregation part of the "
       "round (`screening.secure_aggregation.seconds`): authenticated {a.sa}; plain {p.sa}. Bytes per site and round: "
       "up {a.up} authenticated against {p.up} plain; down besides the model {a.down} against {p.down}.",
       a=_deploy_secagg("authenticated"), p=_deploy_secagg("plain")),
    # ---------------------------------------------------------------- docs/deployment.md
    _c(D, DR, "{d.table}", d=_deploy_round),
    _c(D, DR, "A train message's download / push / reply seen by the coordinator now take a median {d.steps}",
       d=_deploy_round),
    _c(D, DR, "Against the bar of 8 s per round: the median of the run above is {d.median} s", d=_deploy_round),
    _c(D, "benchmarks/results/engines.json", "the in-process engine (same ClientApp code, no processes) runs {e}",
       e=_engines_round),
    # ---------------------------------------------------------------- docs/secure-aggregation.md (the rest)
    _c(SA, "benchmarks/results/secagg_auth_cost.json", "{c.table}", c=_secagg_plain_cost),
    _c(SA, "benchmarks/results/secagg_auth_cost.json",
       "**{c.ratio} the upload**; the keys, shares and unmask messages add {c.down} of download per site",
       c=_secagg_plain_cost),
    _c(SA, "benchmarks/results/secagg_auth_cost.json",
       "the largest difference between the secure and the plain mean of the same updates was {c.diff}.",
       c=_secagg_plain_cost),
    _c(SA, PRIV, "{t}", t=_privacy_table),
    _c(SA, PRIV, "Reading: secure aggregation alone costs little accuracy ({d} MCC on average, interval {lo} to {hi} "
       "over 5 seeds)", d=lambda root: s3(_load_json(root, PRIV)["modes"]["secagg"]["mcc_minus_plain"]["mean_diff"]),
       lo=lambda root: s3(_load_json(root, PRIV)["modes"]["secagg"]["mcc_minus_plain"]["ci_low"]),
       hi=lambda root: s3(_load_json(root, PRIV)["modes"]["secagg"]["mcc_minus_plain"]["ci_high"])),
    _c(SA, PRIV, "epsilon is {e.z1} after 20 rounds (`epsilon_rdp` {e.z1rdp}); at z = 0.5 it is {e.z05}",
       e=_privacy_eps),
    _c(SA, PRIV, "{b} bytes up per site and round in the OV runs",
       b=lambda root: f"{int(_load_json(root, PRIV)['modes']['secagg']['secagg_up_bytes_per_site_per_round']):,}"),
    _c(SA, "docs/studies/privacy/clip.json", "DP clip norm C = {q.c}, the median of the 60 honest step norms of seed "
       "10's plain run (quartiles {q.q25} and {q.q75})", q=_clip),
    _c(SA, "docs/studies/privacy/clip.json", "have median {q.c} and 90th percentile {q.q90}", q=_clip),
    _c(SA, "docs/studies/privacy/clip.json", "the 90th percentile of the honest step norms of seed 10 is {q.q90}",
       q=_clip),
    # ---------------------------------------------------------------- benchmarks/README.md
    _c(B, "benchmarks/results/many_sites.json",
       "sites of 60 patients each (the generated cohort): {x.fixed} CPU s per training patient and round at 5 / 20 / "
       "50 / 100 sites, so the cost per patient stays flat as sites join; peak memory of the one in-process simulation "
       "{x.rss} MB. The OV cohort ({x.ov_train} training patients) split ever finer instead: {x.split} CPU s per "
       "training patient and round at the same site counts. The difference is a per-site cost: {x.site} CPU s per "
       "site and round in every run of both series", x=_many_sites),
    _c(B, "benchmarks/results/bounded_influence_ov_5_seeds.json, bounded_influence_brca_label_skew.json",
       "bounded minus previous default {x.ov} on OV iid-3 ({x.ov_n} seeds, 10 rounds) and {x.br} on BRCA r.jive "
       "label-skew-3 ({x.br_n} seeds, 20 rounds); honest updates rejected: {x.ov_rej} and {x.br_rej} by this default, "
       "{x.ov_old} and {x.br_old} by the previous one", x=_bounded5),
    _c(B, "benchmarks/results/inband_attacker_ov.json",
       "one in-band model replacer among three OV sites under `robust = \"auto\"` (rounds 2-5), the attacked run was "
       "never more than 0.05 below the all-honest run on {x.below} of {x.n} seeds, and within 0.05 both ways on "
       "{x.both} of {x.n}", x=_inband),
    _c(B, "benchmarks/results/inband_attacker_ov.json",
       "all three sites honest against the attacker's site absent differ by up to {x.absent} MCC in rounds 2-5 "
       "(seeds {x.seeds}), the same honest sites under `auto` against under `mean` by up to {x.rules}; no such pair "
       "stays within 0.05 on any of these seeds", x=_inband),
    _c(B, "benchmarks/results/inband_attacker_brca_label_skew.json, inband_attacker_ov.json",
       "20 rounds, {x.rejected}: final-round held-out MCC `auto` minus `mean` {x.b_server}, lower on {x.b_lower} of "
       "{x.b_n} seeds; pooled site-test MCC {x.b_global}. OV iid-3: held-out {x.o_server} over {x.o_n} seeds",
       x=_inband),
    _c(B, "benchmarks/results/inband_attacker_colluders_ov.json",
       "({x.col_n} seeds, 5 rounds): {x.accepted}, so the two honest sites are always aggregated; at round 5 "
       "held-out MCC was {x.col_mean} under `mean` and {x.col_auto} under `auto` against the all-honest run (mean "
       "over seeds)", x=_inband),
    _c(B, "benchmarks/results/large_site_training.json",
       "| 100,000 | top-k (k = 10) | {e} | {gw} s wall, {gc} s CPU | {w} s / {c} s (load {l}) | {m} GiB |",
       e=_bench("large_site_training.json", "rows", 0, "edges", fmt="{:,}"),
       gw=_bench("large_site_training.json", "rows", 0, "graph_build_wall_s"),
       gc=_bench("large_site_training.json", "rows", 0, "graph_build_cpu_s"),
       w=_bench("large_site_training.json", "rows", 0, "epochs", 1, "wall_s"),
       c=_bench("large_site_training.json", "rows", 0, "epochs", 1, "cpu_s"),
       l=_bench("large_site_training.json", "rows", 0, "epochs", 1, "load1"),
       m=_bench("large_site_training.json", "rows", 0, "peak_rss_gib", fmt="{:.2f}")),
    _c(B, "benchmarks/results/graph_rule_quality.json",
       "tcga-ov-magnet dense {od}, top-k {ot} ({o.d}, 95% CI {o.ci}, p = {o.p}); tcga-brca-rjive dense {bd}, top-k "
       "{bt} ({b.d}, 95% CI {b.ci}, p = {b.p})",
       od=_grq("graph_rule_quality.json", "tcga-ov-magnet", "dense"),
       ot=_grq("graph_rule_quality.json", "tcga-ov-magnet", "topk"),
       o=_grq("graph_rule_quality.json", "tcga-ov-magnet", "diff"),
       bd=_grq("graph_rule_quality.json", "tcga-brca-rjive", "dense"),
       bt=_grq("graph_rule_quality.json", "tcga-brca-rjive", "topk"),
       b=_grq("graph_rule_quality.json", "tcga-brca-rjive", "diff")),
    _c(B, "benchmarks/results/graph_rule_quality_100_epochs.json",
       "OV dense {od}, top-k {ot}; BRCA dense {bd}, top-k {bt}",
       od=_grq("graph_rule_quality_100_epochs.json", "tcga-ov-magnet", "dense"),
       ot=_grq("graph_rule_quality_100_epochs.json", "tcga-ov-magnet", "topk"),
       bd=_grq("graph_rule_quality_100_epochs.json", "tcga-brca-rjive", "dense"),
       bt=_grq("graph_rule_quality_100_epochs.json", "tcga-brca-rjive", "topk")),
    _c(B, "benchmarks/results/engines.json",
       "in-process median {ip} s, Flower's simulation engine {fl} s, {r}x (per pair {pr}; whole processes {pip} s vs "
       "{pfl} s, {pr2}x); same final MCC {mcc} in all 10 runs",
       ip=_bench("engines.json", "median", "inprocess"), fl=_bench("engines.json", "median", "flower"),
       r=_bench("engines.json", "ratio_of_medians", fmt="{:.2f}"), pr=_engines_pair_range,
       pip=_bench("engines.json", "process_median", "inprocess"),
       pfl=_bench("engines.json", "process_median", "flower"),
       pr2=_bench("engines.json", "process_ratio_of_medians", fmt="{:.2f}"), mcc=_engines_mcc),
    *[_c(B, f"benchmarks/results/{rel}",
         f"{what}: alone {{a}} s, beside {{b}} s, ratio {{r}}x (load {{la}} and {{lb}} mean during the two runs)",
         a=_bench(rel, "alone", "wall_s"), b=_bench(rel, "beside_2_thread_job", "wall_s"),
         r=_bench(rel, "ratio", fmt="{:.2f}"), la=_bench(rel, "alone", "load1_mean"),
         lb=_bench(rel, "beside_2_thread_job", "load1_mean"))
      for what, rel in (("the policy's default", "contention.json"),
                        ("an earlier run with `--epochs 100`", "contention_100_epochs.json"),
                        ("with `MAGNET_FL_THREADS=1`", "contention_1_thread.json"))],
    *[_c(B, "benchmarks/results/reference_side_by_side.json", text, s=_side) for text in (
        "(load average {s.load} during the run: indicative only), magnet-fl {s.commit}, the reference with "
        "{s.versions}", "{s.table}",
        "Ratio reference / magnet-fl: **{s.ratio}** on process wall ({s.own} on the in-program timers). Per-seed "
        "test MCC, magnet-fl vs reference: {s.per_seed}.",
        "Ours are {s.same} per-seed MCC as the record of the code before issue 24",
        "and `--workers 2` gave {s.same2} per-seed MCC as one by one.",
        "`--workers 2` over one by one: {s.speedup} on process wall.", "per seed, {s.per_seed_seconds}.")],
]

# Snippets whose numbers are not results: versions, defaults, settings, counts of things, test tolerances.
ALLOWED: dict[str, list[str]] = {
    R: ["for Flower 1.41.x only",  # the Flower series flower_compat knows
        "between 1e-4 and 0.5 of the global model's norm",  # defaults of update-min-ratio / update-max-ratio
        "`dp-delta`, default 1e-5", "delta 1e-5",  # default
        "central DP, z = 0.5", "distributed DP under secure aggregation, z = 0.5",  # settings (table labels)
        "polls every 0.25 s while a run is active",  # setting
        "(10 %)",  # default max_absent_features
        "stratified 70/10/20",  # MAGNET's split ratios
        "within 0.03 MCC of centralized",  # the issue's target
        ],
    S: ["(at or above local-only and within 0.03 MCC of centralized)",  # the declared target
        "(Basal and Her2 80%, the others 24%)", "by site (10/30/80%)",  # scenario settings of the mnar study
        "mRNA missing for 40% of the r.jive", "(logistic, slope 6)",
        "within 0.02 (`tests/test_scenarios.py`)",  # tolerance asserted by that test
        "missing for 10 / 30 / 50 / 80% of patients", "Rising missingness costs every method between 10% and 50%",
        "(rate-0.5 vs rate-0.1)", "From 50% to 80%",  # rate study settings and cell ids
        "at 30, 50 and 80%", "at 10% only plain FedAvg", "below centralized only at 50%", "at 10, 30 and 80%",
        "At 50% the paired / unpaired", "at 80% no test patient",
        "miRNA missing for 95%", "(protein missing for 70 of 220 patients)",  # stress settings, a data fact
        "At alpha 0.1 and 1.0", "at alpha 0.1", "at alpha 1.0",  # Dirichlet settings
        "within 0.03 MCC of centralized",  # the issue's target
        "p < 0.05",  # the threshold
        ],
    D: ["Flower 1.41", "1.41.x",  # the Flower series of flower_compat
        "127.0.0.1",  # an address
        "sends a heartbeat every 30 s", "about every 24 s (0.8 x its 30 s interval, retried with back-off up to 20 s "
        "on failure)", "2 x 30 = 60 s", "after at most 60 s", "for up to 60 s", "at most 60 s;",  # Flower's constants
        "(default 600 s)", "(default 5 s)",  # worker-timeout / worker-connect-timeout defaults
        "(default 0.25 s) while a run is active (a message in the last 120 s) and at Flower's 3 s",  # poll settings
        "0.5 s checks in memory; 0.05 s now", "1 s (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`, loopback only); 0.1 s now",
        "a back-off of 1 s doubling to 10 s", "every 0.05-0.5 s", "every 0.05 s",  # Flower's and our wait settings
        "the bar of 8 s per round",  # the target
        ],
    SA: ["(default 1.0) itself before encoding", "so the default 1.0 clips",
         "clips at the default `secagg-clip-norm` 1.0",
         "the sites' clipping at 1.0",  # the default of secagg-clip-norm
         "separately below and above 0.5",  # the binary score threshold
         "DP at z = 0.5 or 1",  # the noise multipliers of the study (settings)
         "sqrt(3/2) times larger",  # a formula: three noise pieces sized for two
         ],
    B: ["DNA 1000 + mRNA 1000 + miRNA 448 features, 15 % / 40 % / 5 % of patients",  # generator settings
        "the issue's bar (within 0.05 of the honest run in every round)",  # issue 22's bar, quoted
        "(bar <= 1.5x)", "(< 8 GB)", "(< 60 s per epoch)",  # targets
        "features 200/184/142",  # generator settings
        "1,000 / 10,000 / 100,000",  # sizes the script runs
        "10 % of sites dropping after masking",  # secagg_scaling.py's setting
        "is above 60 s",  # the time bar
        "cannot stay at 1.0x",  # the ideal ratio
        ],
}

_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:,\d{3})*(?:\.\d+)?(?:\s?(?:x|%|s|ms|GiB|GB)\b|/\d+)?")


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def prose(text: str) -> str:
    """The document without fenced code, inline code, link targets and HTML comments, whitespace folded."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "`code`", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return _fold(text)


def is_checked_number(token: str) -> bool:
    """Decimals, numbers with a unit and a/b counts are checked; plain integers (counts, seeds) are not."""
    return bool(re.search(r"\d\.\d|\d\s?(x|%|s|ms|GiB|GB)$|\d/\d", token))


def claim_problems(root: Path, doc: str | None = None) -> list[str]:
    """The claims (of ``doc`` only, when given) whose text is not in their document."""
    problems = []
    for claim in CLAIMS:
        if doc is not None and claim.doc != doc:
            continue
        text = _fold((root / claim.doc).read_text())
        want = _fold(claim.render(root))
        if want not in text:
            problems.append(f"{claim.doc}: text not found (values from {claim.source}):\n    {want}")
    return problems


def uncovered_numbers(root: Path, doc: str) -> list[str]:
    """Checked numbers of ``doc`` outside every claim's and allow-listed snippet's text."""
    text = prose((root / doc).read_text())
    covered = np.zeros(len(text), dtype=bool)
    snippets = [_fold(c.render(root)) for c in CLAIMS if c.doc == doc] + [_fold(s) for s in ALLOWED.get(doc, [])]
    for snip in snippets:
        snip = prose(snip)
        for m in re.finditer(re.escape(snip), text):
            covered[m.start():m.end()] = True
    out = []
    for m in _NUMBER.finditer(text):
        if is_checked_number(m.group()) and not covered[m.start():m.end()].all():
            out.append(f"{doc}: {m.group()!r} in ...{text[max(0, m.start() - 60):m.end() + 30]}...")
    return out


# ------------------------------------------------------------------------------------------------ tests


def test_every_claim_matches_its_stored_result():
    problems = claim_problems(ROOT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_number_is_tied_to_a_result_or_allow_listed(doc):
    problems = uncovered_numbers(ROOT, doc)
    assert not problems, "numbers with no stored source:\n" + "\n".join(problems)


def test_claims_and_allow_list_name_existing_text():
    """An allow-listed snippet that no longer occurs would silently allow nothing; say so instead."""
    for doc, snippets in ALLOWED.items():
        text = prose((ROOT / doc).read_text())
        missing = [s for s in snippets if prose(s) not in text]
        assert not missing, f"{doc}: allow-listed text not found: {missing}"


@pytest.mark.parametrize("planted", [
    ("README.md", "0.255 ± 0.126", "0.256 ± 0.126"),  # a wrong digit in a tied number
    ("docs/deployment.md", "**6.45** (5 rounds", "**6.46** (5 rounds"),
    ("docs/secure-aggregation.md", "| 3 | 0 | 0.46 | 0.34 (0.096) |", "| 3 | 0 | 0.46 | 0.34 (0.069) |"),
    ("docs/studies/README.md", "FedYogi 0.768 ± 0.048", "FedYogi 0.769 ± 0.048"),  # inside a generated table
    ("benchmarks/README.md", "1.40x", "1.41x"),
])
def test_a_planted_wrong_number_fails(tmp_path, planted):
    doc, old, new = planted
    root = _copy_repo_docs(tmp_path)
    assert not claim_problems(root, doc)
    path = root / doc
    assert old in _fold(path.read_text()), old
    path.write_text(_fold(path.read_text()).replace(old, new, 1))
    problems = claim_problems(root, doc)
    assert problems and all(p.startswith(doc) for p in problems)


@pytest.mark.parametrize("doc", ["README.md", "docs/deployment.md", "docs/secure-aggregation.md"])
def test_a_planted_untied_number_fails(tmp_path, doc):
    root = _copy_repo_docs(tmp_path)
    path = root / doc
    path.write_text(path.read_text() + "\nThe demo run takes 12.5 s on a laptop.\n")
    assert any("'12.5 s'" in p for p in uncovered_numbers(root, doc))
    assert not uncovered_numbers(ROOT, doc)


def test_a_changed_result_file_fails(tmp_path):
    """The tie works both ways: a result file rewritten with another value no longer matches the text."""
    root = _copy_repo_docs(tmp_path)
    rel = "benchmarks/results/contention.json"
    data = json.loads((root / rel).read_text())
    data["alone"]["wall_s"] += 1.0
    (root / rel).write_text(json.dumps(data))
    assert any("contention.json" in p for p in claim_problems(root))


def _copy_repo_docs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for rel in ("README.md", "benchmarks/README.md", "docs", "benchmarks/results",
                "tests/data/training_trace_before.json"):  # the pre-issue-24 record a side-by-side claim reads
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, root / rel)
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / rel)
    return root


@cache
def _regenerated(tmp_root: str, name: str) -> str:
    from simulations.study import load_study, reanalyse  # study pulls in matplotlib: only when this test runs

    src = ROOT / "docs" / "studies" / name
    out = Path(tmp_root) / name
    shutil.copytree(src, out)
    return reanalyse(load_study(out / "study.toml"), out / f"{name}_tidy.csv", out, DATA_NOTE).read_text()


@pytest.mark.parametrize("name", STUDIES)
def test_study_reports_are_generated_from_their_csv(tmp_path, name):
    committed = (ROOT / "docs" / "studies" / name / f"{name}_report.md").read_text()
    assert _regenerated(str(tmp_path), name) == committed, (
        f"docs/studies/{name}/{name}_report.md differs from what simulations.study.reanalyse writes from the "
        f"committed {name}_tidy.csv and study.toml; regenerate it")
