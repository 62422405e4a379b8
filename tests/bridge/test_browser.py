"""The spec's WebSocket snippet, unchanged but for the port, in a real headless Chromium.

The page is served over HTTP by the test (a page from a file:// URL has the origin
"null", which no bridge should trust) from an origin named in api.allowed_origins; the
bridge opts into auth none, so the snippet needs no token, as the spec writes it.
"""
from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from functools import partial

import pytest

from ..support.wait import wait_until
from .conftest import submit_sleep
from .stack import curl

SPEC_SNIPPET = """
// Connect to WebSocket for live updates
const ws = new WebSocket('ws://localhost:8080/websocket');

ws.onmessage = (event) => {
  const update = JSON.parse(event.data);
  console.log(`Job ${update.job_id}: ${update.status} - ${update.progress}%`);
};
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_the_specs_snippet_sees_progress_in_chromium(start_bridge, system_bus, service_dir):
    site = service_dir / "site"
    site.mkdir()
    pages = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(site)))
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://localhost:{pages.server_address[1]}"
    bridge = start_bridge(api={"auth": "none", "allowed_origins": [origin]})
    script = SPEC_SNIPPET.replace("localhost:8080", f"localhost:{bridge.port}")
    (site / "snippet.html").write_text(f"<html><body><script>{script}</script></body></html>")
    browser = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={service_dir / 'profile'}",
         f"{origin}/snippet.html"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        def connected() -> bool:
            assert browser.poll() is None, "the browser exited"
            return "hypersdk_bridge_websocket_clients 1" in curl(bridge, "/metrics").body
        wait_until(connected, 30, "the browser's WebSocket connection")
        job_id = submit_sleep(system_bus.address, steps=10, interval=0.1, step_bytes=1000)
        lines = []
        for line in browser.stderr:
            if "CONSOLE" in line and job_id in line:
                lines.append(line.split('"')[1])
                if lines[-1] == f"Job {job_id}: completed - 100%":
                    break
    finally:
        browser.terminate()
        browser.wait(timeout=10)
        pages.shutdown()
        pages.server_close()
    assert lines[0] == f"Job {job_id}: pending - 0%"
    running = [float(line.split(" - ")[1].rstrip("%")) for line in lines if ": running - " in line]
    assert any(0 < value < 100 for value in running), lines
