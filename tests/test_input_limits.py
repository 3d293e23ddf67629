"""Input size limits: a small file that expands to gigabytes is refused before parsing, fast and in bounded memory.

The attacks run the real entry points (site validation with the manifest, the simulation loader of both layouts,
raw preparation) in a child process, whose peak resident memory (ru_maxrss) and time are measured. Only entry points
that existed before the limits are used in the attack tests, so they run (and fail) against the code without them.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.predict_cli import load_patients
from magnet_core.cohort import tables
from magnet_core.cohort.data import DataError, read_modality
from magnet_core.cohort.manifest import ConsortiumManifest
from magnet_core.cohort.validation import validate_site

REPO = Path(__file__).resolve().parents[1]
BOMB_BYTES = 180_000_000  # the measured attack: 180 MB of rows from a gzip file of a few hundred KB
BOMB_COLUMNS = 1000
PEAK_MB = 200  # the target: refused below this peak resident memory (interpreter and pandas included)
SECONDS = 3.0  # reading: the old reader took 11-26 s on this bomb; the new one stops in about half a second
FEATURES = [f"f{j}" for j in range(BOMB_COLUMNS)]


def _manifest(features=FEATURES[:4], **limits) -> dict:
    """A manifest as its TOML would give it (plain data), with ``[input_limits]`` when limits are given."""
    raw = {"name": "limits", "classes": ["a", "b"], "modalities": [{"name": "mRNA", "features": list(features)}]}
    if limits:
        raw["input_limits"] = limits
    return raw


def _write_bomb(path: Path, target: int = BOMB_BYTES) -> None:
    """A valid-looking table: one row per sample, BOMB_COLUMNS values, until ``target`` decompressed bytes."""
    tail = ",0.5" * BOMB_COLUMNS + "\n"
    written, i = 0, 0
    with gzip.open(path, "wt", compresslevel=9) as f:
        f.write("sample," + ",".join(FEATURES) + "\n")
        while written < target:
            block = "".join(f"s{i + k}{tail}" for k in range(1000))
            f.write(block)
            written += len(block)
            i += 1000


def _labels(ids) -> str:
    return "sample,Class\n" + "".join(f"{s},{k % 2}\n" for k, s in enumerate(ids))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.csv.gz"
    _write_bomb(path)
    assert path.stat().st_size < 1_000_000  # a small file
    return path


def _measured(imports: str, code: str) -> dict:
    """Run ``code`` (which sets ``error``) after ``imports`` in a fresh interpreter; its error text, the process's
    peak resident memory (MB, interpreter and imports included: VmHWM, the high-water mark of its own address space;
    ru_maxrss would also count the parent's memory at the fork) and the seconds ``code`` took."""
    script = (f"import json, re, time\n{imports}\n"
              "t0 = time.perf_counter()\n"
              f"{code}\n"
              "seconds = time.perf_counter() - t0\n"
              "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
              "print(json.dumps({'error': error, 'seconds': seconds, 'peak_mb': int(hwm.group(1)) / 1024}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _site_with_bomb(root: Path, bomb: Path) -> tuple[Path, Path]:
    """(the folder to load, the bomb's path in it)."""
    site = root / "site"
    site.mkdir()
    (site / "labels.csv").write_text(_labels([f"s{i}" for i in range(20)]))
    (site / "mRNA.csv.gz").symlink_to(bomb)
    return site, site / "mRNA.csv.gz"


def _cohort_with_bomb_labels(root: Path, bomb: Path) -> tuple[Path, Path]:
    cohort = root / "cohort"
    cohort.mkdir()
    (cohort / "labels.csv.gz").symlink_to(bomb)
    (cohort / "mRNA.csv").write_text("sample,f0\n" + "".join(f"s{i},0.5\n" for i in range(20)))
    return cohort, cohort / "labels.csv.gz"


def _split_with_bomb(root: Path, bomb: Path) -> tuple[Path, Path]:
    seed = root / "split" / "10"
    seed.mkdir(parents=True)
    for part in ("train", "val", "test"):
        for kind in ("paired", "unpaired"):
            (seed / f"label_{part}_{kind}.csv").write_text(_labels([f"{part}{kind}{i}" for i in range(4)]))
    (seed / "mRNA.csv.gz").symlink_to(bomb)
    return seed.parent, seed / "mRNA.csv.gz"


VALIDATE = ("from magnet_core.cohort.manifest import ConsortiumManifest\n"
            "from magnet_core.cohort.validation import validate_site",
            "report, _ = validate_site({folder!r}, ConsortiumManifest.model_validate({manifest!r}))\n"
            "error = '\\n'.join(report.errors) or None")
LOAD = ("from magnet_core.cohort.data import load_for_seed",
        "try:\n    load_for_seed({folder!r}, 10, log=lambda *a: None); error = None\n"
        "except ValueError as exc:\n    error = str(exc)")
PREPARE = ("from magnet_core.cohort.preprocess import PrepareConfig, load_raw_site_dir",
           "try:\n    load_raw_site_dir({folder!r}, PrepareConfig(), log=lambda *a: None); error = None\n"
           "except ValueError as exc:\n    error = str(exc)")
ATTACKS = {
    "validate_site": (_site_with_bomb, VALIDATE),  # site validation / training / predict of a site folder
    "load_for_seed labels": (_cohort_with_bomb_labels, LOAD),  # simulations, cohort layout: the bomb as labels
    "load_for_seed split": (_split_with_bomb, LOAD),  # simulations and predict, MAGNET split layout: as a modality
    "prepare raw site": (_site_with_bomb, PREPARE),  # raw preparation of a site (magnet-fl prepare)
}


@pytest.mark.parametrize("entry", list(ATTACKS))
def test_gzip_bomb_is_refused_fast_in_bounded_memory(entry, bomb, tmp_path):
    make, (imports, code) = ATTACKS[entry]
    folder, file = make(tmp_path, bomb)
    result = _measured(imports, code.format(folder=str(folder), manifest=_manifest()))
    assert result["error"] is not None, f"{entry}: the bomb was accepted ({result})"
    assert f"{file}: " in result["error"], result["error"]  # names the file
    assert "input limit max_" in result["error"] and "[input_limits]" in result["error"], result["error"]
    assert result["peak_mb"] < PEAK_MB, f"{entry}: peak {result['peak_mb']:.0f} MB ({result['error'][:200]})"
    assert result["seconds"] < SECONDS, f"{entry}: {result['seconds']:.1f} s"


def test_bomb_of_few_long_lines_is_stopped_by_the_byte_limit_in_bounded_memory(tmp_path):
    """The worst case for the reader under the default limits: lines just under max_line_bytes, two cells each, so
    neither rows nor cells stop it; it holds up to max_bytes (64 MiB) before it is refused."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "labels.csv").write_text(_labels([f"s{i}" for i in range(20)]))
    with gzip.open(site / "mRNA.csv.gz", "wt", compresslevel=9) as f:
        f.write("sample,f0\n")
        for i in range(30):
            f.write(f"s{i}," + "1" * 4_000_000 + "\n")
    assert (site / "mRNA.csv.gz").stat().st_size < 1_000_000
    result = _measured(VALIDATE[0], VALIDATE[1].format(folder=str(site), manifest=_manifest()))
    assert result["error"] is not None and result["error"].startswith(f"{site / 'mRNA.csv.gz'}: more than 64 MiB")
    assert "input limit max_bytes = 67108864" in result["error"], result["error"]
    assert result["peak_mb"] < PEAK_MB, f"peak {result['peak_mb']:.0f} MB"
    assert result["seconds"] < SECONDS, f"{result['seconds']:.1f} s"


def test_wide_first_row_over_short_rows_is_refused_before_pandas_allocates_it(tmp_path):
    """A 150 KB uncompressed file: one row of 40,000 cells, then 3,000 rows of one: parsed, rows x widest line =
    120 million cells (960 MB of float64) before the ragged rows are noticed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "labels.csv").write_text(_labels([f"s{i}" for i in range(20)]))
    wide = 40_000
    (site / "mRNA.csv").write_text("sample," + ",".join(f"f{j}" for j in range(wide)) + "\n"
                                   + "s0" + ",0" * wide + "\n" + "".join(f"s{i},1\n" for i in range(1, 3000)))
    assert (site / "mRNA.csv").stat().st_size < 500_000
    result = _measured(VALIDATE[0], VALIDATE[1].format(folder=str(site), manifest=_manifest()))
    assert result["error"] is not None and "mRNA.csv" in result["error"]
    assert "input limit max_cells" in result["error"], result["error"]
    assert result["peak_mb"] < PEAK_MB, f"peak {result['peak_mb']:.0f} MB"


# ----------------------------------------------------------------------------------------- each limit, named


def _site(tmp_path: Path, n: int = 12, features=FEATURES[:4], trailing_newline: bool = True) -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    ids = [f"s{i}" for i in range(n)]
    (site / "labels.csv").write_text(_labels(ids).rstrip("\n") + ("\n" if trailing_newline else ""))
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((n, len(features))).round(4), index=pd.Index(ids, name="sample"),
                         columns=features)
    frame.to_csv(site / "mRNA.csv.gz")
    return site


def _errors(site: Path, **limits) -> list[str]:
    report, _ = validate_site(site, ConsortiumManifest.model_validate(_manifest(**limits)))
    return report.errors


def test_too_many_columns_under_the_default_limit_is_refused_naming_it(tmp_path):
    site = _site(tmp_path, n=6, features=[f"g{j}" for j in range(50_001)])  # one more than the default
    errors = _errors(site)
    assert errors[0].startswith(f"{site / 'mRNA.csv.gz'}: line 1 has 50,002 cells or more"), errors
    assert "input limit max_columns = 50000" in errors[0] and "[input_limits]" in errors[0]


def test_columns_limit_from_the_manifest(tmp_path):
    site = _site(tmp_path)  # 5 cells per line in mRNA.csv.gz, 2 in labels.csv
    assert _errors(site, max_columns=5) == []
    errors = _errors(site, max_columns=4)
    assert errors[0].startswith(f"{site / 'mRNA.csv.gz'}: line 1 has 5 cells or more, more than 4 columns"), errors
    assert "max_columns = 4" in errors[0]


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_rows_limit_from_the_manifest_at_its_boundary(tmp_path, trailing_newline):
    site = _site(tmp_path, n=12, trailing_newline=trailing_newline)
    assert _errors(site, max_rows=12) == []
    errors = _errors(site, max_rows=11)
    assert errors[0].startswith(f"{site / 'labels.csv'}: more than 11 rows below the header"), errors
    assert "max_rows = 11" in errors[0]


def test_cells_and_line_length_limits_from_the_manifest(tmp_path):
    site = _site(tmp_path, n=12)  # mRNA: 12 rows x 5 cells = 60
    assert _errors(site, max_cells=60) == []
    errors = _errors(site, max_cells=59)
    assert errors[0].startswith(f"{site / 'mRNA.csv.gz'}: at least 12 rows x 5 cells in its widest line = 60 cells, "
                                "more than 59"), errors
    longest = max(len(line) for line in gzip.open(site / "mRNA.csv.gz", "rt").read().split("\n"))
    assert _errors(site, max_line_bytes=longest) == []
    errors = _errors(site, max_line_bytes=longest - 1)
    assert errors[0].startswith(f"{site / 'mRNA.csv.gz'}: line "), errors
    assert f"is longer than {longest - 1} bytes" in errors[0] and f"max_line_bytes = {longest - 1}" in errors[0]


@pytest.mark.parametrize("at", [1_048_570, 1_048_576, 1_048_576 - 6000, 2_500_000])
def test_long_and_wide_lines_are_found_across_read_chunks(tmp_path, at):
    """One long, wide line starting at byte ``at``: across the first 1 MiB read boundary, on it, ending just past it,
    or inside the third chunk; found and named by its line number."""
    head = "id,value\n"
    rows, size = [], len(head)
    while at - size >= 220:
        rows.append(f"s{len(rows):07d}," + "1" * 100 + "\n")  # 110 bytes
        size += 110
    rows.append(f"s{len(rows):07d}," + "1" * (at - size - 10) + "\n")  # the rest, so the special line starts at `at`
    special = "x" + ",1" * 3000 + "\n"  # 6001 bytes before its newline, 3001 cells
    path = tmp_path / "t.csv"
    path.write_text(head + "".join(rows) + special + "s_last,1\n")
    assert path.read_bytes().index(b"x,1,1") == at
    line = len(rows) + 2
    room = {"max_rows": 1_000_000, "max_cells": 1_000_000_000}
    ok = ConsortiumManifest.model_validate(_manifest(max_line_bytes=6001, max_columns=3001, **room)).input_limits
    with pytest.raises(DataError) as within:  # the body is ragged (refused by pandas), but within the limits
        tables.read_table(path, ok)
    assert "input limit" not in str(within.value), within.value
    for limits, text in (({"max_line_bytes": 6000}, f"line {line} is longer than 6,000 bytes"),
                         ({"max_columns": 3000}, f"line {line} has 3,001 cells or more")):
        lowered = ConsortiumManifest.model_validate(_manifest(**limits, **room)).input_limits
        with pytest.raises(DataError, match=text):
            tables.read_table(path, lowered)


def test_bytes_limit_stops_a_gzip_of_long_lines(tmp_path):
    path = tmp_path / "long.csv.gz"
    with gzip.open(path, "wt", compresslevel=9) as f:
        f.write("sample,x\n")
        for i in range(40):
            f.write(f"s{i}," + "1" * 500_000 + "\n")
    limits = ConsortiumManifest.model_validate(_manifest(max_bytes=8_000_000)).input_limits
    with pytest.raises(DataError) as info:
        tables.read_table(path, limits)
    message = str(info.value)
    assert message.startswith(f"{path}: more than "), message
    assert "(8,000,000 bytes) once decompressed (a gzip file of" in message
    assert "max_bytes = 8000000" in message


# ----------------------------------------------------------------------------------------- the manifest field


@pytest.mark.parametrize("body, expected", [
    ('max_rows = "many"', "input_limits.max_rows"),
    ("max_rows = 0", "input_limits.max_rows"),
    ("max_bytes = 1.5", "input_limits.max_bytes"),
    ("max_lines = 10", "input_limits.max_lines"),
])
def test_manifest_input_limits_are_typed(tmp_path, body, expected):
    path = tmp_path / "manifest.toml"
    path.write_text('classes = ["a", "b"]\n[[modalities]]\nname = "mRNA"\nfeatures = ["f0"]\n'
                    f"[input_limits]\n{body}\n")
    with pytest.raises(DataError, match=expected.replace(".", r"\.")):
        ConsortiumManifest.load(path)


def test_default_limits_leave_manifest_dumps_and_fingerprints_unchanged(tmp_path):
    manifest = ConsortiumManifest.model_validate(_manifest())
    assert "input_limits" not in manifest.model_dump(mode="json")  # model packages fingerprint this dump
    raised = ConsortiumManifest.model_validate(_manifest(max_rows=1_000_000))
    saved = raised.save(tmp_path / "m.toml")
    assert "[input_limits]" in saved.read_text()
    assert ConsortiumManifest.load(saved).input_limits == raised.input_limits


# ----------------------------------------------------------------------------------------- real cohorts


def test_real_cohorts_fit_the_default_limits_tenfold_and_read_as_before(data_root):
    """Every real table is at least 10x inside every default limit, and reads to what pandas alone reads."""
    limits = ConsortiumManifest.model_validate(_manifest()).input_limits
    files = sorted(p for p in data_root.rglob("*.csv*") if p.is_file())
    assert len(files) >= 40
    for path in files:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        lines = data.rstrip(b"\n").split(b"\n")
        cells = max(line.count(b",") + 1 for line in lines)
        assert 10 * len(data) <= limits.max_bytes, path
        assert 10 * (len(lines) - 1) <= limits.max_rows, path
        assert 10 * cells <= limits.max_columns, path
        assert 10 * (len(lines) - 1) * cells <= limits.max_cells, path
        assert 10 * max(map(len, lines)) <= limits.max_line_bytes, path
        if path.name.startswith(("label", "split")):
            continue
        ours = read_modality(path)
        plain = pd.read_csv(path, index_col=0)
        assert list(ours.index) == [str(s).strip() for s in plain.index], path
        assert list(ours.columns) == list(plain.columns), path
        np.testing.assert_array_equal(ours.to_numpy(), plain.to_numpy(dtype=np.float32), err_msg=str(path))


def test_predict_reads_new_patients_within_the_package_manifests_limits(tmp_path):
    """magnet-fl predict on a bare table: the limits come from the model package's manifest."""
    site = _site(tmp_path, n=12)
    log = []
    manifest = ConsortiumManifest.model_validate(_manifest(max_rows=12))
    patients = load_patients(site / "mRNA.csv.gz", manifest, {"seed": 0}, None, log.append)
    assert len(patients.ids) == 12
    with pytest.raises(DataError, match=r"mRNA\.csv\.gz: more than 11 rows below the header.*max_rows = 11"):
        load_patients(site / "mRNA.csv.gz", ConsortiumManifest.model_validate(_manifest(max_rows=11)), {"seed": 0},
                      None, log.append)


# ----------------------------------------------------------------------------------------- no reader left unbounded

# a pandas/numpy table parser, or a decompressor, called directly (not through a module such as ``tables.``)
UNBOUNDED_READER = re.compile(r"(?<![\w.])(?:(?:pd|pandas|np|numpy)\.)?(?:read_csv|read_table|read_fwf|read_excel|"
                              r"read_parquet|loadtxt|genfromtxt)\(|(?<![\w.])(?:gzip|zlib|bz2|lzma)\."
                              r"(?:open|decompress|GzipFile|BZ2File|LZMAFile)\(")


def test_every_site_table_is_read_through_the_bounded_reader():
    """The code that runs at a site or at the coordinator (magnet_core, client, server, flower_compat) parses or
    decompresses a table only in magnet_core/cohort/tables.py; everything else calls its read_table, whose limits
    hold. (simulations/ and benchmarks/ are the operator's own tools over its own cohort files.)"""
    allowed = REPO / "magnet_core" / "cohort" / "tables.py"
    found = []
    for package in ("magnet_core", "client", "server", "flower_compat"):
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                if path != allowed and not code.lstrip().startswith("def ") and UNBOUNDED_READER.search(code):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == [], "table reads outside the bounded reader:\n" + "\n".join(found)
    assert UNBOUNDED_READER.search("x = pd.read_csv(path)") and UNBOUNDED_READER.search("gzip.decompress(b)")
    assert not UNBOUNDED_READER.search("tables.read_table(path, limits)")
