"""Every use of Flower's internals in magnet-fl, in one place, for the one Flower series it was written against.

magnet-fl's apps use Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, ``flwr.simulation``,
``flwr.common``). Deployment and the simulation engines also need what Flower 1.41 does not expose: its SuperLink
and SuperNode entry points, their polling loops, the SuperExec's process start, the SuperNode's app-bundle (FAB)
step, the simulation's run setup. Those uses live only here (``tests/test_boundaries.py`` checks it):

* ``flower_compat.superlink``  the SuperLink application built from Flower's own flags (coordinator side);
* ``flower_compat.supernode``  the SuperNode and SuperExec entry points with magnet-fl's hooks (site side);
* ``flower_compat.simulation`` the simulation engine's run setup and task identity (simulations).

Importing this package (and so any of them) checks the installed Flower first, from its package metadata without
importing it: another series than ``KNOWN_SERIES`` stops with :class:`FlowerVersionError` naming both versions,
before any internal is touched. This package itself imports no Flower module (command-line tools read its
constants cheaply).
"""

from __future__ import annotations

from importlib import metadata

KNOWN_SERIES = (1, 41)  # Flower 1.41.x: the internals in this package were read in its source
# Every Flower process magnet-fl starts: no telemetry, no dependency installation at run time (Flower's variables)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
FLOWER_IDLE_PULL = 3.0  # seconds Flower 1.41's SuperNode sleeps after every empty pull (no option)


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the series whose internals this module knows."""


def check_flower_version(version: str) -> str:
    """``version`` if it belongs to ``KNOWN_SERIES``, else FlowerVersionError with what to do."""
    try:
        series = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        series = ()
    if series != KNOWN_SERIES:
        known = ".".join(map(str, KNOWN_SERIES))
        raise FlowerVersionError(
            f"magnet-fl's deployment and simulation code uses Flower internals it knows only in Flower {known}.x, "
            f"but Flower {version} is installed: install flwr=={known}.0 (the version pyproject.toml pins), or "
            f"port flower_compat/ to Flower {version} (every internal magnet-fl uses is there)")
    return version


FLOWER_VERSION = check_flower_version(metadata.version("flwr"))
