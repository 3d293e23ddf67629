"""Open a report in headless Chromium (DevTools protocol), screenshot it, and fail on external requests or errors.

    python -m simulations.browser_check runs/demo/report.html [--shots DIR] [--chromium PATH]

Needs Chromium (Debian: ``apt-get install -y chromium``) and aiohttp (installed with torch-geometric). Exit code 0
when the page loaded, made no request other than ``file:`` and ``data:``, logged no console error or exception,
and every image decoded; 1 otherwise (the problems are printed); 2 when Chromium is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-default-apps", "--mute-audio", "--hide-scrollbars")
LOCAL_SCHEMES = ("file:", "data:", "about:", "chrome-error:", "devtools:")
# What the page's DOM must show, checked in the browser after load: section ids of the coordinator's and the
# site's view.
REPORT_SECTIONS = ("configuration", "rounds", "sites", "privacy", "model")
SITE_SECTIONS = ("site-overview", "site-messages", "site-coordinator")


@dataclasses.dataclass
class PageCheck:
    """What the browser saw."""

    requests: list[str] = dataclasses.field(default_factory=list)
    external: list[str] = dataclasses.field(default_factory=list)
    console_errors: list[str] = dataclasses.field(default_factory=list)
    sections: list[str] = dataclasses.field(default_factory=list)
    broken_images: list[str] = dataclasses.field(default_factory=list)
    images: int = 0
    title: str = ""
    screenshots: list[str] = dataclasses.field(default_factory=list)

    def problems(self, want_sections: tuple[str, ...]) -> list[str]:
        out = [f"external request: {u}" for u in self.external]
        out += [f"console error: {e}" for e in self.console_errors]
        out += [f"image did not decode: {s[:80]}" for s in self.broken_images]
        out += [f"section #{s} missing" for s in want_sections if s not in self.sections]
        return out


def find_chromium(explicit: str | None = None) -> str | None:
    for name in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name) or (name if Path(name).is_file() else None)):
            return path
    return None


class DevTools:
    """A minimal DevTools-protocol client over one websocket (flattened sessions)."""

    def __init__(self, ws):
        self.ws, self._id, self._pending, self.events = ws, 0, {}, []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 30.0) -> dict:
        self._id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._id] = fut
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self) -> None:
        self._reader.cancel()

    async def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events:
                if e.get("method") == method:
                    return e
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no {method} within {timeout} s")


async def _check(ws_url: str, page_url: str, shots: Path, stem: str, width: int, settle: float) -> PageCheck:
    import base64

    import aiohttp

    result = PageCheck()
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        dt = DevTools(ws)
        target = await dt.send("Target.createTarget", {"url": "about:blank"})
        sid = (await dt.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}))["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            await dt.send(f"{domain}.enable", session=sid)
        await dt.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        dt.events.clear()
        await dt.send("Page.navigate", {"url": page_url}, session=sid)
        await dt.wait_for("Page.loadEventFired", timeout=60)
        await asyncio.sleep(settle)  # late requests (fonts, lazy images) would show up here
        evaluated = await dt.send("Runtime.evaluate", {"returnByValue": True, "expression": """({
            title: document.title,
            sections: [...document.querySelectorAll('section[id]')].map(s => s.id),
            images: [...document.images].map(i => ({src: i.src.slice(0, 100), ok: i.complete && i.naturalWidth > 0})),
        })"""}, session=sid)
        info = evaluated["result"]["value"]
        result.title, result.sections = info["title"], info["sections"]
        result.images = len(info["images"])
        result.broken_images = [i["src"] for i in info["images"] if not i["ok"]]
        shots.mkdir(parents=True, exist_ok=True)
        shot = await dt.send("Page.captureScreenshot", {"format": "png"}, session=sid)
        (shots / f"{stem}-top.png").write_bytes(base64.b64decode(shot["data"]))
        metrics = await dt.send("Page.getLayoutMetrics", session=sid)
        height = int(min(metrics["cssContentSize"]["height"], 16000))
        await dt.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        shot = await dt.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                             session=sid)
        (shots / f"{stem}-full.png").write_bytes(base64.b64decode(shot["data"]))
        result.screenshots = [str(shots / f"{stem}-top.png"), str(shots / f"{stem}-full.png")]
        for e in dt.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                result.requests.append(url)
                if not url.startswith(LOCAL_SCHEMES):
                    result.external.append(url)
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                result.console_errors.append(f"loading failed: {params.get('errorText')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                      for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                result.console_errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                result.console_errors.append(f"{params['entry'].get('source')}: {params['entry'].get('text')}")
        dt.close()
    return result


def check_page(html: Path, shots: Path, chromium: str, width: int = 1280, settle: float = 1.0) -> PageCheck:
    """Load ``html`` in a fresh headless Chromium profile and report what happened."""
    html = html.resolve()
    with tempfile.TemporaryDirectory(prefix="magnet-fl-chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
               "--remote-debugging-address=127.0.0.1", "about:blank"]
        log = Path(profile) / "chromium-stderr.log"
        with log.open("w") as err:  # a file, not a pipe: a chatty browser never blocks on a full pipe
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            end = time.monotonic() + 60
            while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"Chromium did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
            port, path = port_file.read_text().splitlines()[:2]
            stem = f"{html.parent.name}-{html.stem}"
            return asyncio.run(_check(f"ws://127.0.0.1:{port}{path}", html.as_uri(), shots, stem, width, settle))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.browser_check", description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path, nargs="+", help="report HTML file(s)")
    p.add_argument("--shots", type=Path, default=None, help="screenshot folder (default: next to each report)")
    p.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH or $CHROMIUM)")
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("Chromium not found: install it (Debian: apt-get install -y chromium) or pass --chromium PATH",
              file=sys.stderr)
        return 2
    failed = False
    for html in args.html:
        if not html.is_file():
            print(f"{html}: no such file", file=sys.stderr)
            failed = True
            continue
        text = html.read_text(errors="replace")
        want = SITE_SECTIONS if 'id="site-overview"' in text else REPORT_SECTIONS
        res = check_page(html, args.shots or html.parent / "screenshots", chromium, args.width)
        problems = res.problems(want)
        print(f"{html}: {res.title!r}, {len(res.requests)} request(s) ({len(res.external)} external), "
              f"{res.images} image(s), {len(res.console_errors)} console error(s), sections {res.sections}")
        print("  screenshots: " + ", ".join(res.screenshots))
        for problem in problems:
            print(f"  FAIL {problem}")
        failed |= bool(problems)
    print("browser check: " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
