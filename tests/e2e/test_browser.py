"""A real browser (headless Chromium) on a page from another origin sends
events with fetch (keepalive, CORS preflight) and navigator.sendBeacon,
including one on pagehide; they land in the lake."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from estat.codec import decode
from tests.conftest import EstatProcess

pytestmark = pytest.mark.e2e

PAGE = """<!doctype html>
<html><body><p id="out">waiting</p>
<script>
const API = "http://127.0.0.1:%(port)d/api/v1/analytics/events";
const batch = (id) => JSON.stringify({anonymousId: "browser-1",
  events: [{eventId: id, eventName: "ui.page.viewed", properties: {via: id}}]});
fetch(API, {method: "POST", keepalive: true, headers: {"Content-Type": "application/json"},
            body: batch("fetch-keepalive")})
  .then(r => r.json()).then(j => { document.getElementById("out").textContent = JSON.stringify(j); });
navigator.sendBeacon(API, batch("beacon"));
navigator.sendBeacon("http://127.0.0.1:%(port)d/collect", "collect-beacon");
window.addEventListener("pagehide", () => navigator.sendBeacon(API, batch("pagehide")));
setTimeout(() => { location.href = "/next.html"; }, 1000);
</script></body></html>
"""


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


def test_fetch_and_beacons_from_another_origin(estat_factory: Any, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("chromium is not installed (make test installs it)")
    p: EstatProcess = estat_factory({"FLUSH_INTERVAL": "1h"})
    p.start()
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(PAGE % {"port": p.port})
    (site / "next.html").write_text("<!doctype html><p>next</p>")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--timeout=3000",
                "--dump-dom",
                page,
            ],
            capture_output=True,
            timeout=90,
            check=False,
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    time.sleep(1.0)  # beacons sent during page unload may still be in flight
    assert p.stop() == 0
    lake = tmp_path / "data" / "lake"
    events = {
        r["event_id"]: r
        for f in (lake / "events").rglob("*.jsonl.gz")
        for r in decode(f.read_bytes())
    }
    assert {"fetch-keepalive", "beacon", "pagehide"} <= set(events)
    assert events["beacon"]["properties"] == {"via": "beacon", "source": "CLIENT"}
    assert "HeadlessChrome" in events["fetch-keepalive"]["user_agent"]
    bodies = [r["body"] for f in (lake / "raw").rglob("*.jsonl.gz") for r in decode(f.read_bytes())]
    assert bodies == ["collect-beacon"]
