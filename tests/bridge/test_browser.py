"""The spec's WebSocket snippet, unchanged but for the port, in a real headless Chromium."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

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
def test_the_specs_snippet_sees_progress_in_chromium(bridge, system_bus, service_dir):
    page = service_dir / "snippet.html"
    script = SPEC_SNIPPET.replace("localhost:8080", f"localhost:{bridge.port}")
    page.write_text(f"<html><body><script>{script}</script></body></html>")
    browser = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={service_dir / 'profile'}",
         page.as_uri()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while "hypersdk_bridge_websocket_clients 1" not in curl(bridge, "/metrics").body:
            assert time.monotonic() < deadline and browser.poll() is None, "no connection"
            time.sleep(0.1)
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
    assert lines[0] == f"Job {job_id}: pending - 0%"
    running = [float(line.split(" - ")[1].rstrip("%")) for line in lines if ": running - " in line]
    assert any(0 < value < 100 for value in running), lines
