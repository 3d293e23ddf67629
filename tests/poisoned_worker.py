"""A site worker whose site sends a poisoned update (deployment tests only): ``python tests/poisoned_worker.py
--poison SITE=MODE <magnet-fl site-worker arguments>``. It is the real `magnet-fl site-worker` with the site's
training wrapped by tests/poisoned_site.py; production code has no poisoning hook."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's code, and poisoned_site beside this file

from poisoned_site import poisoned_fit  # noqa: E402

from client import worker  # noqa: E402
from magnet_core.model.site import SiteRuntime  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--poison", action="append", required=True, metavar="SITE=MODE")
    worker.add_arguments(p)
    args = p.parse_args(argv)
    SiteRuntime.fit = poisoned_fit(dict(item.split("=", 1) for item in args.poison))
    return worker.run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
