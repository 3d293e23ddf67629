"""The gzip bomb of issue 22 (item 6) against the site's table readers: peak memory and time until refusal.

A gzip file of a few hundred KB expanding to 180 MB of valid-looking rows (one header of 1000 features, then
``s<i>,0.5,...`` lines) is given to each entry point that reads a site's tables, each in a fresh interpreter:
``validate_site`` (validate-site, training, evaluation, predict of a site folder), ``load_raw_site_dir`` (prepare)
and the ``magnet-fl validate-site`` command line. Per run: the child's peak resident memory (ru_maxrss from wait4,
interpreter and imports included), its CPU seconds, the wall seconds, and the error it printed. The same entry points
on a two-patient site give the baseline (what the imports alone take). ``--code DIR`` measures another checkout
(e.g. ``git archive 5765bb8^`` unpacked, the readers before the limits) under ``--label``.

    python benchmarks/input_limits_bomb.py                       # this checkout, label "limits"
    git archive 5765bb8^ | tar -x -C /tmp/pre    # the readers before the limits
    python benchmarks/input_limits_bomb.py --code /tmp/pre --label before_limits --note 'git archive 5765bb8^'

Results are merged into benchmarks/results/input_limits_bomb.json under the label.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "input_limits_bomb.json"
BOMB_BYTES = 180_000_000
COLUMNS = 1000
MANIFEST = 'name = "limits"\nclasses = ["a", "b"]\n[[modalities]]\nname = "mRNA"\nfeatures = ["f0", "f1", "f2", "f3"]\n'

IMPORTED = "import magnet_core\nprint('magnet_core from', magnet_core.__file__)\n"  # which checkout ran
ENTRIES = {
    "validate_site": ("from magnet_core.cohort.manifest import ConsortiumManifest\n"
                      "from magnet_core.cohort.validation import validate_site\n"
                      "report, _ = validate_site({site!r}, ConsortiumManifest.load({manifest!r}))\n"
                      "print('\\n'.join(report.errors))\n"),
    "prepare_raw_site": ("from magnet_core.cohort.preprocess import PrepareConfig, load_raw_site_dir\n"
                         "try:\n    load_raw_site_dir({site!r}, PrepareConfig(), log=lambda *a: None)\n"
                         "except ValueError as exc:\n    print(exc)\n"),
}


def write_site(folder: Path, bomb: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "labels.csv").write_text("sample,Class\n" + "".join(f"s{k},{k % 2}\n" for k in range(20)))
    if not bomb:
        (folder / "mRNA.csv").write_text("sample,f0,f1,f2,f3\n" + "".join(f"s{k},1,2,3,{k}\n" for k in range(20)))
        return folder
    tail = ",0.5" * COLUMNS + "\n"
    written, i = 0, 0
    with gzip.open(folder / "mRNA.csv.gz", "wt", compresslevel=9) as f:
        f.write("sample," + ",".join(f"f{j}" for j in range(COLUMNS)) + "\n")
        while written < BOMB_BYTES:
            block = "".join(f"s{i + k}{tail}" for k in range(1000))
            f.write(block)
            written += len(block)
            i += 1000
    return folder


def run_child(argv: list[str], env: dict, cwd: Path) -> dict:
    """Run ``argv``; its own peak RSS and CPU time (os.wait4), wall seconds and the last lines it printed."""
    out = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)  # cwd: first on sys.path
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out.seek(0)
    text = out.read().decode(errors="replace").strip()
    refusal = next((line for line in text.splitlines() if "input limit" in line), None)
    source = next((line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("magnet_core from ")), None)
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "wall_s": round(wall, 2), "exit_status": os.waitstatus_to_exitcode(status), "refusal": refusal,
            "magnet_core_from": source,
            "output_tail": text[-600:]}


def _head(code: Path) -> str:
    try:
        return "git HEAD " + subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose readers are measured")
    ap.add_argument("--label", default="limits")
    ap.add_argument("--note", help="what --code is (recorded), e.g. 'git archive 5765bb8^'")
    ap.add_argument("--no-cli", action="store_true", help="skip the magnet-fl command line (needs this venv)")
    args = ap.parse_args()
    code = args.code.resolve()
    env = {**os.environ, "PYTHONPATH": str(code), "FLWR_TELEMETRY_ENABLED": "0",
           "MAGNET_FL_THREADS": "1"}
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.toml"
        manifest.write_text(MANIFEST)
        sites = {"bomb": write_site(Path(tmp) / "bomb", True), "baseline": write_site(Path(tmp) / "small", False)}
        bomb_file = sites["bomb"] / "mRNA.csv.gz"
        with gzip.open(bomb_file, "rb") as f:
            expanded = sum(len(c) for c in iter(lambda: f.read(1 << 20), b""))
        for kind, site in sites.items():
            for name, entry in ENTRIES.items():
                script = IMPORTED + entry.format(site=str(site), manifest=str(manifest))
                runs[f"{name}/{kind}"] = run_child([sys.executable, "-c", script], env, code)
            if not args.no_cli:
                cli = [sys.executable, "-m", "simulations.cli", "validate-site", "--manifest", str(manifest), str(site)]
                runs[f"cli_validate_site/{kind}"] = run_child(cli, env, code)
        bomb = {"compressed_bytes": bomb_file.stat().st_size, "decompressed_bytes": expanded, "columns": COLUMNS + 1}
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    result[args.label] = {"code": str(code), "note": args.note or _head(code), "bomb": bomb, "runs": runs,
                          "load_average": os.getloadavg(),
                          "cpus": os.cpu_count(), "python": platform.python_version(),
                          "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    for key, r in runs.items():
        print(f"{args.label:>14} {key:<28} peak {r['peak_rss_mb']:7.1f} MB  cpu {r['cpu_s']:6.2f} s  "
              f"wall {r['wall_s']:6.2f} s  refused: {bool(r['refusal'])}")


if __name__ == "__main__":
    main()
