// Hand-written cases for every escape the log viewer's terminal handles:
// `node --test tests/renderer/` (tests/renderer/test_against_pyte.py runs
// this too, beside the corpus comparison with pyte).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Terminal, BOLD, DIM, ITALIC, UNDERLINE, INVERSE, STRIKE, BAD, cssColour } from
  "../../agent/web/static/terminal.mjs";

const enc = new TextEncoder();

function run(input, { cols = 20, rows = 5, chunks = null } = {}) {
  const finals = [];
  const t = new Terminal({ cols, rows, onFinal: (l) => finals.push(l) });
  const bytes = typeof input === "string" ? enc.encode(input) : input;
  if (chunks) for (let i = 0; i < bytes.length; i += chunks) t.write(bytes.subarray(i, i + chunks));
  else t.write(bytes);
  return { t, finals, lines: [...finals, ...t.live()] };
}

const texts = (r) => r.lines.map((l) => l.text);
/** The style of the first character of `needle` on a line. */
function styleAt(r, needle) {
  for (const line of r.lines) {
    const at = line.text.indexOf(needle);
    if (at < 0) continue;
    let id = 0;
    for (let k = 0; k < line.spans.length; k += 2) if (line.spans[k] <= at) id = line.spans[k + 1];
    return r.t.styles[id];
  }
  throw new Error(`${needle} not drawn`);
}

test("plain lines, CR LF and a bare LF", () => {
  assert.deepEqual(texts(run("one\r\ntwo\nthree")), ["one", "two", "three"]);
});

test("SGR attributes set and reset one by one", () => {
  const r = run("\x1b[1ma\x1b[2mb\x1b[3mc\x1b[4md\x1b[7me\x1b[9mf\x1b[22;23;24;27;29mg\x1b[0mh");
  assert.equal(styleAt(r, "a").flags, BOLD);
  assert.equal(styleAt(r, "f").flags, BOLD | DIM | ITALIC | UNDERLINE | INVERSE | STRIKE);
  assert.equal(styleAt(r, "g").flags, 0);
  assert.equal(styleAt(r, "h").fg, -1);
});

test("16, 256 and 24-bit colours, semicolon and colon forms", () => {
  const r = run("\x1b[31;42ma\x1b[91;103mb\x1b[38;5;208;48;5;17mc\x1b[38;2;1;2;3md" +
    "\x1b[38:2::10:20:30;48:2:40:50:60me\x1b[38:5:99mf\x1b[39;49mg\x1b[4:3mh\x1b[4:0mi");
  assert.deepEqual([styleAt(r, "a").fg, styleAt(r, "a").bg], [1, 2]);
  assert.deepEqual([styleAt(r, "b").fg, styleAt(r, "b").bg], [9, 11]);
  assert.deepEqual([styleAt(r, "c").fg, styleAt(r, "c").bg], [208, 17]);
  assert.equal(cssColour(styleAt(r, "d").fg), "#010203");
  assert.equal(cssColour(styleAt(r, "e").fg), "#0a141e");
  assert.equal(cssColour(styleAt(r, "e").bg), "#28323c");
  assert.equal(styleAt(r, "f").fg, 99);
  assert.deepEqual([styleAt(r, "g").fg, styleAt(r, "g").bg], [-1, -1]);
  assert.equal(styleAt(r, "h").flags & UNDERLINE, UNDERLINE);
  assert.equal(styleAt(r, "i").flags & UNDERLINE, 0);
});

test("a progress bar redrawn with CR collapses into its last state", () => {
  let s = "";
  for (let k = 0; k <= 100; k += 10) s += `\r[${"#".repeat(k / 10).padEnd(10)}] ${k}%`;
  assert.deepEqual(texts(run(s + "\r\n", { cols: 40 })), ["[##########] 100%", ""]);
});

test("cursor movement: CUU CUD CUF CUB CNL CPL CHA CUP HVP VPA", () => {
  const r = run("abcdef\x1b[3D1\x1b[2C2\r\n\x1b[Aup\x1b[Bdn\x1b[2Enl\x1b[Fpl\x1b[5Gc\x1b[4;3Hp" +
    "\x1b[5;1fq\x1b[2dr", { cols: 10, rows: 5 });
  assert.deepEqual(r.t.display().map((l) => l.trimEnd()),
    ["upc1ef2", " rdn", "pl  c", "nlp", "q"]); // what pyte draws for the same bytes
});

test("erase in line: to the end, to the start, whole", () => {
  assert.deepEqual(texts(run("abcdef\x1b[3D\x1b[K")), ["abc"]);
  assert.deepEqual(texts(run("abcdef\x1b[3D\x1b[1K")), ["    ef"]);
  assert.deepEqual(texts(run("abcdef\x1b[2Kx")), ["      x"]);
});

test("erase in display: below, above, all, and scrollback", () => {
  const base = "11\r\n22\r\n33\r\n44\x1b[2;2H";
  const show = (s) => run(s, { cols: 4, rows: 4 }).t.display().map((l) => l.trimEnd());
  assert.deepEqual(show(base + "\x1b[J"), ["11", "2", "", ""]);
  assert.deepEqual(show(base + "\x1b[1J"), ["", "", "33", "44"]);
  assert.deepEqual(show(base + "\x1b[2J"), ["", "", "", ""]);
  assert.deepEqual(show(base + "\x1b[3J"), ["", "", "", ""]);
});

test("backspace and tabs", () => {
  assert.deepEqual(texts(run("abc\b\bX\tY\tZ", { cols: 20 })), ["aXc     Y       Z"]);
  assert.deepEqual(texts(run("a\t\t\tb", { cols: 12 })), ["a          b"]);
});

test("long lines wrap at the terminal's width and say so", () => {
  const r = run("abcdefghij", { cols: 4, rows: 5 });
  assert.deepEqual(texts(r), ["abcd", "efgh", "ij"]);
  assert.deepEqual(r.lines.map((l) => l.wrapped), [true, true, false]);
});

test("lines that scroll off the screen are final, in order", () => {
  const r = run("1\n2\n3\n4\n5\n", { rows: 3 });
  assert.deepEqual(r.finals.map((l) => l.text), ["1", "2", "3"]);
  assert.deepEqual(r.t.display().map((l) => l.trimEnd()), ["4", "5", ""]);
});

test("absolute positioning redraws the screen the task saw", () => {
  const r = run("\x1b[2J\x1b[1;1Hstatus: 1\x1b[1;9H2\x1b[1;9H3", { cols: 20, rows: 3 });
  assert.deepEqual(texts(r), ["status: 3"]);
});

test("OSC 8 links: http(s) become links, javascript: does not", () => {
  const r = run("\x1b]8;;https://example.org/x\x07site\x1b]8;;\x07 " +
    "\x1b]8;id=1;javascript:alert(1)\x1b\\evil\x1b]8;;\x1b\\", { cols: 40 });
  assert.equal(r.t.links[styleAt(r, "site").link], "https://example.org/x");
  assert.equal(styleAt(r, "evil").link, 0);
  assert.deepEqual(texts(r), ["site evil"]);
});

test("titles, clipboard, DCS, APC, PM, SOS, unknown CSI and private modes are consumed", () => {
  const r = run("a\x1b]0;title\x07b\x1b]52;c;Zm9v\x1b\\c\x1bPq#0;1;2\x1b\\d\x1b_apc\x1b\\e" +
    "\x1b^pm\x1b\\f\x1bXsos\x1b\\g\x1b[?25l\x1b[?1049h\x1b[5q\x1b[>4;1m\x1b[12;34zh\x1b=\x1b>i");
  assert.deepEqual(texts(r), ["abcdefghi"]);
});

test("invalid UTF-8 shows one \\xNN token per bad byte, distinctly", () => {
  const r = run(new Uint8Array([0x61, 0xff, 0x62, 0xc3, 0x63, 0xe2, 0x82, 0x64, 0xc0, 0xaf,
    0xed, 0xa0, 0x80]));
  assert.deepEqual(texts(r), ["a\\xffb\\xc3c\\xe2\\x82d\\xc0\\xaf\\xed\\xa0\\x80"]);
  assert.equal(styleAt(r, "\\xff").flags & BAD, BAD);
  assert.equal(styleAt(r, "b").flags & BAD, 0);
});

test("a UTF-8 character split across writes decodes whole", () => {
  const bytes = enc.encode("grüße ✓ 𝄞 ok");
  for (const chunk of [1, 2, 3]) assert.deepEqual(texts(run(bytes, { chunks: chunk })), ["grüße ✓ 𝄞 ok"]);
});

test("escapes split across writes still parse", () => {
  const r = run("\x1b[38;2;1;2;3mX\x1b]8;;https://e.org\x07L\x1b]8;;\x07", { chunks: 1 });
  assert.equal(cssColour(styleAt(r, "X").fg), "#010203");
  assert.equal(r.t.links[styleAt(r, "L").link], "https://e.org");
});

test("markup in the log is text, never HTML", () => {
  const evil = "<script>alert(1)</script>\"><img src=x onerror=alert(1)>";
  assert.deepEqual(texts(run(evil, { cols: 80 })), [evil]);
});

test("a megabyte of CSI parameters is consumed quickly and draws nothing", () => {
  const big = new Uint8Array(1 << 20).fill(0x3b);
  const start = performance.now();
  const t = new Terminal({ cols: 20, rows: 5 });
  t.write(enc.encode("a\x1b[")); t.write(big); t.write(enc.encode("mb"));
  const ms = performance.now() - start;
  assert.deepEqual(t.live().map((l) => l.text), ["ab"]);
  assert.ok(ms < 5000, `took ${ms} ms`); // a guard against a hang, not a benchmark
});

test("GitLab section markers are caught before the erase that hides them", () => {
  const r = run("\x1b[0Ksection_start:1700000000:build[collapsed=true]\r\x1b[0Kbuilding\r\n" +
    "\x1b[0Ksection_end:1700000001:build\r\x1b[0Kafter\r\n", { cols: 60 });
  assert.deepEqual(texts(r), ["building", "after", ""]);
  assert.deepEqual(r.lines[0].marks, [{ kind: "start", name: "build", collapsed: true, source: "gitlab" }]);
  assert.deepEqual(r.lines[1].marks, [{ kind: "end", name: "build", collapsed: false, source: "gitlab" }]);
});

test("scroll regions, save and restore cursor (apt's fancy progress)", () => {
  const r = run("a\r\nb\r\n\x1b7\x1b[0;3r\x1b8\x1b[1A\x1b7\x1b[4;1HProgress\x1b8c\r\nd\r\ne\r\n",
    { cols: 10, rows: 4 });
  assert.equal(r.t.display()[3].trimEnd(), "Progress");
});

test("agent notes go on a line of their own", () => {
  const t = new Terminal({ cols: 30, rows: 5 });
  t.write(enc.encode("partial"));
  t.writeNote("efci: checkout done", { fg: -1, bg: -1, flags: DIM, link: 0 });
  t.write(enc.encode("next"));
  assert.deepEqual(t.live().map((l) => l.text), ["partial", "efci: checkout done", "next"]);
});
