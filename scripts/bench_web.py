"""scripts/bench web: the page's renderer and log viewer in headless Chromium.

renderer   bytes per second through the project's terminal (agent/web/static/
           terminal.mjs) on a mixed 10 MB and a 100 MB log, against ansi_up (the
           popular renderer, installed from npm into a temporary directory for the
           bench only), both in the same Chromium, both keeping their output.
progress   a 10 MB stream of `\\r` progress frames: ours collapses it to one line.
first paint  a run whose log is 100 MB: from navigating to its page to its tail's
           first lines in the DOM, against `tail -n 5000` of the same bytes in a file.
latency    a byte printed in a container to its line in the page's DOM, against
           `efci logs --follow` receiving it, on the same run.
"""

from __future__ import annotations

import functools
import http.server
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
STATIC = HERE / "agent/web/static"
PORT = 18479
MB = 1_000_000
HUNDRED_MB_TASK = ["sh", "-c", "head -c 75000000 /dev/urandom | base64 -w 158"]
TICKS = 100
TICKER = ["sh", "-c",
          f"sleep 3; for i in $(seq {TICKS}); do echo T=$(date +%s%N); sleep 0.05; done"]
WEB_TASKS = {
    "hundred-mb": {"image": "efci/base:bookworm", "command": HUNDRED_MB_TASK, "network": "none"},
    "ticker": {"image": "efci/base:bookworm", "command": TICKER, "network": "none"},
}

HARNESS = """<!doctype html><meta charset="utf-8"><title>renderer bench</title>
<script type="module">
import { Terminal } from "./terminal.mjs";
import { AnsiUp } from "./ansi_up.js";
const CHUNK = 65536;
async function bytes(name) { return new Uint8Array(await (await fetch(name)).arrayBuffer()); }
function ours(data) {
  const lines = [];
  const t0 = performance.now();
  const term = new Terminal({ cols: 160, rows: 50, onFinal: (l) => lines.push(l) });
  for (let i = 0; i < data.length; i += CHUNK) term.write(data.subarray(i, i + CHUNK));
  const ms = performance.now() - t0;
  const all = lines.concat(term.live()).filter((l) => l.text);
  return { ms, lines: all.length, kept: all.reduce((n, l) => n + l.text.length, 0) };
}
function ansiUp(data) {
  const out = [];
  const t0 = performance.now();
  const au = new AnsiUp();
  const dec = new TextDecoder();
  for (let i = 0; i < data.length; i += CHUNK)
    out.push(au.ansi_to_html(dec.decode(data.subarray(i, i + CHUNK), { stream: true })));
  const ms = performance.now() - t0;
  const html = out.join("");
  return { ms, lines: html.split("\\n").length - 1, kept: html.length };
}
window.runBench = async (name, which) => {
  const data = await bytes(name);
  const r = which === "ours" ? ours(data) : ansiUp(data);
  return { ...r, bytes: data.length };
};
window.ready = true;
</script>"""


def mixed_log(size: int, seed: int = 1) -> bytes:
    """Build output as a CI log holds it: compiler lines in colour, plain
    text, progress redrawn with \\r, 256 and 24-bit colours, UTF-8."""
    rnd = random.Random(seed)  # noqa: S311 - test data, not secrets
    words = ["compiling", "warning:", "src/main.rs", "unused", "variable", "ok", "test",
             "passed", "Downloading", "grüße", "✓", "→", "error[E0308]:", "mismatched"]
    parts: list[bytes] = []
    total = 0
    while total < size:
        kind = rnd.randrange(10)
        text = " ".join(rnd.choice(words) for _ in range(rnd.randrange(4, 18)))
        if kind < 4:
            line = text
        elif kind < 6:
            line = f"\x1b[1;32m   Compiling\x1b[0m {text} \x1b[2m({rnd.randrange(999)})\x1b[0m"
        elif kind == 6:
            line = (f"\x1b[38;5;{rnd.randrange(256)}m{text}\x1b[0m "
                    f"\x1b[38;2;10;20;{rnd.randrange(256)}m✓\x1b[0m")
        elif kind == 7:
            line = "".join(f"\r[{'#' * k:<20}] {k * 5}%" for k in range(0, 21, 4))
        elif kind == 8:
            line = f"\x1b[1;31merror\x1b[0m\x1b[1m: {text}\x1b[0m\x1b[K"
        else:
            line = f"\x1b]8;;https://example.org/{rnd.randrange(99)}\x1b\\{text}\x1b]8;;\x1b\\"
        chunk = (line + "\r\n").encode()
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)[:size]


def progress_frames(size: int) -> bytes:
    out, i = [], 0
    total = 0
    while total < size:
        frame = f"\rprogress {i:>9}/99999999 [{'#' * (i % 40):<40}] \x1b[32m{i % 100:>3}%\x1b[0m"
        out.append(frame.encode())
        total += len(out[-1])
        i += 1
    return b"".join(out) + b"\r\n"


class Files(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript"}

    def log_message(self, *args: Any) -> None:
        pass


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--js-flags=--max-old-space-size=8192"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_script_timeout(600)
    return driver


def bench_renderer(driver: Any, row: Any) -> None:
    work = Path(tempfile.mkdtemp(prefix="efci-bench-web."))
    try:
        npm = shutil.which("npm")
        if npm is None:
            print("  (skipped: ansi_up comes from npm; apt-get install npm)")
            return
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(work / "npm"), "ansi_up@6"], check=True, capture_output=True)
        version = json.loads((work / "npm/node_modules/ansi_up/package.json").read_text())
        shutil.copy(work / "npm/node_modules/ansi_up/ansi_up.js", work / "ansi_up.js")
        shutil.copy(STATIC / "terminal.mjs", work / "terminal.mjs")
        (work / "bench.html").write_text(HARNESS)
        (work / "mixed-10.bin").write_bytes(mixed_log(10 * MB))
        (work / "mixed-100.bin").write_bytes(mixed_log(100 * MB, seed=2))
        (work / "progress-10.bin").write_bytes(progress_frames(10 * MB))
        handler = functools.partial(Files, directory=str(work))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/bench.html")
            while not driver.execute_script("return window.ready === true"):
                time.sleep(0.05)
            print(f"\nrenderer in headless Chromium (MB/s, median of 3; ansi_up "
                  f"{version['version']} from npm as the baseline)")
            for name, label in [("mixed-10.bin", "mixed log, 10 MB"),
                                ("mixed-100.bin", "mixed log, 100 MB"),
                                ("progress-10.bin", "\\r progress frames, 10 MB")]:
                figures = {}
                for which in ("ours", "ansi_up"):
                    results = [driver.execute_async_script(
                        "window.runBench(arguments[0], arguments[1]).then(arguments[2])",
                        name, which) for _ in range(3)]
                    ms = statistics.median(r["ms"] for r in results)
                    figures[which] = (results[0]["bytes"] / MB / (ms / 1000), results[0])
                (ours, mine), (base, theirs) = figures["ours"], figures["ansi_up"]
                row(label, f"efci {ours:7.1f}", f"ansi_up {base:7.1f}", f"x{ours / base:5.2f}",
                    f"shown: {mine['lines']} lines, {mine['kept'] / MB:.1f} MB of text vs "
                    f"{theirs['kept'] / MB:.1f} MB of HTML")
        finally:
            server.shutdown()
    finally:
        shutil.rmtree(work)


class WebPage:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.url = f"http://127.0.0.1:{PORT}"
        with open(agent.root / "web.log", "wb") as log:
            self.proc = subprocess.Popen([*agent.efci_argv(), "web"], stderr=log)
        deadline = time.monotonic() + 30
        while not json.loads(agent.efci("--json", "status"))["web"]:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("bench: efci web did not start:\n"
                                 + (agent.root / "web.log").read_text())
            time.sleep(0.1)

    def log_in(self, driver: Any) -> None:
        driver.get(self.agent.efci("web-login").strip())
        while not driver.current_url.endswith("/runs"):
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def bench_first_paint(agent: Any, page: WebPage, driver: Any, row: Any) -> None:
    record = agent.run_and_wait("hundred-mb")
    run = record["id"]
    size = record["log_size"]
    raw = Path(tempfile.mkstemp(prefix="efci-bench-raw.")[1])
    try:
        with open(raw, "wb") as out:
            subprocess.run([*agent.efci_argv(), "logs", "--raw", str(run)], stdout=out, check=True)
        page.log_in(driver)
        paints = []
        for _ in range(10):
            driver.get(f"{page.url}/runs/{run}")
            while (t := driver.execute_script("return window.efciFirstPaint || 0")) == 0:
                time.sleep(0.01)
            paints.append(t / 1000)
        tails = []
        for _ in range(10):
            started = time.perf_counter()
            subprocess.run(["tail", "-n", "5000", str(raw)], stdout=subprocess.DEVNULL, check=True)
            tails.append(time.perf_counter() - started)
    finally:
        raw.unlink()
    print(f"\nfirst paint of a {size / MB:.0f} MB log's tail (ms, median of 10, from "
          "navigation start)")
    row("the run's page, its last 5,000 lines in the DOM",
        f"efci {statistics.median(paints) * 1000:7.1f}",
        f"p95 {quantile(paints, 0.95) * 1000:7.1f}")
    row("tail -n 5000 of the same bytes in a file", f"tail {statistics.median(tails) * 1000:7.1f}")


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SAMPLER = """
window.lat = []; const seen = new Set();
const tick = () => {
  const now = Date.now();
  for (const line of document.querySelectorAll('#log .line')) {
    const k = line.textContent.indexOf('T=');
    if (k < 0) continue;
    const ns = line.textContent.slice(k + 2, k + 21);
    if (ns.length !== 19 || seen.has(ns)) continue;
    seen.add(ns);
    window.lat.push(now - Number(ns.slice(0, 13)));
  }
  requestAnimationFrame(tick);
};
requestAnimationFrame(tick);
"""


def bench_latency(agent: Any, page: WebPage, driver: Any, row: Any) -> None:
    run = json.loads(agent.efci("--json", "run", "ticker"))["id"]
    follower = subprocess.Popen([*agent.efci_argv(), "logs", "--follow", "--raw", str(run)],
                                stdout=subprocess.PIPE)
    driver.get(f"{page.url}/runs/{run}")
    driver.execute_script(SAMPLER)
    cli = []
    assert follower.stdout is not None
    for line in follower.stdout:
        now = time.time_ns()
        text = line.decode(errors="replace").strip()
        if text.startswith("T="):
            cli.append((now - int(text[2:])) / 1e9)
    follower.wait()
    time.sleep(1)
    web = [ms / 1000 for ms in driver.execute_script("return window.lat")]
    print(f"\nfrom a line printed in a container to the page ({len(web)} of {TICKS} lines "
          "seen in the DOM at a frame; ms)")
    row("the run's page, following", f"p50 {statistics.median(web) * 1000:7.1f}",
        f"p95 {quantile(web, 0.95) * 1000:7.1f}")
    row("efci logs --follow on the same run", f"p50 {statistics.median(cli) * 1000:7.1f}",
        f"p95 {quantile(cli, 0.95) * 1000:7.1f}")


def bench_web(agent: Any, row: Any) -> None:
    agent.declare_more(WEB_TASKS)
    driver = browser()
    page = WebPage(agent)
    try:
        bench_renderer(driver, row)
        bench_first_paint(agent, page, driver, row)
        bench_latency(agent, page, driver, row)
    finally:
        driver.quit()
        page.close()
