// The log viewer: fetches a run's stored records (bytes, never re-encoded
// text), feeds them to the terminal, and shows its lines.  Only the lines
// in view are in the DOM, built with textContent: log data never becomes
// HTML.  It opens at the log's tail, loads earlier parts on request,
// follows a running log and resumes from the last record it has after a
// dropped connection, so no byte is lost or shown twice.
import { Terminal, Style, BOLD, DIM, ITALIC, UNDERLINE, INVERSE, STRIKE, BAD, cssColour, safeUrl }
  from "./terminal.mjs";

const OUTPUT = 1, AGENT = 2, STATUS = 3, RESIZE = 4, MARKER = 5, GAP = 7;
const TAIL_LINES = 5000;
// Lines a followed log keeps in the tab; past it the oldest go (and come
// back with "Load earlier lines"), so a task printing for hours cannot
// exhaust the browser's memory.
const MAX_LINES = 200000;
const LINE_HEIGHT = 18; // px, as in style.css
const OVERSCAN = 20;
const NOTE = new Style(-1, -1, DIM | ITALIC, 0);

/** Frames of the page's log stream: u32 header length, JSON header, then `size` bytes. */
export class FrameReader {
  constructor() { this.buf = new Uint8Array(0); }

  feed(chunk) {
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf); joined.set(chunk, this.buf.length);
    this.buf = joined;
    const out = [];
    let at = 0;
    while (this.buf.length - at >= 4) {
      const view = new DataView(this.buf.buffer, this.buf.byteOffset + at);
      const n = view.getUint32(0, true);
      if (this.buf.length - at < 4 + n) break;
      const header = JSON.parse(new TextDecoder().decode(this.buf.subarray(at + 4, at + 4 + n)));
      const size = header.size || 0;
      if (this.buf.length - at < 4 + n + size) break;
      header.payload = this.buf.subarray(at + 4 + n, at + 4 + n + size);
      out.push(header);
      at += 4 + n + size;
    }
    this.buf = this.buf.slice(at);
    return out;
  }
}

/** Feed one `records` message to a terminal. */
export function feedRecords(term, message, onStatus) {
  let at = 0;
  for (const [position, kind, , timeNs, length] of message.records) {
    const bytes = message.payload.subarray(at, at + length);
    at += length;
    term.time = timeNs / 1e6; term.position = position;
    if (kind === OUTPUT) term.write(bytes);
    else if (kind === AGENT) term.writeNote(new TextDecoder().decode(bytes), NOTE);
    else if (kind === RESIZE) {
      const { cols, rows } = JSON.parse(new TextDecoder().decode(bytes));
      if (cols > 0 && rows > 0 && cols <= 1000 && rows <= 1000) term.size(cols, rows);
    } else if (kind === MARKER) {
      const m = JSON.parse(new TextDecoder().decode(bytes));
      const name = m.name ? `${m.step} ${m.name}` : m.step;
      term.mark({ kind: m.event === "end" ? "end" : "start", name, collapsed: false, source: "agent" });
    } else if (kind === GAP) {
      const g = JSON.parse(new TextDecoder().decode(bytes));
      term.writeNote(`efci: ${g.lost_bytes ?? "some"} bytes were dropped here to keep the log within its limit`, NOTE);
    } else if (kind === STATUS && onStatus) onStatus(JSON.parse(new TextDecoder().decode(bytes)));
  }
}

export class LogView {
  constructor(box, runId, { start = 0, onStatus = null, tools = {} } = {}) {
    this.box = box; this.runId = runId; this.onStatus = onStatus; this.tools = tools;
    this.start = start; // the log's first record: nothing to load before it
    this.first = null; // where the lines loaded begin
    this.lines = []; // final lines, oldest first
    this.term = this.newTerminal(this.lines);
    this.next = 0; // where to resume
    this.follow = true; // keep the end in view
    this.times = false;
    this.collapsed = new Set(); // index of a section's first line
    this.matches = []; this.match = -1; this.query = "";
    this.spacer = document.createElement("div");
    this.spacer.className = "log-spacer";
    this.body = document.createElement("div");
    this.body.className = "log-lines";
    this.earlier = document.createElement("button");
    this.earlier.className = "log-earlier"; this.earlier.textContent = "Load earlier lines";
    this.earlier.hidden = true;
    this.earlier.addEventListener("click", () => this.loadEarlier());
    box.replaceChildren(this.earlier, this.spacer);
    this.spacer.appendChild(this.body);
    box.addEventListener("scroll", () => {
      this.follow = box.scrollTop + box.clientHeight >= box.scrollHeight - LINE_HEIGHT;
      if (this.tools.follow) this.tools.follow.checked = this.follow;
      this.schedule();
    });
  }

  newTerminal(sink) { return new Terminal({ cols: 160, rows: 50, onFinal: (l) => sink.push(l) }); }

  /** Open at a line's position (from a link), else at the tail, and follow. */
  async open() {
    const m = /^#at-(\d+)$/.exec(location.hash);
    const query = m ? `position=${m[1]}` : `tail=${TAIL_LINES}`;
    this.target = m ? Number(m[1]) : null;
    await this.stream(query + "&follow=1");
  }

  async stream(query) {
    let retries = 0;
    for (;;) {
      try {
        const done = await this.read(`/runs/${this.runId}/log?${query}`, this.term);
        if (done) return;
      } catch (e) {
        this.state(`connection lost (${e.message}); resuming`);
      }
      // Resume exactly after the last record we have.
      query = `position=${this.next}&follow=1`;
      await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** retries++, 5000)));
    }
  }

  /** Read one log response into `term`; true when the agent ended it cleanly.
   * Returns where its bytes began, [record position, offset], in `began`. */
  async read(url, term, { earlier = false, began = [] } = {}) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.statusText }));
      this.state(body.error || `HTTP ${response.status}`);
      return true;
    }
    const reader = response.body.getReader();
    const frames = new FrameReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false; // cut off: resume
      for (const message of frames.feed(value)) {
        if (message.error) { this.state(message.error); return true; }
        if (message.event === "streams" && message.start) {
          began.splice(0, 2, ...message.start);
          if (!earlier && this.first === null) this.setFirst(message.start);
        } else if (message.event === "records") {
          feedRecords(term, message, this.onStatus);
          if (!earlier) { this.next = message.next; this.trim(); }
          this.schedule();
        } else if (message.ok) {
          if (!earlier) this.next = message.result.next;
          this.state(earlier ? "" : "end of log");
          return true;
        }
      }
    }
  }

  /** Where the lines loaded begin: [record position, offset in it]. */
  setFirst(first) {
    this.first = first;
    this.earlier.hidden = !(first[0] > this.start || first[1] > 0);
  }

  /** The lines before the first one loaded, rendered on a terminal of their
   * own; they end exactly where those begin, to the byte. */
  async loadEarlier() {
    if (this.earlier.hidden || this.loadingEarlier) return;
    this.loadingEarlier = true;
    const older = [];
    const term = this.newTerminal(older);
    const [until, skip] = this.first;
    const began = [];
    await this.read(`/runs/${this.runId}/log?tail=${TAIL_LINES}&until=${until}&until_skip=${skip}`,
      term, { earlier: true, began });
    term.flush();
    if (began.length) this.setFirst(began);
    this.lines.unshift(...older);
    this.collapsed = new Set([...this.collapsed].map((i) => i + older.length));
    this.sec = null; // indices moved: scan the sections again
    this.loadingEarlier = false;
    this.schedule();
  }

  /** Drop the oldest lines past MAX_LINES, up to one whose first byte is
   * known; loading earlier lines again gives them back from exactly there. */
  trim() {
    if (this.lines.length <= MAX_LINES) return;
    let drop = this.lines.length - MAX_LINES + (MAX_LINES >> 3);
    while (drop < this.lines.length - 1 && this.lines[drop].pos < 0) drop++;
    const keep = this.lines[drop];
    if (keep.pos < 0) return;
    this.lines.splice(0, drop);
    this.setFirst([keep.pos, keep.off]);
    this.collapsed = new Set([...this.collapsed].map((i) => i - drop).filter((i) => i >= 0));
    this.sec = null;
    if (!this.follow) this.box.scrollTop = Math.max(0, this.box.scrollTop - drop * LINE_HEIGHT);
  }

  state(text) { if (this.tools.state) this.tools.state.textContent = text; }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = 0; this.render(); });
  }

  /** Section markers of a line: its own, and GitHub's/Gitea's ::group:: lines. */
  static marksOf(line) {
    const marks = line.marks ? line.marks.slice() : [];
    if (line.text.startsWith("::group::")) marks.push({ kind: "start", name: line.text.slice(9) });
    else if (line.text.startsWith("::endgroup::")) marks.push({ kind: "end" });
    return marks;
  }

  /** Sections over the final lines, scanned once each (a big log stays cheap to follow). */
  scanSections() {
    if (!this.sec) this.sec = { scanned: 0, open: [], ends: new Map() };
    const sec = this.sec;
    for (; sec.scanned < this.lines.length; sec.scanned++) {
      for (const m of LogView.marksOf(this.lines[sec.scanned])) {
        if (m.kind === "start") {
          sec.open.push(sec.scanned);
          if (m.collapsed) this.collapsed.add(sec.scanned);
        } else if (sec.open.length) sec.ends.set(sec.open.pop(), sec.scanned);
      }
    }
  }

  render() {
    this.scanSections();
    const live = this.term.live();
    const n = this.lines.length, total = n + live.length;
    const line = (i) => (i < n ? this.lines[i] : live[i - n]);
    // Sections still open end at the last line for now; live lines may open more.
    this.starts = new Map(this.sec.ends);
    const open = this.sec.open.slice();
    for (let i = n; i < total; i++) {
      for (const m of LogView.marksOf(line(i))) {
        if (m.kind === "start") open.push(i); else if (open.length) this.starts.set(open.pop(), i);
      }
    }
    for (const s of open) this.starts.set(s, total - 1);
    let shown = null;
    if (this.collapsed.size) {
      shown = [];
      for (let i = 0; i < total; i++) {
        shown.push(i);
        if (this.collapsed.has(i) && this.starts.has(i)) i = this.starts.get(i);
      }
    }
    const count = shown ? shown.length : total;
    this.spacer.style.height = `${count * LINE_HEIGHT}px`;
    if (this.follow) this.box.scrollTop = this.box.scrollHeight;
    if (this.target != null) {
      const k = this.lines.findIndex((l) => l.pos >= this.target);
      if (k >= 0) { this.box.scrollTop = k * LINE_HEIGHT; this.follow = false; this.highlight = k; }
      this.target = null;
    }
    const from = Math.max(0, Math.floor(this.box.scrollTop / LINE_HEIGHT) - OVERSCAN);
    const to = Math.min(count, Math.ceil((this.box.scrollTop + this.box.clientHeight) / LINE_HEIGHT) + OVERSCAN);
    this.body.style.top = `${from * LINE_HEIGHT}px`;
    const nodes = [];
    for (let k = from; k < to; k++) {
      const i = shown ? shown[k] : k;
      nodes.push(this.lineNode(line(i), i));
    }
    this.body.replaceChildren(...nodes);
    // When the first lines showed, for scripts/bench (relative to navigation start).
    if (nodes.length && !window.efciFirstPaint) window.efciFirstPaint = performance.now();
  }

  lineNode(line, i) {
    const div = document.createElement("div");
    div.className = "line";
    if (i === this.highlight || (this.match >= 0 && this.matches[this.match] === i)) div.classList.add("hit");
    const end = this.starts.get(i);
    if (end !== undefined) {
      const fold = document.createElement("button");
      fold.className = "fold";
      fold.textContent = this.collapsed.has(i) ? "▸" : "▾";
      fold.title = this.collapsed.has(i) ? `show ${end - i} lines` : "fold this section";
      fold.addEventListener("click", () => {
        if (this.collapsed.has(i)) this.collapsed.delete(i); else this.collapsed.add(i);
        this.follow = false;
        this.render();
      });
      div.appendChild(fold);
      div.classList.add("section");
    }
    const anchor = document.createElement("a");
    anchor.className = "ln";
    if (line.pos >= 0) anchor.href = `#at-${line.pos}`;
    anchor.textContent = this.times && line.time ? new Date(line.time).toISOString().slice(11, 23) : "";
    div.appendChild(anchor);
    const t = this.term;
    const spans = line.spans;
    for (let k = 0; k < spans.length; k += 2) {
      const text = line.text.slice(spans[k], k + 2 < spans.length ? spans[k + 2] : undefined);
      const style = t.styles[spans[k + 1]] || t.styles[0];
      div.appendChild(this.styled(text, style));
    }
    if (!spans.length) div.appendChild(document.createTextNode(""));
    return div;
  }

  styled(text, s) {
    const url = s.link ? this.term.links[s.link] : "";
    const node = document.createElement(url && safeUrl(url) ? "a" : "span");
    node.textContent = text;
    if (node.tagName === "A") { node.href = url; node.rel = "noopener noreferrer nofollow"; node.target = "_blank"; }
    let fg = cssColour(s.fg, (s.flags & BOLD) !== 0), bg = cssColour(s.bg);
    if (s.flags & INVERSE) { [fg, bg] = [bg || "var(--bg)", fg || "var(--fg)"]; }
    if (fg) node.style.color = fg;
    if (bg) node.style.backgroundColor = bg;
    const classes = [];
    if (s.flags & BOLD) classes.push("b");
    if (s.flags & DIM) classes.push("d");
    if (s.flags & ITALIC) classes.push("i");
    if (s.flags & UNDERLINE) classes.push("u");
    if (s.flags & STRIKE) classes.push("s");
    if (s.flags & BAD) classes.push("bad");
    if (classes.length) node.className = classes.join(" ");
    return node;
  }

  setTimes(on) { this.times = on; this.render(); }

  search(query) {
    this.query = query.toLowerCase();
    const lines = this.lines.concat(this.term.live());
    this.matches = [];
    if (this.query) lines.forEach((l, i) => { if (l.text.toLowerCase().includes(this.query)) this.matches.push(i); });
    this.match = this.matches.length ? 0 : -1;
    this.showMatch();
    return this.matches.length;
  }

  nextMatch() {
    if (!this.matches.length) return;
    this.match = (this.match + 1) % this.matches.length;
    this.showMatch();
  }

  showMatch() {
    if (this.match >= 0) {
      this.collapsed.clear();
      this.follow = false;
      this.box.scrollTop = Math.max(0, this.matches[this.match] * LINE_HEIGHT - this.box.clientHeight / 2);
    }
    this.render();
  }
}
