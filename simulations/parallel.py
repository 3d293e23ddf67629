"""Independent runs (seeds, study cells) on parallel worker processes, each under the project's thread policy.

A run's numbers depend only on its inputs and its seed, so running the runs in separate processes gives the same
results as running them one by one in one process (``tests/test_parallel.py`` checks this exactly); what changes is
the wall time on a machine with idle cores. This model gains nothing from a second torch thread (issue 24: 62 s at
1 thread, 69 s at 2 for the 5-seed OV run) but a second core runs a second worker.

- Workers are started with ``spawn``: a fresh interpreter per worker, no OpenMP runtime inherited from the parent
  (forking a process whose OpenMP threads exist can deadlock). Each worker applies the thread policy before it
  imports torch: ``threads = cores // workers`` (one thread each with ``--workers auto``), or ``$MAGNET_FL_THREADS``.
- Results come back in task order whatever the order of completion; ``on_result`` is called in task order too, as
  soon as every earlier task has finished, so what a command prints and writes does not depend on scheduling.
- Progress: a task calls ``advance(n)``; in a worker it goes through a queue to the parent's ``advance``.
- ``workers == 1`` (or one task) runs in this process, exactly the serial path.

No torch import here: the CLI's argument parsing stays light; torch is imported by the tasks themselves.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence, TypeVar

from magnet_core.model.threads import available_cores

from .cli import positive_int

T = TypeVar("T")
R = TypeVar("R")
Advance = Callable[[int], None]
AUTO = "auto"
POLL_SECONDS = 0.2  # how often the parent forwards workers' progress while it waits

_progress: Any = None  # in a worker: the queue its advance() writes to (set by _init_worker)


def parse_workers(text: str) -> int | str:
    """``--workers``: a positive integer or ``auto`` (one worker per CPU this process may use, capped by the
    number of runs)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or {AUTO!r})") from None


def resolve_workers(workers: int | str, tasks: int) -> int:
    """The number of processes to use for ``tasks`` runs: never more than there are runs."""
    if workers == AUTO:
        n = available_cores()
    elif isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1:
        n = workers
    else:
        raise ValueError(f"workers must be a positive integer or {AUTO!r}, got {workers!r}")
    return max(1, min(n, tasks))


def _init_worker(progress: Any, workers: int) -> None:
    """Runs first in every worker, before torch is imported: the thread policy for ``workers`` concurrent
    workers (threads and OpenMP's passive wait), and the progress queue."""
    global _progress
    _progress = progress
    from magnet_core.model.threads import apply_thread_policy  # sets threads, then imports torch

    apply_thread_policy(workers=workers)


def _worker_advance(n: int) -> None:
    _progress.put(int(n))


def _run_in_worker(fn: Callable[[Any, Advance], Any], task: Any) -> Any:
    return fn(task, _worker_advance)


def _drain(progress: Any, advance: Advance) -> None:
    while True:
        try:
            n = progress.get_nowait()
        except queue.Empty:
            return
        advance(n)


def run_tasks(fn: Callable[[T, Advance], R], tasks: Sequence[T], workers: int | str = 1,
              advance: Advance | None = None, on_result: Callable[[int, R], None] | None = None,
              label: Callable[[T], str] = str) -> list[R]:
    """``[fn(task, advance) for task in tasks]`` on up to ``workers`` processes, results in task order.

    ``fn`` must be a module-level function (workers import it by name) and tasks and results picklable.
    ``on_result(i, result)`` is called in task order as results become available. A task's exception is raised
    here (after the pool stops; runs not yet started are cancelled), with a note naming the task (``label``)."""
    report = advance or (lambda n: None)
    n_workers = resolve_workers(workers, len(tasks))
    results: list[R] = []
    if n_workers == 1:
        for i, task in enumerate(tasks):
            try:
                result = fn(task, report)
            except Exception as exc:
                exc.add_note(f"while running {label(task)}")
                raise
            results.append(result)
            if on_result is not None:
                on_result(i, result)
        return results

    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    finished: dict[int, R] = {}
    next_out = 0
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress, n_workers)) as pool:
        futures: dict[Future, int] = {pool.submit(_run_in_worker, fn, task): i for i, task in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                _drain(progress, report)
                for future in sorted(done, key=futures.__getitem__):
                    i = futures[future]
                    try:
                        finished[i] = future.result()
                    except BrokenProcessPool as exc:
                        lost = sorted(label(tasks[futures[f]]) for f in pending | {future})
                        raise RuntimeError(f"a worker process died (killed, or out of memory?); runs not finished: "
                                           f"{', '.join(lost)}") from exc
                    except Exception as exc:
                        exc.add_note(f"while running {label(tasks[i])} in a worker process")
                        raise
                while next_out in finished:
                    if on_result is not None:
                        on_result(next_out, finished[next_out])
                    next_out += 1
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    _drain(progress, report)  # the workers have exited: what they reported last is in the queue
    progress.close()
    return [finished[i] for i in range(len(tasks))]
