"""flower_compat: the one place that uses Flower internals checks the Flower series it knows before touching any."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flower_compat import KNOWN_SERIES, FlowerVersionError, check_flower_version


def test_the_known_series_passes_and_any_other_is_refused_naming_both():
    known = ".".join(map(str, KNOWN_SERIES))
    assert check_flower_version(f"{known}.0") == f"{known}.0"
    assert check_flower_version(f"{known}.7rc1") == f"{known}.7rc1"
    for other in ("1.42.0", "1.40.2", "2.41.0", "nightly"):
        with pytest.raises(FlowerVersionError) as err:
            check_flower_version(other)
        assert f"Flower {known}.x" in str(err.value) and f"Flower {other} is installed" in str(err.value)
        assert f"flwr=={known}.0" in str(err.value)


@pytest.mark.parametrize("module", ["flower_compat.supernode", "flower_compat.superlink", "flower_compat.simulation"])
def test_importing_any_part_under_another_flower_stops_before_an_internal_is_imported(module):
    """With Flower's metadata saying 1.42.0, each part stops with the version message, and no Flower internal
    (here: any flwr module at all) was imported first."""
    code = f"""
import sys
from importlib import metadata
metadata.version = lambda name: "1.42.0" if name == "flwr" else metadata.distribution(name).version
try:
    import {module}
except Exception as exc:
    print(type(exc).__name__, exc)
print("flwr modules imported:", sorted(m for m in sys.modules if m.split(".")[0] == "flwr"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("FlowerVersionError") and "Flower 1.42.0 is installed" in out.stdout
    assert "flwr modules imported: []" in out.stdout
