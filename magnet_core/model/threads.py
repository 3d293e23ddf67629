"""The project's thread policy: torch threads and OpenMP's wait policy chosen from the CPUs a process may use."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict

THREADS_ENV = "MAGNET_FL_THREADS"  # the one documented override: torch intra-op threads of every entry point


class ThreadPolicy(BaseModel):
    """What :func:`apply_thread_policy` found and set."""

    model_config = ConfigDict(frozen=True)

    threads: int  # torch intra-op threads now in force (torch.get_num_threads())
    interop_threads: int | None  # set to 1, or None where torch no longer allowed it
    cores: int  # CPUs this process may use (affinity, cgroup quota, a launcher's OMP_NUM_THREADS)
    workers: int  # concurrent workers sharing those CPUs
    source: str  # "MAGNET_FL_THREADS" or "cores/workers"
    wait_policy: str  # OMP_WAIT_POLICY in the environment
    wait_policy_effective: bool  # False: OpenMP had already started with another policy (torch imported first)
    note: str = ""


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers) and by an
    ``OMP_NUM_THREADS`` its launcher set (Ray sets it per actor to the actor's ``num_cpus``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    launcher = _positive_int(os.environ.get("OMP_NUM_THREADS", ""))
    if launcher is not None:
        cores = min(cores, launcher)
    return max(1, cores)


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs granted by a cgroup v2 quota ("max 100000" = none)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _positive_int(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def openmp_started() -> bool:
    """Whether an OpenMP runtime is already loaded in this process (it reads OMP_WAIT_POLICY once, at load)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "torch" in sys.modules
    return any(lib in maps for lib in ("libgomp", "libiomp", "libomp"))


def prepare_wait_policy() -> None:
    """Put ``OMP_WAIT_POLICY=PASSIVE`` in the environment (unless set) without importing torch: a command line
    calls this first and :func:`apply_thread_policy` once it knows it will work, so ``--help`` and argument errors
    never load torch, and OpenMP still starts with the passive policy whenever torch does load."""
    if os.environ.get("OMP_WAIT_POLICY") is None and not openmp_started():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def apply_thread_policy(workers: int = 1, cores: int | None = None) -> ThreadPolicy:
    """Set torch's threads for ``workers`` concurrent workers sharing ``cores`` CPUs (default: the CPUs this
    process may use) and make OpenMP's idle threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``).

    threads = max(1, cores // workers), or ``$MAGNET_FL_THREADS`` when set. Call it before torch is imported:
    the OpenMP runtime reads the wait policy once, when torch loads it. Called later without PASSIVE already in
    the environment, spinning threads cannot be stopped, so the policy uses one thread (unless
    ``$MAGNET_FL_THREADS`` says otherwise). Inter-op threads (unused by this project) are set to 1 where torch
    still allows it. Idempotent; returns what it set.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cores = available_cores() if cores is None else max(1, int(cores))
    override = os.environ.get(THREADS_ENV, "").strip()
    forced = _positive_int(override) if override else None
    if override and forced is None:
        raise ValueError(f"${THREADS_ENV} must be a positive integer, got {override!r}")
    before_openmp = not openmp_started()
    prior = os.environ.get("OMP_WAIT_POLICY")
    if prior is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by libgomp/MKL when torch loads them (and by children)
    wait_policy = os.environ["OMP_WAIT_POLICY"]
    effective = before_openmp or (prior or "").upper() == "PASSIVE"
    note = ""
    if forced is not None:
        threads, source = forced, THREADS_ENV
    else:
        threads, source = max(1, cores // workers), "cores/workers"
        if threads > 1 and not effective and wait_policy.upper() == "PASSIVE":
            threads = 1
            note = "OpenMP started before the policy (spin-waiting): one thread"

    import torch  # after the environment is set

    torch.set_num_threads(threads)
    interop: int | None = 1
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # parallel work already started, or set before: torch forbids a change
        interop = None if torch.get_num_interop_threads() != 1 else 1
    return ThreadPolicy(threads=torch.get_num_threads(), interop_threads=interop, cores=cores, workers=workers,
                        source=source, wait_policy=wait_policy, wait_policy_effective=effective, note=note)
