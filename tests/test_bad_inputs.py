"""Malformed inputs through the real command line (``simulations.cli.main``, in process): each is refused with a
non-zero exit and one line naming the file / argument and the problem, before any work, leaving nothing
half-written. The table of cases is printed (``pytest -s``) and written to /work/notes/bad_inputs_table.md."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
from simulations.cli import main
from simulations.outputs import MARKER, run_staged

TABLE_PATH = Path(os.environ.get("MAGNET_FL_BAD_INPUTS_TABLE", "/work/notes/bad_inputs_table.md"))
ROWS: list[tuple[str, str, int, str]] = []
FEATURES = {"mRNA": [f"g{j}" for j in range(10)], "miRNA": [f"mir{j}" for j in range(6)]}


# ----------------------------------------------------------------------------------------------- small inputs


def _ids(n: int) -> list[str]:
    return [f"P{i:03d}" for i in range(n)]


def write_cohort(folder: Path, n: int = 30, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> Path:
    """labels.csv + mRNA.csv.gz + miRNA.csv (values in [0, 1] unless scaled); every 5th patient lacks miRNA."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = _ids(n)
    pd.DataFrame({"Class": np.arange(n) % 2}, index=pd.Index(ids, name="sampleID")).to_csv(folder / "labels.csv")
    for m, feats in FEATURES.items():
        rows = ids if m == "mRNA" else [s for i, s in enumerate(ids) if i % 5]
        frame = pd.DataFrame(rng.random((len(rows), len(feats))) * scale + shift, index=pd.Index(rows, name="sampleID"),
                             columns=feats)
        frame.to_csv(folder / ("mRNA.csv.gz" if m == "mRNA" else "miRNA.csv"), float_format="%.6g")
    return folder


def manifest(**kw) -> ConsortiumManifest:
    mods = [ModalitySpec(name=m, features=f, impute_means=[0.5] * len(f), scale_min=[0.0] * len(f),
                         scale_max=[1.0] * len(f)) for m, f in FEATURES.items()]
    return ConsortiumManifest(name="door", classes=["a", "b"], modalities=mods, missing_feature="impute", **kw)


def read_mrna(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "mRNA.csv.gz", index_col=0)


def write_mrna(folder: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(folder / "mRNA.csv.gz")


def corrupt_gzip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 16):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def set_cell(folder: Path, value) -> None:
    frame = read_mrna(folder).astype(object)
    frame.iat[3, 2] = value
    write_mrna(folder, frame)


def folder_state(path: Path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its content (to show a refused run changed nothing)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- the cases


def _cohort(tmp: Path, edit=None) -> Path:
    folder = write_cohort(tmp / "cohort")
    if edit is not None:
        edit(folder)
    return folder


def _site(tmp: Path, edit=None) -> tuple[Path, Path]:
    site = write_cohort(tmp / "site")
    if edit is not None:
        edit(site)
    return site, manifest().save(tmp / "manifest.toml")


def _previous_results(out: Path) -> Path:
    out.mkdir(parents=True)
    (out / "results.json").write_text('{"previous": true}\n')
    (out / MARKER).write_text('{"command": "centralized"}\n')
    return out


def _centralized(edit=None, extra=()):
    return lambda tmp: ["centralized", "--data", str(_cohort(tmp, edit)), "--seeds", "1", "--epochs", "1",
                        "--out", str(tmp / "out"), *extra]


def _simulate(*extra, edit=None, data=True):
    def argv(tmp):
        head = ["simulate", "--engine", "inprocess", "--seeds", "1", "--rounds", "1", "--local-epochs", "1"]
        return [*head, *(["--data", str(_cohort(tmp, edit))] if data else []), "--out", str(tmp / "out"), *extra]
    return argv


def _validate(edit):
    def argv(tmp):
        site, man = _site(tmp, edit)
        return ["validate-site", str(site), "--manifest", str(man)]
    return argv


def _prepare(edit=None, extra=()):
    def argv(tmp):
        raw = write_cohort(tmp / "raw" / "hospitalA", n=40, scale=8.0, shift=3.0)
        write_cohort(tmp / "raw" / "hospitalB", n=40, seed=1, scale=8.0, shift=3.0)
        if edit is not None:
            edit(raw)
        return ["prepare", "--site", str(raw), "--site", str(tmp / "raw" / "hospitalB"), "--n-features", "4",
                "--out", str(tmp / "out"), *extra]
    return argv


def _transpose(folder: Path) -> None:
    read_mrna(folder).T.rename_axis("gene").to_csv(folder / "mRNA.csv.gz")


def _rename_all(folder: Path) -> None:
    write_mrna(folder, read_mrna(folder).add_prefix("hsa-"))


def _drop_two(folder: Path) -> None:
    write_mrna(folder, read_mrna(folder).drop(columns=["g3", "g7"]))


def _raw_unscaled(folder: Path) -> None:
    write_mrna(folder, read_mrna(folder) * 1000 + 50)


def _ragged(folder: Path) -> None:
    text = (folder / "miRNA.csv").read_text().rstrip("\n")
    (folder / "miRNA.csv").write_text(text.rsplit(",", 2)[0] + "\n")  # the last line loses its last two cells


def _text_label(folder: Path) -> None:
    labels = pd.read_csv(folder / "labels.csv", index_col=0).astype(object)
    labels.iat[4, 0] = "tumour"
    labels.to_csv(folder / "labels.csv")


def _binary(folder: Path) -> None:
    (folder / "miRNA.csv").write_bytes(bytes(range(256)) * 8)


def _not_gzip(folder: Path) -> None:
    (folder / "mRNA.csv.gz").write_text(gzip.decompress((folder / "mRNA.csv.gz").read_bytes()).decode())


def _empty(folder: Path) -> None:
    (folder / "miRNA.csv").write_text("")


def _with_previous(builder):
    def argv(tmp):
        args = builder(tmp)
        _previous_results(tmp / "out")
        return args
    return argv


def _with_foreign_files(builder):
    def argv(tmp):
        args = builder(tmp)
        (tmp / "out").mkdir()
        (tmp / "out" / "thesis.tex").write_text("not a result")
        return args
    return argv


CASES = [
    # command, case, argv builder, expected exit code, expected text of the one line
    ("centralized", "corrupt gzip (bytes flipped)", _centralized(lambda f: corrupt_gzip(f / "mRNA.csv.gz")), 2,
     "mRNA.csv.gz: corrupt gzip file"),
    ("centralized", "truncated gzip", _centralized(lambda f: truncate(f / "mRNA.csv.gz")), 2,
     "mRNA.csv.gz: truncated gzip file"),
    ("centralized", "named .gz but plain text", _centralized(_not_gzip), 2, "mRNA.csv.gz: not a gzip file"),
    ("centralized", "value 1e300 (beyond float32)", _centralized(lambda f: set_cell(f, 1e300)), 2,
     "line 5 (sample 'P003'), column 4 'g2': too large for float32: value 1e+300"),
    ("centralized", "value inf", _centralized(lambda f: set_cell(f, "inf")), 2,
     "column 4 'g2': non-finite (inf) value"),
    ("centralized", "text in a numeric cell", _centralized(lambda f: set_cell(f, "high")), 2,
     "line 5 (sample 'P003'), column 4 'g2': non-numeric value 'high'"),
    ("centralized", "transposed matrix (features x samples)", _centralized(_transpose), 2,
     "mRNA.csv.gz: wrong orientation: no row id is a labelled sample"),
    ("centralized", "ragged (truncated) last row", _centralized(_ragged), 2,
     "miRNA.csv, line 25: 5 cells where the other rows have 7"),
    ("centralized", "binary file named .csv", _centralized(_binary), 2, "miRNA.csv, line 2: not UTF-8 text (byte 0x80"),
    ("centralized", "empty modality file", _centralized(_empty), 2, "miRNA.csv: empty file"),
    ("centralized", "text label", _centralized(_text_label), 2,
     "label 'tumour' of sample 'P004' in column 'Class' is not an integer class"),
    ("centralized", "--epochs 0", _centralized(extra=["--epochs", "0"]), 2,
     "argument --epochs: must be at least 1, got 0"),
    ("centralized", "--epochs -3", _centralized(extra=["--epochs", "-3"]), 2,
     "argument --epochs: must be at least 1, got -3"),
    ("centralized", "--seeds 10,10 (duplicate)", _centralized(extra=["--seeds", "10,10"]), 2,
     "argument --seeds: seed 10 given more than once"),
    ("centralized", "--seeds a,b", _centralized(extra=["--seeds", "a,b"]), 2,
     "argument --seeds: expected comma-separated integers, got 'a,b'"),
    ("centralized", "--out holds results, no --overwrite", _with_previous(_centralized()), 2,
     "out: already holds results (.magnet-fl-output.json, results.json); pass --overwrite"),
    ("centralized", "--overwrite on a folder of other files", _with_foreign_files(_centralized(extra=["--overwrite"])),
     2, "out: holds files that are not magnet-fl results (thesis.tex)"),
    ("simulate", "--rounds 0", _simulate("--rounds", "0", data=False), 2, "argument --rounds: must be at least 1"),
    ("simulate", "--local-epochs 0", _simulate("--local-epochs", "0", data=False), 2,
     "argument --local-epochs: must be at least 1"),
    ("simulate", "--methods ','", _simulate("--methods", ",", data=False), 2,
     "argument --methods: none given (got ',')"),
    ("simulate", "--methods federated,bogus", _simulate("--methods", "federated,bogus", data=False), 2,
     "argument --methods: unknown bogus"),
    ("simulate", "--seeds 3,3", _simulate("--seeds", "3,3", data=False), 2, "seed 3 given more than once"),
    ("simulate", "corrupt gzip", _simulate(edit=lambda f: corrupt_gzip(f / "mRNA.csv.gz")), 2,
     "mRNA.csv.gz: corrupt gzip file"),
    ("simulate", "value 1e300", _simulate(edit=lambda f: set_cell(f, 1e300)), 2, "too large for float32"),
    ("simulate", "--out holds results", _with_previous(_simulate(data=False)), 2, "out: already holds results"),
    ("validate-site", "corrupt gzip", _validate(lambda f: corrupt_gzip(f / "mRNA.csv.gz")), 1,
     "mRNA.csv.gz: corrupt gzip file"),
    ("validate-site", "truncated gzip", _validate(lambda f: truncate(f / "mRNA.csv.gz", 0.3)), 1,
     "mRNA.csv.gz: truncated gzip file"),
    ("validate-site", "transposed matrix", _validate(_transpose), 1,
     "the file is features x samples (transposed); write one row per sample"),
    ("validate-site", "every column renamed (manifest imputes)", _validate(_rename_all), 1,
     "10 manifest feature(s) missing for modality 'mRNA'"),
    ("validate-site", "2 of 10 features absent (> 10%)", _validate(_drop_two), 1,
     "(20% of its 10 features; the manifest fills at most 10%"),
    ("validate-site", "raw unscaled values (x1000 + 50)", _validate(_raw_unscaled), 1,
     "lies outside the prepared range [0, 1] by more than scale_tolerance 1, as do 300 of 300 cells"),
    ("validate-site", "value 1e300", _validate(lambda f: set_cell(f, 1e300)), 1, "too large for float32: value 1e+300"),
    ("validate-site", "ragged (truncated) last row", _validate(_ragged), 1, "a truncated or ragged row"),
    ("prepare", "corrupt gzip raw matrix", _prepare(lambda f: corrupt_gzip(f / "mRNA.csv.gz")), 2,
     "hospitalA/mRNA.csv.gz: corrupt gzip file"),
    ("prepare", "raw value 1e300", _prepare(lambda f: set_cell(f, 1e300)), 2, "too large for float32: value 1e+300"),
    ("prepare", "text label", _prepare(_text_label), 2, "label 'tumour' of sample 'P004'"),
    ("prepare", "--n-features 0", _prepare(extra=["--n-features", "0"]), 2,
     "argument --n-features: must be at least 1"),
    ("prepare", "--out holds a previous preparation", _with_previous(_prepare()), 2, "out: already holds results"),
]


@pytest.mark.parametrize("command, case, argv, code, expected", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_malformed_input_is_refused_with_one_line(tmp_path, capsys, command, case, argv, code, expected):
    args = argv(tmp_path)
    out = tmp_path / "out"
    before = folder_state(out)
    capsys.readouterr()
    rc = main(args)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    shown = lines[0][len("error: "):].replace(str(tmp_path) + os.sep, "") if lines else text
    ROWS.append((command, case, rc, shown))
    assert rc == code, text
    assert "Traceback" not in text
    assert len(lines) == 1, text  # one line, and it says what is wrong and where
    assert expected in lines[0], lines[0]
    assert folder_state(out) == before  # nothing written, or the previous result untouched
    assert not list(tmp_path.glob(".out.partial-*")) and not list(tmp_path.glob(".out.old-*"))


def test_zz_write_the_table():
    """Runs after the cases (file order): prints the table and writes it for the issue note."""
    if len(ROWS) < len(CASES):
        pytest.skip("the table is built when every case of this module ran in this session")
    assert len(ROWS) >= 20
    lines = ["| # | command | malformed input | exit | message (one line; temporary folder removed) |",
             "|---|---|---|---|---|"]
    for k, (command, case, rc, message) in enumerate(ROWS, 1):
        lines.append(f"| {k} | `{command}` | {case} | {rc} | `{message.replace('|', '/')}` |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if TABLE_PATH.parent.is_dir():
        TABLE_PATH.write_text("# Malformed inputs refused at the door (tests/test_bad_inputs.py)\n\n" + table)


# ----------------------------------------------------------------------------------------------- what does pass


def test_clean_inputs_pass_and_results_record_what_ran(tmp_path, capsys):
    site, man = _site(tmp_path)
    assert main(["validate-site", str(site), "--manifest", str(man)]) == 0, capsys.readouterr().out
    # a single patient beyond the tolerance is a warning, not a refusal (test patients are not clipped)
    set_cell(site, 2.6)
    assert main(["validate-site", str(site), "--manifest", str(man)]) == 0
    assert "lies outside the prepared range [0, 1]" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["centralized", "--data", str(write_cohort(tmp_path / "cohort")), "--seeds", "1,2", "--epochs", "1",
                 "--preset", "brca", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["epochs"] == 1 and res["preset"]["train"]["epochs"] == 1 and res["seeds"] == [1, 2]
    assert json.loads((out / MARKER).read_text())["command"] == "centralized"
    assert f"wrote {out / 'results.json'}" in capsys.readouterr().out  # the final path, not the staging one
    assert main(["centralized", "--data", str(tmp_path / "cohort"), "--seeds", "3", "--epochs", "1",
                 "--preset", "brca", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["seeds"] == [3]


def test_prepare_overwrite_leaves_no_stale_site_folder(tmp_path, capsys):
    args = _prepare()(tmp_path)
    out = tmp_path / "out"
    assert main(args) == 0, capsys.readouterr()
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"hospitalA", "hospitalB", "decisions"}
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["manifest"] == str(out / "manifest.toml")  # paths point at the final folder
    assert all(s["prepared"]["out_dir"] == str(out / s["site"]) for s in report["sites"])
    only_a = [a for a in args if "hospitalB" not in a and a != "--site"]
    only_a[1:1] = ["--site"]
    assert main([*only_a, "--overwrite"]) == 0, capsys.readouterr()
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"hospitalA", "decisions"}
    assert not list(tmp_path.glob(".out.*"))


def test_a_failed_run_leaves_the_previous_result(tmp_path):
    import argparse

    out = _previous_results(tmp_path / "out")
    before = folder_state(out)

    def crash(inner):
        (inner.out / "results.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_staged(argparse.Namespace(out=out, overwrite=True), "centralized", crash)
    assert folder_state(out) == before and not list(tmp_path.glob(".out.*"))
    assert run_staged(argparse.Namespace(out=out, overwrite=True), "centralized", lambda inner: 3) == 3
    assert folder_state(out) == before

    def ok(inner):
        (inner.out / "results.json").write_text("new")
        return 0

    assert run_staged(argparse.Namespace(out=out, overwrite=True), "centralized", ok) == 0
    assert (out / "results.json").read_text() == "new" and not list(tmp_path.glob(".out.*"))


def test_a_folder_filled_during_the_run_is_not_replaced(tmp_path):
    import argparse

    out = tmp_path / "out"

    def meanwhile(inner):
        _previous_results(out)  # another run finished first
        (inner.out / "results.json").write_text("mine")
        return 0

    with pytest.raises(FileExistsError, match="was filled by another run meanwhile; this run's results are kept in"):
        run_staged(argparse.Namespace(out=out, overwrite=False), "centralized", meanwhile)
    assert (out / "results.json").read_text() == '{"previous": true}\n'
    kept = list(tmp_path.glob("out.new-*"))
    assert len(kept) == 1 and (kept[0] / "results.json").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is the current folder or holds it"):
        run_staged(argparse.Namespace(out=Path.cwd(), overwrite=True), "centralized", lambda inner: 0)
