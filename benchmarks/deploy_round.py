"""Seconds per round of a loopback deployment (3 sites, TLS + node auth, persistent site workers) and where they go.

Starts what a consortium runs, with the project's own commands: ``magnet-fl deploy superlink`` (TLS, SuperNode
authentication, closed control plane), ``deploy connection``, ``deploy register`` for three sites whose keys were
made at the site, and ``deploy supernode --worker`` per site (a persistent site worker beside each SuperNode); then
``flwr run`` with ``--rounds`` rounds on three thirds of tcga-brca-mixomics (as tests/test_deployment.py does).

Every line any of these processes prints is stamped with the wall clock when it arrives (``FLWR_LOG_LEVEL=DEBUG``
so that the ServerApp's ``collect`` and Flower's ClientApp steps are logged), and each message is followed through:

  coordinator sends -> SuperNode pulls it -> ClientApp process starts -> message forwarded to the worker ->
  worker answers -> SuperNode picks the reply up -> reply pushed to the SuperLink -> coordinator sees it

Prints the median seconds per round (history.json's ``seconds``: from sending the training messages to the last
evaluation reply; and the wall time between consecutive rounds' ends, which adds checkpoint and report writing),
the CPU seconds per round of all these processes (sampled every 0.2 s, see ``CpuMeter``), the load average, and
the median of each step above per message kind. Writes everything as JSON (``--out``).

    python benchmarks/deploy_round.py --rounds 6
    python benchmarks/deploy_round.py --rounds 6 --supernode-args "--pull-interval 3"   # Flower's idle poll
    # secure aggregation (plain or authenticated: each site's worker signs with its node_auth_key and checks the
    # roster), each site under its own policy (`magnet-fl site policy init`, which requires DP: z >= 1)
    python benchmarks/deploy_round.py --rounds 3 --local-epochs 1 --secure authenticated --policy \
        --run-config-extra "dp-clip-norm=1.0 dp-noise-multiplier=1.0" --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ASCTIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+)")
STEPS = ("upload", "pull", "download", "spawn", "startup", "worker", "pickup", "push", "seen", "total")
STEP_TEXT = {
    "upload": "coordinator pushes the round's messages (all sites) to the SuperLink (one request per object)",
    "pull": "coordinator starts sending -> SuperNode pulled the message (upload + SuperNode idle poll)",
    "download": "SuperNode pulled the message -> all its objects downloaded from the SuperLink",
    "spawn": "SuperNode pulled -> ClientApp process started (SuperExec task poll + spawn or fork)",
    "startup": "ClientApp process started -> message forwarded to the worker (imports, app load, and the "
               "message's objects: SuperLink -> SuperNode -> ClientApp)",
    "worker": "the site worker's answer (local training / evaluation)",
    "pickup": "worker answered -> SuperNode picks the reply up (reply push by ClientApp + SuperNode poll)",
    "push": "SuperNode sends the reply to the SuperLink",
    "seen": "reply at the SuperLink -> coordinator's collect sees it (its objects pulled by the ServerApp)",
    "total": "coordinator starts sending -> coordinator sees the reply",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Stamped:
    """Started processes (own session each); every output line is written to NAME.log stamped with time.time()."""

    def __init__(self, logdir: Path, env: dict):
        self.logdir, self.env, self.procs, self.threads = logdir, env, {}, []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        log = open(self.logdir / f"{name}.log", "w")

        def pump():
            for line in proc.stdout:
                log.write(f"{time.time():.3f} {ANSI.sub('', line)}")
                log.flush()
            log.close()
        t = threading.Thread(target=pump, daemon=True)
        t.start()
        self.procs[name], self.threads = proc, [*self.threads, t]
        return proc

    def lines(self, name: str) -> list[tuple[float, str]]:
        out = []
        for raw in (self.logdir / f"{name}.log").read_text(errors="replace").splitlines():
            stamp, _, text = raw.partition(" ")
            try:
                out.append((float(stamp), text))
            except ValueError:
                continue
        return out

    def text(self, name: str) -> str:
        return "\n".join(t for _, t in self.lines(name))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


class CpuMeter(threading.Thread):
    """CPU seconds (user + system) of the started processes and all their descendants, sampled every 0.2 s; a
    process's last < 0.2 s before it exits is missed (short-lived ClientApp processes are undercounted a little)."""

    def __init__(self, procs: Stamped):
        super().__init__(daemon=True)
        self.procs, self.seen, self.stop, self.lock = procs, {}, threading.Event(), threading.Lock()

    def sample(self) -> None:
        for top in list(self.procs.procs.values()):
            try:
                tree = [psutil.Process(top.pid), *psutil.Process(top.pid).children(recursive=True)]
            except psutil.Error:
                continue
            for p in tree:
                try:
                    t = p.cpu_times()
                    with self.lock:
                        self.seen[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:
                    pass

    def total(self) -> float:
        with self.lock:
            return sum(self.seen.values())

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.2)


def prepare_sites(data_root: Path, work: Path) -> tuple[list[Path], Path]:
    """Three site folders from thirds of tcga-brca-mixomics and a manifest with each site's enrolment."""
    from magnet_core.cohort.manifest import ConsortiumManifest, ModalitySpec
    from magnet_core.cohort.validation import load_site_cohort
    from magnet_core.consortium.simulated import enrolled_site

    root = data_root / "tcga-brca-mixomics"
    labels = pd.read_csv(root / "labels.csv", index_col=0)
    mods = {m: pd.read_csv(root / f"{m}.csv.gz", index_col=0) for m in ("mRNA", "miRNA", "protein")}
    sites = []
    for s, part in zip("abc", np.array_split(np.random.default_rng(0).permutation(labels.index), 3)):
        d = work / "data" / f"site-{s}"
        d.mkdir(parents=True)
        labels.loc[sorted(part)].to_csv(d / "labels.csv")
        for m, df in mods.items():
            df.loc[df.index.intersection(part)].to_csv(d / f"{m}.csv.gz")
        sites.append(d)
    manifest = ConsortiumManifest(name="brca", classes=["Basal", "Her2", "LumA"],
                                  modalities=[ModalitySpec(name=m, features=list(df.columns))
                                              for m, df in mods.items()])
    enrolment = {f"site-{s}": enrolled_site(load_site_cohort(d, manifest, 0), any_seed=True)
                 for s, d in zip("abc", sites)}
    return sites, manifest.model_copy(update={"sites": enrolment}).save(work / "manifest.toml")


def wait(predicate, timeout: float, what: str, procs: Stamped | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if procs is not None:
            dead = [n for n, p in procs.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see {procs.logdir}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------------------------------------ the breakdown


def site_events(lines: list[tuple[float, str]]) -> dict:
    """Per message, in order: when the SuperNode pulled it, the ClientApp's forward (start of process, begin, end),
    when the SuperNode picked the reply up and when it was sent."""
    ev = {"node_id": None, "recv": [], "received": [], "proc": [], "fwd_begin": [], "fwd_end": [], "sending": [],
          "sent": [],
          "kinds": []}
    fwd = re.compile(r"(\w+) message answered by the site worker at .* in ([0-9.]+) s \(this ClientApp process had "
                     r"started ([0-9.?]+) s")
    for t, text in lines:
        if (m := re.search(r"SuperNode ID: (\d+)", text)) and ev["node_id"] is None:
            ev["node_id"] = int(m.group(1))
        elif m := re.search(r"Receiving: (\w+) message", text):
            ev["recv"].append(t)
            ev["kinds"].append(m.group(1))
        elif "Received successfully" in text:
            ev["received"].append(t)
        elif m := fwd.search(text):
            dur = float(m.group(2))
            age = float("nan") if m.group(3) == "?" else float(m.group(3))
            ev["fwd_end"].append(t)
            ev["fwd_begin"].append(t - dur)
            ev["proc"].append(t - dur - age)
        elif re.search(r"Sending: \w+ message", text):
            ev["sending"].append(t)
        elif "Sent successfully" in text:
            ev["sent"].append(t)
    return ev


def coordinator_events(lines: list[tuple[float, str]]) -> dict:
    sends, sent, replies, rounds = [], [], [], []
    for t, text in lines:
        if m := re.search(r"collect: sending (\d+) message\(s\) at ([0-9.]+)", text):
            sends.append(float(m.group(2)))
            replies.append([])
        elif m := re.search(r"collect: sent (\d+) message\(s\) at ([0-9.]+)", text):
            sent.append(float(m.group(2)))
        elif (m := re.search(r"collect: reply from node (\d+) at ([0-9.]+)", text)) and replies:
            replies[-1].append((int(m.group(1)), float(m.group(2))))
        elif re.search(r"round \d+/\d+: global MCC", text) and (m := ASCTIME.search(text)):
            rounds.append(time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000)
    return {"sends": sends, "sent": sent, "replies": replies, "round_ends": rounds}


def breakdown(coord: dict, sites: dict[str, dict]) -> dict:
    """Seconds of each step per message (message k of a site answers the coordinator's k-th send)."""
    steps: dict[str, dict[str, list[float]]] = {}
    for name, ev in sites.items():
        for k, send in enumerate(coord["sends"]):
            if min(len(ev["recv"]), len(ev["received"]), len(ev["sent"]), len(ev["fwd_end"]),
                   len(coord["sent"])) <= k:
                continue
            seen = [t for node, t in coord["replies"][k] if node == ev["node_id"]]
            if not seen:
                continue
            kind = ev["kinds"][k]
            values = {"upload": coord["sent"][k] - send, "pull": ev["recv"][k] - send,
                      "download": ev["received"][k] - ev["recv"][k], "spawn": ev["proc"][k] - ev["recv"][k],
                      "startup": ev["fwd_begin"][k] - ev["proc"][k], "worker": ev["fwd_end"][k] - ev["fwd_begin"][k],
                      "pickup": ev["sending"][k] - ev["fwd_end"][k], "push": ev["sent"][k] - ev["sending"][k],
                      "seen": seen[0] - ev["sent"][k], "total": seen[0] - send}
            for step, v in values.items():
                steps.setdefault(kind, {}).setdefault(step, []).append(v)
    return {kind: {step: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                          "max": round(max(v), 3), "n": len(v)}
                   for step, v in per.items() if not any(np.isnan(v))}
            for kind, per in steps.items()}


# ------------------------------------------------------------------------------------------------ the run


def run(args: argparse.Namespace, work: Path) -> dict:
    from server.pki import init_ca, issue_server_cert, make_site, make_site_key

    logs = work / "logs"
    logs.mkdir(parents=True)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_HOME": str(work / "flwr-home"), "FLWR_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cli = [shutil.which("magnet-fl", path=env["PATH"]) or "magnet-fl"]
    sites, manifest = prepare_sites(Path(args.data), work)
    pki, fleet, control = work / "pki", free_port(), free_port()
    init_ca(pki)
    issue_server_cert(pki, ["localhost"])
    bundles = {}
    for s in "abc":  # each site makes its key pair; the coordinator registers the public key and sends the bundle
        d = work / "at-site" / f"site-{s}"
        make_site_key(d, comment=f"site-{s}")
        for f in make_site(pki, f"site-{s}", d / "node_auth_key.pub", f"127.0.0.1:{fleet}").iterdir():
            shutil.copy(f, d / f.name)
        # the site approves the app bundle of the release it reviewed (this checkout)
        subprocess.run([*cli, "deploy", "approve-app", "--bundle", str(d), str(REPO)], env=env, check=True,
                       capture_output=True, timeout=120)
        if args.policy:  # the site's own policy, with its defaults (state folder next to it)
            subprocess.run([*cli, "site", "policy", "init", str(d / "policy.toml"), "--consortium", "brca",
                            "--state-dir", str(d / "site-state"),
                            *([] if args.secure == "authenticated" else ["--unauthenticated"])],
                           env=env, check=True, capture_output=True,
                           timeout=120)
        bundles[s] = d
    procs = Stamped(logs, env)
    meter = CpuMeter(procs)
    roster = pki / "registered_sites.csv"
    site_args = {s: [*(["--policy", str(bundles[s] / "policy.toml")] if args.policy else []),
                     *(["--secagg-roster", str(roster)] if args.secure == "authenticated" else [])] for s in "abc"}
    secure_config = {"none": "", "plain": " secagg=true",
                     "authenticated": f" secagg=true secagg-roster='{roster}'"}[args.secure]
    result: dict = {"rounds_requested": args.rounds, "local_epochs": args.local_epochs, "secure": args.secure,
                    "site_policy": args.policy, "run_config_extra": args.run_config_extra,
                    "supernode_args": args.supernode_args, "cpus": os.cpu_count(),
                    "loadavg_start": loadavg(), "flwr_env": {k: v for k, v in os.environ.items()
                                                               if k.startswith("FLWR_")}}
    try:
        procs.start("superlink", [*cli, "deploy", "superlink", "--pki", str(pki / "superlink"), "--state",
                                  str(work / "state"), "--fleet-address", f"127.0.0.1:{fleet}",
                                  "--control-port", str(control)])
        wait(lambda: "SuperLink: Fleet API" in procs.text("superlink"), 120, "the SuperLink", procs)
        subprocess.run([*cli, "deploy", "connection", "--pki", str(pki / "superlink"), "--address",
                        f"127.0.0.1:{control}", "--flwr-home", env["FLWR_HOME"]], env=env, check=True,
                       capture_output=True, timeout=120)
        for s in "abc":
            subprocess.run([*cli, "deploy", "register", "--bundle", str(bundles[s])], env=env, check=True,
                           capture_output=True, timeout=120)
        for i, s in enumerate("abc"):
            procs.start(f"site-{s}", [*cli, "deploy", "supernode", "--bundle", str(bundles[s]), "--data",
                                      str(sites[i]), "--manifest", str(manifest), "--port", str(free_port()),
                                      "--worker", *site_args[s], *shlex.split(args.supernode_args)])
        for s in "abc":
            wait(lambda: "SuperNode ID:" in procs.text(f"site-{s}"), 300, f"site-{s}'s SuperNode", procs)
        meter.start()
        out = work / "run"
        run_config = (f"num-server-rounds={args.rounds} local-epochs={args.local_epochs} min-sites=3 preset='brca' "
                      f"round-timeout=600.0 report=false manifest='{manifest}' out-dir='{out}' "
                      f"site-keys='{pki}/registered_sites.csv'{secure_config} {args.run_config_extra}")
        t_run = time.time()
        started = subprocess.run(["flwr", "run", str(REPO), "consortium", "--run-config", run_config], env=env,
                                 capture_output=True, text=True, timeout=300, cwd=REPO)
        if started.returncode != 0:
            raise RuntimeError(f"flwr run failed: {started.stdout}{started.stderr}")
        cpu_at, load_at, done = [meter.total()], [loadavg()], 0
        deadline = time.monotonic() + args.timeout
        while done < args.rounds:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {args.timeout:.0f} s with {done} of {args.rounds} rounds done")
            try:
                n = len(json.loads((out / "history.json").read_text()))
            except (OSError, ValueError):
                n = 0
            for _ in range(n - done):
                meter.sample()
                cpu_at.append(meter.total())
                load_at.append(loadavg())
            done = n
            time.sleep(0.2)
        wait(lambda: (out / "model.pt").exists(), 120, "the final model")
        history = json.loads((out / "history.json").read_text())
        run_id = re.search(r"run (\d+)", started.stdout)
        # the ServerApp's output reaches the SuperLink's log store only (`flwr log`), not its console
        shown = subprocess.run(["flwr", "log", run_id.group(1), "consortium", "--show"], env=env, text=True,
                               capture_output=True, timeout=120, cwd=REPO).stdout if run_id else ""
        (logs / "serverapp.log").write_text(shown)
    finally:
        meter.stop.set()
        procs.stop_all()
    coord = coordinator_events([(0.0, ANSI.sub("", line)) for line in shown.splitlines()])
    events = {f"site-{s}": site_events(procs.lines(f"site-{s}")) for s in "abc"}
    seconds = [r["seconds"] for r in history]
    ends = coord["round_ends"]
    between = [b - a for a, b in zip(ends, ends[1:])]
    cpu = [b - a for a, b in zip(cpu_at, cpu_at[1:])]
    result.update({
        "seconds_per_round": [round(s, 2) for s in seconds],
        "train_seconds_per_round": [round(r["train_seconds"], 2) for r in history],
        "median_seconds_per_round": round(statistics.median(seconds), 2),
        "median_seconds_per_round_excl_first": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
        "wall_between_round_ends": [round(x, 2) for x in between],
        "median_wall_between_round_ends": round(statistics.median(between), 2) if between else None,
        "first_round_after_flwr_run": round(ends[0] - t_run, 2) if ends else None,
        "cpu_seconds_per_round": [round(c, 2) for c in cpu],
        "median_cpu_seconds_per_round": round(statistics.median(cpu), 2) if cpu else None,
        "loadavg_per_round": load_at[1:], "loadavg_end": loadavg(),
        "accepted": [r["accepted"] for r in history],
        "secure_aggregation": [secure_summary(r) for r in history],
        "steps": breakdown(coord, events), "step_meaning": STEP_TEXT,
    })
    return result


def secure_summary(r: dict) -> dict | None:
    """A round's secure-aggregation record (history.json): status, its seconds, bytes per site both ways."""
    sa = r.get("screening", {}).get("secure_aggregation")
    if sa is None:
        return None
    return {k: sa.get(k) for k in ("status", "authenticated", "seconds", "model_bytes", "bytes_per_site", "left_out",
                                   "error")}


def report(result: dict) -> None:
    print(f"rounds: {result['seconds_per_round']} s (training part {result['train_seconds_per_round']})")
    print(f"median seconds per round: {result['median_seconds_per_round']} "
          f"(without round 1: {result['median_seconds_per_round_excl_first']}); wall between round ends "
          f"{result['median_wall_between_round_ends']} s (median, adds checkpoint/report writing)")
    print(f"CPU seconds per round (all processes): {result['cpu_seconds_per_round']} "
          f"(median {result['median_cpu_seconds_per_round']}) on {result['cpus']} CPUs")
    print(f"load average: start {result['loadavg_start']}, per round "
          f"{[la[0] for la in result['loadavg_per_round']]}, end {result['loadavg_end']}")
    for kind, steps in result["steps"].items():
        print(f"\n{kind} messages (median / min / max seconds over {steps['total']['n']} messages):")
        for step in STEPS:
            if step in steps:
                s = steps[step]
                print(f"  {step:8s} {s['median']:7.2f} {s['min']:7.2f} {s['max']:7.2f}   {STEP_TEXT[step]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("MAGNET_FL_DATA", str(REPO.parent / "shared" / "data")),
                    help="folder holding tcga-brca-mixomics (default $MAGNET_FL_DATA)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds to run (median over them; default 6)")
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--supernode-args", default="", help="extra flags for every `magnet-fl deploy supernode`")
    ap.add_argument("--secure", choices=("none", "plain", "authenticated"), default="none",
                    help="secure aggregation: none, plain (secagg=true) or authenticated (secagg-roster at the "
                         "coordinator, --secagg-roster for every site's worker, which signs with its node_auth_key)")
    ap.add_argument("--policy", action="store_true", help="every site's worker enforces its own default policy")
    ap.add_argument("--run-config-extra", default="", help="more run-config settings (e.g. DP, which a policy needs)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds the rounds may take in all")
    ap.add_argument("--work", type=Path, default=None, help="keep the run's folders and logs here (default: a "
                                                            "temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "deploy_round.json")
    args = ap.parse_args()
    if not (Path(args.data) / "tcga-brca-mixomics").is_dir():
        sys.exit(f"error: {Path(args.data) / 'tcga-brca-mixomics'} not found (give --data or set MAGNET_FL_DATA)")
    if args.rounds < 2:
        sys.exit("error: --rounds must be at least 2")
    work = args.work or Path(tempfile.mkdtemp(prefix="deploy-round-", dir=os.environ.get("TMPDIR")))
    if args.work is not None:
        if work.exists() and any(work.iterdir()):
            sys.exit(f"error: {work} is not empty")
        work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    except RuntimeError as exc:
        sys.exit(f"error: {exc} (logs in {work / 'logs'})")
    finally:
        if args.work is None and not args.keep and "result" in locals():
            shutil.rmtree(work, ignore_errors=True)
    result["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    report(result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
