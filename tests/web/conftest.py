"""The web page against a real agent, in a real headless Chromium.

Screenshots of each page are saved under $EFCI_ARTIFACTS/screenshots
(default: artifacts/screenshots at the top of the checkout); CI keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import AgentProcess, agent, prerequisites  # noqa: F401 - fixtures

ARTIFACTS = Path(os.environ.get("EFCI_ARTIFACTS")
                 or Path(__file__).resolve().parents[2] / "artifacts")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Web:
    """An agent and ``efci web`` beside it on a free port."""

    def __init__(self, process: AgentProcess) -> None:
        self.agent = process
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = process.root / "web.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, extra: str = "") -> None:
        self.agent.configure(f"web:\n  listen: 127.0.0.1:{self.port}\n{extra}")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "--root", str(self.agent.root), "web"],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("efci web exited:\n" + self.log.read_text())
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port)), self.agent.client() as c:
                if c.call("status")["web"]:
                    return
            time.sleep(0.1)
        raise AssertionError("efci web did not come up:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def login_url(self) -> str:
        return self.agent.efci("web-login").stdout.decode().strip()

    def token(self) -> str:
        return self.login_url().partition("#")[2]


@pytest.fixture
def web(agent: AgentProcess) -> Iterator[Web]:  # noqa: F811 - the fixture imported above
    w = Web(agent)
    w.configure()
    agent.start()
    w.start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def browser() -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("the browser tests need chromium and chromium-driver: run scripts/setup-host")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: object, name: str) -> None:
    (ARTIFACTS / "screenshots").mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "screenshots" / f"{name}.png"))  # type: ignore[attr-defined]
