"""The dashboard page in headless Chromium, driven over the DevTools protocol.

Chromium is started with a fresh profile and ``--remote-debugging-port=0``;
the test reads the port it picked from ``DevToolsActivePort`` and talks CDP
over a websocket (the ``websockets`` test dependency), so no WebDriver is
needed. Every host resolves to nothing except 127.0.0.1, so the browser can
reach only the gateway's admin listener.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import backend_command, port_open, wait_for

pytestmark = pytest.mark.timeout(90)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium process and one page, spoken to over CDP."""

    def __init__(self, executable: str, profile: Path):
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--disable-domain-reliability",
                "--disable-breakpad",
                "--no-pings",
                # Every name and address resolves to nothing except our
                # loopback listener's.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1280,720",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        active = profile / "DevToolsActivePort"
        wait_for(
            lambda: (
                (active.exists() and len(active.read_text().split()) == 2)
                or self.process.poll() is not None
            ),
            timeout=30,
        )
        assert self.process.poll() is None, "chromium exited at startup"
        port, path = active.read_text().split()
        # Our own loopback socket: no proxy settings from the environment
        # can send this connection anywhere else.
        sock = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(
            connect(f"ws://127.0.0.1:{port}{path}", sock=sock, max_size=None)
        )
        self.ids = itertools.count(1)
        target = self.send("Target.createTarget", {"url": "about:blank"})
        attached = self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self.session = attached["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)

    def send(self, method: str, params: dict | None = None, session=False) -> dict:
        message = {"id": next(self.ids), "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + 30
        while True:
            reply = json.loads(
                self.ws.recv(timeout=max(deadline - time.monotonic(), 0))
            )
            if reply.get("id") == message["id"]:
                assert "error" not in reply, reply
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 15):
        return wait_for(lambda: self.evaluate(expression), timeout=timeout)

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {
                    "type": kind,
                    "x": box[0],
                    "y": box[1],
                    "button": "left",
                    "clickCount": 1,
                },
                session=True,
            )

    def type_text(self, text: str) -> None:
        self.send("Input.insertText", {"text": text}, session=True)

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(
            self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def close(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            self.send("Browser.close")
        except (ConnectionClosed, OSError, TimeoutError):
            # The browser drops the connection as it exits.
            pass
        try:
            self.stack.close()
        finally:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def browser(tmp_path):
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "chromium is not installed (Debian: apt-get install chromium "
            "chromium-driver); the dashboard test needs a headless browser"
        )
    instance = Browser(executable, tmp_path / "profile")
    yield instance
    instance.close()


def rows_js() -> str:
    return (
        "Object.fromEntries([...document.querySelectorAll('tr[data-service]')]"
        ".map(r => [r.dataset.service, r.dataset.status]))"
    )


def test_dashboard_live_table_start_stop_and_token(gateway, ports, tmp_path, browser):
    app_port, worker_port, static_port, admin_port = (ports() for _ in range(4))
    gw = gateway(
        f"""
        listen: {{listen}}
        admin:
          listen: 127.0.0.1:{admin_port}
          token: s3cret
        services:
          app:
            upstream: http://127.0.0.1:{app_port}
            run: {backend_command(app_port, "--boot-delay 1")}
            idle_timeout: 5m
          worker:
            upstream: http://127.0.0.1:{worker_port}
            run: {backend_command(worker_port, "--boot-delay 0.2")}
            idle_timeout: 5m
          static:
            upstream: http://127.0.0.1:{static_port}
            proxy_only: true
        """,
        backend_ports=[app_port, worker_port],
    )
    wait_for(lambda: port_open(admin_port))
    # refresh=0: no periodic re-read, so every change below comes from events.
    url = f"http://127.0.0.1:{admin_port}/?refresh=0"
    browser.send("Page.navigate", {"url": url}, session=True)

    # No token yet: the API answers 401 and the page asks for one.
    browser.wait(
        "(() => { const f = document.getElementById('auth');"
        " return f !== null && !f.hidden; })()"
    )
    browser.evaluate("document.getElementById('token').focus()")
    browser.type_text("s3cret")
    browser.click("#auth button")
    browser.wait("document.body.dataset.stream === 'live'")
    browser.wait(
        f"(() => {{ const r = {rows_js()}; return r.app === 'offline' && "
        "r.worker === 'offline' && r.static === 'online'; })()"
    )
    assert browser.evaluate("sessionStorage.getItem('dynapm.token')") == "s3cret"
    assert browser.evaluate("document.getElementById('auth').hidden")
    names = browser.evaluate(
        "[...document.querySelectorAll('tr[data-service] td.name')]"
        ".map(t => t.textContent)"
    )
    assert sorted(names) == ["app", "static", "worker"]
    assert browser.evaluate(
        "document.querySelector('tr[data-service=static] button.start').hidden"
    )

    # Record every status the app row shows, and mark the document: a reload
    # would lose the mark.
    browser.evaluate(
        """(() => {
          window.__mark = 'no reload';
          const row = document.querySelector('tr[data-service=app]');
          window.__seen = [row.dataset.status];
          const note = (s) => {
            if (window.__seen[window.__seen.length - 1] !== s) window.__seen.push(s);
          };
          // Records carry each old value, so two changes in one task (a
          // quick stop) are both seen.
          new MutationObserver((records) => {
            records.forEach((r) => note(r.oldValue));
            note(row.dataset.status);
          }).observe(row, {
            attributes: true, attributeOldValue: true, attributeFilter: ['data-status'],
          });
          return true;
        })()"""
    )
    browser.click("tr[data-service=app] button.start")
    browser.wait(f"{rows_js()}.app === 'online'", timeout=20)
    # "starting" can only come from the event stream: the start request
    # itself answers once the service is online.
    assert browser.evaluate("window.__seen") == ["offline", "starting", "online"]
    assert browser.evaluate("window.__mark") == "no reload"
    assert port_open(app_port)
    browser.wait(
        "document.querySelector('tr[data-service=app] td.starts').textContent === '1'"
    )
    cold = browser.evaluate(
        "document.querySelector('tr[data-service=app] td.cold-start').textContent"
    )
    assert cold.endswith("ms") or cold.endswith(" s"), cold

    # A change made elsewhere (the API, not the page) shows up too.
    status, _, _ = gw.request(
        None,
        method="POST",
        path="/api/services/worker/start",
        headers={"Host": f"127.0.0.1:{admin_port}", "Authorization": "Bearer s3cret"},
        port=admin_port,
    )
    assert status == 200
    browser.wait(f"{rows_js()}.worker === 'online'")

    browser.click("tr[data-service=app] button.stop")
    browser.wait(f"{rows_js()}.app === 'offline'", timeout=20)
    assert browser.evaluate("window.__seen")[-2:] == ["stopping", "offline"]
    assert not port_open(app_port)
    assert browser.evaluate("window.__mark") == "no reload"

    # The token was asked once: a new page load uses the one in session
    # storage. Counters without state events are re-read every second here.
    browser.send("Page.navigate", {"url": url.replace("=0", "=1")}, session=True)
    browser.wait(
        "window.__mark === undefined && document.body !== null &&"
        " document.body.dataset.stream === 'live'"
    )
    browser.wait(f"{rows_js()}.worker === 'online'")
    assert browser.evaluate("document.getElementById('auth').hidden")
    gw.echo("worker")
    browser.wait(
        "document.querySelector('tr[data-service=worker] td.last-request')"
        ".textContent.endsWith('ago')"
    )

    shot = browser.screenshot(ARTIFACTS / "dashboard.png")
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 5000
