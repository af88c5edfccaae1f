"""The pages in a real headless Chromium against a real agent running real tasks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.integration.conftest import BASE_IMAGE, AgentProcess
from tests.integration.gitserver import GitServer

from .conftest import Web, screenshot

pytestmark = pytest.mark.integration


def wait_for(what: Callable[[], Any], message: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = what()
        except Exception:  # the DOM changes under us while we look
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


def declare(agent: AgentProcess, tasks: dict[str, Any]) -> None:
    agent.declare("tasks.yml", json.dumps({"owner": "alice", "tasks": tasks}))
    agent.efci("reload")


def log_lines(driver: WebDriver) -> list[str]:
    """The text of the log's lines in view, without the fold buttons and line links."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#log .line')].map(line =>
          [...line.childNodes].filter(n => !n.matches || !n.matches('.fold, .ln'))
            .map(n => n.textContent).join(''));
    """)


def span_style(driver: WebDriver, text: str) -> list[str]:
    """Font weight and colour of the log's span holding ``text``, read in one
    go (the viewer redraws its lines as output arrives)."""
    return driver.execute_script("""
        const span = [...document.querySelectorAll('#log span')]
          .find(s => s.textContent === arguments[0]);
        const style = getComputedStyle(span);
        return [style.fontWeight, style.color];
    """, text)


def log_in(driver: WebDriver, web: Web) -> None:
    driver.get(web.login_url())
    wait_for(lambda: driver.current_url.endswith("/runs"), "the login to land on /runs")


# A task whose output shows colours, a \r progress bar and a second of life.
SHOWCASE = ("printf '\\033[1;31mred bold\\033[0m plain '; "
            "printf '\\033[38;2;10;200;30mtruecolour\\033[0m\\n'; "
            "for i in $(seq 0 10 100); do printf '\\rprogress %3d%% [%-10s]' $i "
            "$(head -c $((i/10)) /dev/zero | tr '\\0' '#'); sleep 0.05; done; echo; "
            "echo '::group::details'; echo inside the group; echo '::endgroup::'; "
            "sleep 2; echo finished")


def test_log_in_run_a_task_and_watch_its_log_live(web: Web, browser: WebDriver) -> None:
    agent = web.agent
    declare(agent, {"showcase": {"image": BASE_IMAGE, "command": ["bash", "-c", SHOWCASE]}})
    log_in(browser, web)
    screenshot(browser, "runs-empty")
    browser.get(web.url + "/tasks")
    screenshot(browser, "tasks")
    browser.find_element(By.CSS_SELECTOR, "tr[data-task=showcase] button.run-now").click()
    wait_for(lambda: "/runs/" in browser.current_url, "the run page")
    run_id = int(browser.current_url.rsplit("/", 1)[1])

    # Live: the first line is there while the task still sleeps.
    wait_for(lambda: any("red bold" in line for line in log_lines(browser)), "live output")
    assert json.loads(agent.efci("--json", "show", str(run_id)).stdout)["status"] == "running"
    assert span_style(browser, "red bold") == ["700", "rgb(255, 123, 120)"]  # bold red: bright
    assert span_style(browser, "truecolour") == ["400", "rgb(10, 200, 30)"]
    wait_for(lambda: any("finished" in line for line in log_lines(browser)), "the end")
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "succeeded",
             "success")
    lines = log_lines(browser)
    bars = [line for line in lines if "progress" in line]
    assert bars == ["progress 100% [##########]"], lines  # the redraws collapsed into one
    screenshot(browser, "run")

    # The group folds.
    fold = browser.find_element(By.CSS_SELECTOR, "#log .line.section .fold")
    fold.click()
    wait_for(lambda: not any("inside the group" in line for line in log_lines(browser)),
             "the group to fold")

    # Download raw: the very bytes efci logs --raw prints.
    digest = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer())
          .then(b => crypto.subtle.digest('SHA-256', b))
          .then(d => done([...new Uint8Array(d)]
                          .map(x => x.toString(16).padStart(2, '0')).join('')));
    """, f"/runs/{run_id}/raw")
    raw = agent.efci("logs", "--raw", str(run_id)).stdout
    assert digest == hashlib.sha256(raw).hexdigest()

    browser.get(web.url + "/runs")
    assert browser.find_element(By.CSS_SELECTOR, f"tr[data-run='{run_id}'] .badge").text == \
        "succeeded"
    screenshot(browser, "runs")
    browser.get(web.url + "/images")
    screenshot(browser, "images")


def test_the_runs_page_updates_without_a_reload(web: Web, browser: WebDriver) -> None:
    declare(web.agent, {"quick": {"image": BASE_IMAGE, "command": ["sleep", "1"]}})
    log_in(browser, web)
    run_id = json.loads(web.agent.efci("--json", "run", "quick").stdout)["id"]
    badge = (By.CSS_SELECTOR, f"tr[data-run='{run_id}'] .badge")
    wait_for(lambda: browser.find_element(*badge).text == "succeeded", "the row to turn green")


def test_cancel_a_run_from_its_page(web: Web, browser: WebDriver) -> None:
    declare(web.agent, {"long": {"image": BASE_IMAGE,
                                 "command": ["bash", "-c", "echo started; sleep 300"]}})
    log_in(browser, web)
    run_id = json.loads(web.agent.efci("--json", "run", "long").stdout)["id"]
    browser.get(f"{web.url}/runs/{run_id}")
    wait_for(lambda: any("started" in line for line in log_lines(browser)), "the task to start")
    browser.find_element(By.ID, "cancel-button").click()
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "cancelled",
             "the run to be cancelled")
    shown = json.loads(web.agent.efci("--json", "show", str(run_id)).stdout)
    assert shown["status"] == "cancelled"


def test_keys_create_read_and_delete_with_a_warning(web: Web, browser: WebDriver) -> None:
    agent = web.agent
    log_in(browser, web)
    browser.get(web.url + "/keys")
    form = browser.find_element(By.ID, "key-create")
    form.find_element(By.NAME, "name").send_keys("deploy")
    form.find_element(By.NAME, "owner").send_keys("alice")
    form.find_element(By.TAG_NAME, "button").click()
    section = wait_for(lambda: browser.find_element(By.CSS_SELECTOR,
                                                    "section[data-key='alice/deploy']"), "the key")
    shown = json.loads(agent.efci("--json", "key", "show", "deploy", "--owner", "alice").stdout)
    assert section.find_element(By.CSS_SELECTOR, "pre.public-key").text == shown["public_key"]
    assert "PRIVATE" not in browser.page_source
    screenshot(browser, "keys")

    declare(agent, {"uses-key": {"image": BASE_IMAGE, "command": ["true"], "checkout": {
        "repositories": [{"repo_url": "ssh://git@127.0.0.1:2222/site.git", "revision": "main",
                          "mutable": True, "key": "deploy", "submodules": False}]}}})
    browser.get(web.url + "/keys")
    browser.find_element(By.CSS_SELECTOR, "section[data-key='alice/deploy'] .delete-key").click()
    warning = wait_for(lambda: browser.find_element(By.ID, "delete-warning"), "the warning")
    assert "uses-key" in warning.text
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#key-users li")] == \
        ["uses-key"]
    screenshot(browser, "key-delete-warning")
    browser.find_element(By.ID, "confirm-delete").click()
    wait_for(lambda: browser.current_url.endswith("/keys"), "back to the keys")
    assert not browser.find_elements(By.CSS_SELECTOR, "section[data-key='alice/deploy']")
    assert agent.efci("key", "show", "deploy", "--owner", "alice", check=False).returncode != 0


HOSTILE = (
    "printf '<script>alert(1)</script>\\n'; "
    "printf '\"><img src=x onerror=alert(1)>\\n'; "
    "printf '\\033]8;;javascript:alert(1)\\033\\\\click me\\033]8;;\\033\\\\\\n'; "
    "printf '\\033]8;;https://example.org/ok\\033\\\\safe link\\033]8;;\\033\\\\\\n'; "
    "printf '\\033['; head -c 1048576 /dev/zero | tr '\\0' ';'; printf 'mafter the params\\n'"
)


def test_hostile_log_renders_as_inert_text(web: Web, browser: WebDriver) -> None:
    agent = web.agent
    declare(agent, {"hostile": {"image": BASE_IMAGE, "command": ["bash", "-c", HOSTILE]}})
    run_id = json.loads(agent.efci("--json", "run", "hostile").stdout)["id"]
    wait_for(lambda: json.loads(agent.efci("--json", "show", str(run_id)).stdout)["status"]
             == "succeeded", "the run")
    log_in(browser, web)
    started = time.monotonic()
    browser.get(f"{web.url}/runs/{run_id}")
    wait_for(lambda: any("after the params" in line for line in log_lines(browser)),
             "the whole log", timeout=30)
    took = time.monotonic() - started
    lines = log_lines(browser)
    assert "<script>alert(1)</script>" in lines
    assert "\"><img src=x onerror=alert(1)>" in lines
    assert browser.find_elements(By.CSS_SELECTOR, "#log img, #log script") == []
    links = browser.find_elements(By.CSS_SELECTOR, "#log a:not(.ln)")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/ok"]
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it raises when there is none
    screenshot(browser, "hostile-log")
    print(f"hostile log, 1 MiB of CSI parameters included, shown in {took:.2f} s")


def test_trust_a_git_servers_host_key_after_seeing_its_fingerprint(
        web: Web, browser: WebDriver, tmp_path: Path) -> None:
    server = GitServer(tmp_path / "git")
    server.start()
    try:
        log_in(browser, web)
        browser.get(web.url + "/keys")
        form = browser.find_element(By.CSS_SELECTOR, "form[action='/keys/scan']")
        form.find_element(By.NAME, "host").send_keys(server.address)
        port = form.find_element(By.NAME, "port")
        port.clear()
        port.send_keys(str(server.port))
        form.find_element(By.NAME, "owner").send_keys("alice")
        form.find_element(By.TAG_NAME, "button").click()
        shown = wait_for(lambda: browser.find_element(By.ID, "fingerprints").text, "fingerprints")
        expected = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f",
                                   str(server.host_key) + ".pub"],
                                  capture_output=True, check=True, text=True).stdout.split()[1]
        assert expected in shown
        known = web.agent.root / "secrets/git-ssh/alice/known_hosts"
        assert not known.exists() or str(server.port) not in known.read_text()  # not yet
        screenshot(browser, "key-trust")
        browser.find_element(By.ID, "confirm-trust").click()
        wait_for(lambda: browser.current_url.endswith("/keys"), "back to the keys")
        assert f"[{server.address}]:{server.port}" in known.read_text()
    finally:
        server.stop()


def test_build_an_image_from_its_page(web: Web, browser: WebDriver) -> None:
    agent = web.agent
    agent.declare("images.yml", json.dumps({"images": {"tiny": {
        "inline": f"FROM {BASE_IMAGE}\nRUN echo built-by-the-page > /built\n"}}}))
    agent.efci("reload")
    log_in(browser, web)
    browser.get(web.url + "/images")
    browser.find_element(By.CSS_SELECTOR, "form[action='/images/tiny/build'] button").click()
    wait_for(lambda: "/runs/" in browser.current_url, "the build's run page")
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "succeeded",
             "the build", timeout=180)
    images = json.loads(agent.efci("--json", "images").stdout)
    assert [(i["name"], i["built"]) for i in images] == [("tiny", True)]
    subprocess.run(["docker", "rmi", "-f", images[0]["tag"]], capture_output=True, check=False)


def test_a_long_followed_log_keeps_the_tab_bounded(web: Web, browser: WebDriver) -> None:
    """260,000 lines followed live: the tab keeps at most 200,000, the end in
    view, and gives the oldest back on request."""
    agent = web.agent
    declare(agent, {"long": {"image": BASE_IMAGE,
                             "command": ["bash", "-c", "sleep 2; seq 1 260000"]}})
    log_in(browser, web)
    run_id = json.loads(agent.efci("--json", "run", "long").stdout)["id"]
    browser.get(f"{web.url}/runs/{run_id}")
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "succeeded",
             "the run", timeout=120)
    wait_for(lambda: "260000" in log_lines(browser), "the last line in view", timeout=60)
    kept = browser.execute_script("return window.efciLog.lines.length")
    assert 150_000 < kept <= 200_000
    first = int(browser.execute_script("return window.efciLog.lines[0].text"))
    assert first > 1
    for _ in range(2):
        browser.execute_script("window.efciLog.box.scrollTop = 0")
        browser.find_element(By.CSS_SELECTOR, "button.log-earlier").click()
        wait_for(lambda: int(browser.execute_script("return window.efciLog.lines[0].text"))
                 < first, "earlier lines")  # noqa: B023 - read now, in this iteration
        first = int(browser.execute_script("return window.efciLog.lines[0].text"))
    texts = browser.execute_script("return window.efciLog.lines.slice(0, 30000).map(l => l.text)")
    numbers = [int(t) for t in texts if t.isdigit()]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # none lost, none twice


def test_the_caches_page_shows_usage_and_sets_a_quota(web: Web, browser: WebDriver,
                                                      tmp_path: Path) -> None:
    make_cache_fs = Path(__file__).resolve().parents[2] / "scripts/make-cache-fs"
    root = tmp_path / "cachefs/caches"
    subprocess.run([str(make_cache_fs), "512M", str(root)], check=True, capture_output=True)
    agent = web.agent
    try:
        agent.stop()
        web.configure(f"paths:\n  caches: {root}\n")
        agent.start()
        agent.declare("cached.yml", json.dumps({"owner": "alice", "tasks": {"cached": {
            "image": BASE_IMAGE, "network": "none", "command": [
                "sh", "-c", "head -c 3000000 /dev/urandom > /c/blob"],
            "caches": [{"name": "deps", "path": "/c", "quota": "64MiB"}]}}}))
        agent.efci("reload")
        agent.efci("run", "--follow", "cached")
        log_in(browser, web)
        browser.get(web.url + "/caches")
        row = browser.find_element(By.CSS_SELECTOR, "tr[data-cache='alice/deps']")
        assert "64.0 MiB" in row.text and "2.9 MiB" in row.text and "cached" in row.text
        screenshot(browser, "caches")
        row.find_element(By.NAME, "quota").send_keys("128MiB")
        row.find_element(By.CSS_SELECTOR, "button").click()
        wait_for(lambda: "128.0 MiB" in browser.find_element(
            By.CSS_SELECTOR, "tr[data-cache='alice/deps']").text, "the new quota")
        listed = json.loads(agent.efci("--json", "cache", "ls").stdout)["caches"]
        assert listed[0]["quota"] == 128 << 20 and listed[0]["quota_from"] == \
            "efci cache set-quota"
    finally:
        agent.cleanup()
        subprocess.run([str(make_cache_fs), "--remove", str(root)], capture_output=True,
                       check=False)


def test_a_pipelines_stages_are_on_its_page_and_folded_in_its_log(
        web: Web, browser: WebDriver) -> None:
    """The run page lists each stage (status, exit code, container), and the
    log holds a foldable section per stage."""
    declare(web.agent, {"pipe": {"image": BASE_IMAGE, "command": ["false"], "stages": [
        {"name": "build", "command": ["sh", "-c", "echo building; exit 4"],
         "allow_failure": True},
        {"name": "test", "command": ["sh", "-c", "echo testing; exit 2"]},
        {"name": "publish", "command": ["echo", "publishing"]}]}})
    run_id = json.loads(web.agent.efci("--json", "run", "pipe").stdout)["id"]
    wait_for(lambda: json.loads(web.agent.efci("--json", "show", str(run_id)).stdout)[
        "status"] == "failed", "the pipeline to end", timeout=120)
    log_in(browser, web)
    browser.get(f"{web.url}/runs/{run_id}")
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "failed", "the status")
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, "#run-stages tbody tr")]
    container = f"efci-{web.agent.instance()}-{run_id}"
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("build", "failed", "4", f"{container}-build"),
        ("test", "failed", "2", f"{container}-test"),
        ("publish", "skipped", "", "")]
    assert rows[2][5] == "stage test failed"
    wait_for(lambda: any("testing" in line for line in log_lines(browser)), "the log")
    screenshot(browser, "pipeline")
    # Each stage's section holds the task's own (nested) section.
    sections = {s.text.lstrip("▾").split(":")[0]: s
                for s in browser.find_elements(By.CSS_SELECTOR, "#log .line.section")
                if "stage " in s.text}
    assert list(sections) == ["stage build (1 of 3)", "stage test (2 of 3)"], list(sections)
    sections["stage test (2 of 3)"].find_element(By.CSS_SELECTOR, ".fold").click()
    wait_for(lambda: not any("testing" in line for line in log_lines(browser)),
             "stage test to fold")
    assert any("building" in line for line in log_lines(browser))
