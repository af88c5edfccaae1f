// What the pages do beyond plain HTML: live run lists and status, the log
// viewer, copy buttons.  Every page works without it, just not live.
import { LogView } from "./viewer.mjs";

const csrf = document.querySelector("meta[name=csrf]")?.content || "";
const POLL_MS = 1500;

async function getJson(url) {
  const r = await fetch(url, { headers: { accept: "application/json" }, credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

/** The runs table: rows rendered (and escaped) by the server, swapped in live. */
function liveRuns(tbody) {
  const tick = async () => {
    try {
      const r = await fetch(tbody.dataset.live, { credentials: "same-origin" });
      if (r.ok) {
        const template = document.createElement("template");
        template.innerHTML = await r.text(); // the server's own escaped HTML, not log data
        tbody.replaceChildren(template.content);
      }
    } finally { setTimeout(tick, POLL_MS); }
  };
  setTimeout(tick, POLL_MS);
}

function liveRun(box) {
  const runId = box.dataset.run;
  const tools = {
    follow: document.getElementById("log-follow"), state: document.getElementById("log-state"),
  };
  const view = new LogView(box, runId, { start: Number(box.dataset.start), tools });
  window.efciLog = view; // for the browser tests and the curious
  view.open();
  tools.follow.addEventListener("change", () => { view.follow = tools.follow.checked; view.render(); });
  document.getElementById("log-times").addEventListener("change", (e) => view.setTimes(e.target.checked));
  const search = document.getElementById("log-search");
  const matches = document.getElementById("log-matches");
  search.addEventListener("input", () => {
    const n = view.search(search.value);
    matches.textContent = search.value ? `${n} matching line${n === 1 ? "" : "s"}` : "";
  });
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") view.nextMatch(); });
  const badge = document.getElementById("run-status");
  const exit = document.getElementById("run-exit");
  const progress = document.getElementById("run-progress");
  const tick = async () => {
    try {
      const run = await getJson(`/api/runs/${runId}`);
      badge.textContent = run.status; badge.className = `badge ${run.status}`;
      exit.textContent = run.exit_code ?? "";
      progress.textContent = run.progress_message || "";
      if (run.progress != null) {
        const bar = document.createElement("progress");
        bar.max = 1; bar.value = run.progress;
        progress.prepend(bar, " ");
      }
    } finally { setTimeout(tick, POLL_MS); }
  };
  setTimeout(tick, POLL_MS);
}

for (const button of document.querySelectorAll("button.copy")) {
  button.addEventListener("click", async () => {
    await navigator.clipboard.writeText(button.dataset.copy);
    button.textContent = "Copied";
  });
}

const rows = document.getElementById("runs-rows");
if (rows) liveRuns(rows);
const log = document.getElementById("log");
if (log) liveRun(log);
export { csrf };
