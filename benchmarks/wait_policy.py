"""Does OMP_WAIT_POLICY=PASSIVE work when set after ``import torch``? CPU and wall time of intermittent 2-thread
work (300 x: a 256 x 256 matmul and a reduction, then 2 ms of serial Python) with the variable unset, set after,
set before."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import os, resource, sys, time
if sys.argv[1] == "before":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
import torch
if sys.argv[1] == "after":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
torch.set_num_threads(2)
x = torch.randn(256, 256)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
torch.mm(x, x)
t0, c0 = time.perf_counter(), cpu()
for _ in range(300):
    torch.mm(x, x)
    (x * 2).sum()
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
print(f"{time.perf_counter() - t0:.2f} {cpu() - c0:.2f}")
"""


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for mode in ("unset", "after", "before"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
        wall, cpu = out.stdout.split()
        print(f"OMP_WAIT_POLICY=PASSIVE {mode:>6} import torch: wall {wall} s, CPU {cpu} s")


if __name__ == "__main__":
    main()
