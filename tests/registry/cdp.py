"""A minimal Chrome DevTools Protocol driver for Debian's headless Chromium.

No browser download and no driver binary: Chromium is started with
`--remote-debugging-port=0`, and we speak CDP over its websocket (the `websockets` package
uvicorn already brings). Enough for the dashboard tests: open tabs, navigate, evaluate
JavaScript, wait for conditions, set a file input, resize, screenshot, and collect console
errors, uncaught exceptions and CSP violations.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process; `tab()` opens pages in it."""

    def __init__(self, executable: str, *, timeout: float = 30) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="fedssl-chromium-"))
        args = [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0",
                "--remote-allow-origins=*", f"--user-data-dir={self.profile}", "--window-size=1280,900", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        url = self._devtools_url(timeout)
        self.ws = connect(url, max_size=64 * 1024 * 1024, open_timeout=timeout).__enter__()  # closed in close()
        self._ids = itertools.count(1)
        self._events: list[dict] = []
        self.tabs: list[Tab] = []

    def _devtools_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1)
        self.close()
        raise CDPError("chromium did not start:\n" + "".join(seen[-30:]))

    # ---------------------------------------------------------------- protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method}: no answer within {timeout}s")
            data = json.loads(self.ws.recv(timeout=left))
            if data.get("id") == msg_id:
                if "error" in data:
                    raise CDPError(f"{method}: {data['error']}")
                return data.get("result", {})
            if "method" in data:
                self._dispatch(data)

    def _dispatch(self, event: dict) -> None:
        for tab in self.tabs:
            if tab.session == event.get("sessionId"):
                tab.on_event(event)

    def pump(self, seconds: float) -> None:
        """Process events for a while (console messages arrive without being asked for)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                data = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                return
            if "method" in data:
                self._dispatch(data)

    def tab(self, width: int = 1280, height: int = 900) -> "Tab":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, target, session)
        self.tabs.append(tab)
        for domain in ("Page", "Runtime", "Log"):
            tab.send(f"{domain}.enable")
        tab.resize(width, height)
        return tab

    def close(self) -> None:
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session
        self.errors: list[str] = []  # console errors, uncaught exceptions, CSP and network failures
        self.loaded = False

    def send(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def on_event(self, event: dict) -> None:
        method, p = event["method"], event.get("params", {})
        if method == "Page.loadEventFired":
            self.loaded = True
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log[{e.get('source')}]: {e.get('text')} {e.get('url', '')}".strip())

    # ---------------------------------------------------------------- actions
    def goto(self, url: str, timeout: float = 30) -> None:
        self.loaded = False
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while not self.loaded:
            if time.monotonic() > deadline:
                raise CDPError(f"{url} did not load within {timeout}s")
            self.browser.pump(0.05)

    def eval(self, expression: str, timeout: float = 60):
        """Evaluate JavaScript in the page (promises are awaited) and return its JSON value."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"{expression[:80]}: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.15):
        """Poll a JavaScript expression until it is truthy; return its value (True for an element)."""
        deadline = time.monotonic() + timeout
        last = None
        probe = f"(() => {{ const v = ({expression}); return v instanceof Node ? true : v; }})()"
        while time.monotonic() < deadline:
            last = self.eval(probe)
            if last:
                return last
            self.browser.pump(interval)
        raise CDPError(f"timed out after {timeout}s waiting for: {expression}\n(last value {last!r}; page errors {self.errors})")

    def text(self, selector: str = "body") -> str:
        return self.eval(f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''")

    def count(self, selector: str) -> int:
        return self.eval(f"document.querySelectorAll({json.dumps(selector)}).length")

    def click(self, selector: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    def type_into(self, selector: str, value: str) -> None:
        self.eval(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.focus(); el.value = {json.dumps(value)}; "
                  "el.dispatchEvent(new Event('input', {bubbles: true})); })()")

    def set_files(self, selector: str, files: list[Path]) -> None:
        """Choose files in an <input type=file> (as a user would) and fire its change event."""
        root = self.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise CDPError(f"no element {selector}")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(f) for f in files]})

    def resize(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            width = self.eval("window.innerWidth")
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": min(size["height"], 6000), "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
