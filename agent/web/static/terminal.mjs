// The log viewer's terminal: a byte-level state machine (no regular
// expressions over the stream, so no input can make it backtrack) over a
// screen of the size the task saw.  Bytes stay bytes until here: UTF-8 is
// decoded across writes (a character split between two records decodes
// whole), and each byte that is not valid UTF-8 becomes a visible `\xNN`
// token.  What it does not draw (titles, clipboard, DCS, APC, PM, unknown
// CSI, private modes) it consumes.  It builds no HTML: the view turns its
// lines into DOM nodes with textContent.
//
// Lines that scroll off the top of the screen can no longer change: they
// are *final* and handed to `onFinal` as compact {text, spans} records.
// The screen's own rows stay cells until then.  Semantics follow the VT100
// as pyte models it (the tests compare final screens with pyte), except
// that a line feed also returns the carriage, as a log viewer must for
// output that did not pass through a tty (pyte's LNM mode).

export const BOLD = 1, DIM = 2, ITALIC = 4, UNDERLINE = 8, INVERSE = 16, STRIKE = 32,
  BAD = 64; // BAD: a `\xNN` token for a byte that is not UTF-8

const DEFAULT = -1; // colour: the page's own
const RGB = 0x1000000; // colour: RGB | 0xRRGGBB; else 0..255 palette

const MAX_PARAMS = 32; // CSI parameters kept; more are consumed and dropped
const MAX_PARAM = 65535;
const MAX_STRING = 4096; // OSC bytes kept; the rest of a longer one is dropped

// Parser states.
const GROUND = 0, ESC = 1, ESC_SKIP = 2, CSI = 3, OSC = 4, OSC_ESC = 5, STR = 6, STR_ESC = 7,
  UTF8 = 8, CHARSET = 9;

// DEC special graphics (ESC ( 0), as curses draws boxes.
const DEC_GRAPHICS = {
  0x60: 0x25c6, 0x61: 0x2592, 0x66: 0xb0, 0x67: 0xb1, 0x6a: 0x2518, 0x6b: 0x2510,
  0x6c: 0x250c, 0x6d: 0x2514, 0x6e: 0x253c, 0x6f: 0x23ba, 0x70: 0x23bb, 0x71: 0x2500,
  0x72: 0x23bc, 0x73: 0x23bd, 0x74: 0x251c, 0x75: 0x2524, 0x76: 0x2534, 0x77: 0x252c,
  0x78: 0x2502, 0x79: 0x2264, 0x7a: 0x2265, 0x7b: 0x3c0, 0x7c: 0x2260, 0x7d: 0xa3, 0x7e: 0xb7,
};

export class Style {
  constructor(fg = DEFAULT, bg = DEFAULT, flags = 0, link = 0) {
    this.fg = fg; this.bg = bg; this.flags = flags; this.link = link;
  }
}

/** A screen row: cells of code points and style ids; 0 is an empty cell. */
class Row {
  constructor(cols) {
    this.cp = new Uint32Array(cols);
    this.st = new Uint32Array(cols);
    this.len = 0; // cells in use, trailing blanks included
    this.wrapped = false; // continues onto the next row (auto-wrap)
    this.time = 0; // time of the record that first wrote it
    this.pos = -1; // and its position in the log: a line's link
    this.off = 0; // and where in that record its first byte is
    this.marks = null; // section markers seen on it
  }

  clear() {
    this.cp.fill(0, 0, this.len); this.st.fill(0, 0, this.len);
    this.len = 0; this.wrapped = false; this.time = 0; this.pos = -1; this.off = 0; this.marks = null;
  }
}

/** A final line: text, and where each style starts in it. */
export class Line {
  constructor(text, spans, wrapped, time, pos, off, marks) {
    this.text = text; // with `\xNN` tokens for bad bytes
    this.spans = spans; // [offset, style id, offset, style id, ...]
    this.wrapped = wrapped;
    this.time = time;
    this.pos = pos; // the record that wrote its first byte (-1: none, an empty line)
    this.off = off; // and where in that record
    this.marks = marks;
  }
}

function hex2(b) { return (b < 16 ? "\\x0" : "\\x") + b.toString(16); }

export class Terminal {
  constructor({ cols = 160, rows = 50, onFinal = null } = {}) {
    this.onFinal = onFinal || (() => {});
    this.styles = [new Style()];
    this.styleIds = new Map([["-1,-1,0,0", 0]]);
    this.links = [""]; // link id -> URL (http and https only)
    this.linkIds = new Map();
    this.time = 0; // of the record being written (set by the caller)
    this.position = -1; // and its position
    this.at = 0; // the offset in it of the byte being drawn
    this.state = GROUND;
    this.utf8 = { need: 0, cp: 0, min: 0, bytes: [], position: -1, at: 0 };
    this.params = []; this.colon = []; this.cur = -1; this.private = 0; this.inter = 0;
    this.osc = []; this.oscDropped = false;
    this.size(cols, rows);
  }

  /** Start a fresh screen of cols x rows, the old one's lines made final. */
  size(cols, rows) {
    if (this.screen) this.flush();
    this.cols = cols; this.rows = rows;
    this.screen = Array.from({ length: rows }, () => new Row(cols));
    this.x = 0; this.y = 0; this.top = 0; this.bottom = rows - 1;
    this.pen = 0; this.penStyle = this.styles[0];
    this.saved = null; this.autowrap = true; this.graphics = false;
    this.tabs = new Uint8Array(cols);
    for (let i = 8; i < cols; i += 8) this.tabs[i] = 1;
  }

  // -- input --------------------------------------------------------------------

  /** Feed bytes (a Uint8Array), in any slicing. */
  write(bytes) {
    const n = bytes.length;
    let i = 0;
    while (i < n) {
      const b = bytes[i];
      if (this.state === GROUND && b >= 0x20 && b < 0x7f && !this.graphics) {
        // The hot path: a run of printable ASCII.
        let j = i + 1;
        while (j < n && bytes[j] >= 0x20 && bytes[j] < 0x7f) j++;
        this.printAscii(bytes, i, j);
        i = j;
        continue;
      }
      this.at = i;
      this.step(b);
      i++;
    }
  }

  /** A line of the agent's own (UTF-8 text), on a line of its own. */
  writeNote(text, style) {
    this.at = 0;
    if (this.x > 0 || this.row().len > 0) this.newline();
    const pen = this.pen;
    this.pen = this.styleId(style);
    for (const ch of text) this.put(ch.codePointAt(0));
    this.pen = pen;
    this.newline();
  }

  /** A section marker (the agent's steps, or in-band ones) on the cursor's line. */
  mark(marker) {
    const row = this.row();
    if (row.pos < 0) { row.time = this.time; row.pos = this.position; row.off = 0; }
    (row.marks || (row.marks = [])).push(marker);
  }

  step(b) {
    switch (this.state) {
      case GROUND:
        if (b < 0x20) this.control(b);
        else if (b < 0x7f) this.put(this.graphics ? (DEC_GRAPHICS[b] || b) : b);
        else if (b === 0x7f) { /* DEL: nothing */ } else this.utf8Start(b);
        return;
      case UTF8: return this.utf8Continue(b);
      case ESC: return this.escape(b);
      case ESC_SKIP: this.state = GROUND; return; // the final byte of ESC # n and the like
      case CHARSET: this.graphics = b === 0x30; this.state = GROUND; return;
      case CSI: return this.csiByte(b);
      case OSC:
        if (b === 0x07) return this.oscEnd();
        if (b === 0x1b) { this.state = OSC_ESC; return; }
        if (b === 0x18 || b === 0x1a) { this.state = GROUND; return; }
        if (this.osc.length < MAX_STRING) this.osc.push(b); else this.oscDropped = true;
        return;
      case OSC_ESC:
        if (b === 0x5c) return this.oscEnd();
        this.state = ESC; return this.escape(b); // an ESC ended it, and starts anew
      case STR: // DCS, APC, PM, SOS: consumed whole, up to the string terminator
        if (b === 0x1b) this.state = STR_ESC;
        else if (b === 0x18 || b === 0x1a) this.state = GROUND;
        return;
      case STR_ESC:
        if (b === 0x5c) { this.state = GROUND; return; }
        this.state = ESC; return this.escape(b);
    }
  }

  control(b) {
    switch (b) {
      case 0x1b: this.state = ESC; return;
      case 0x0d: this.x = 0; return;
      case 0x0a: case 0x0b: case 0x0c: this.newline(); return;
      case 0x08: this.back(1); return;
      case 0x09: this.tab(); return;
      default: return; // BEL, NUL, SO, SI, ...: nothing to draw
    }
  }

  escape(b) {
    this.state = GROUND;
    switch (b) {
      case 0x5b: // [
        this.state = CSI; this.params.length = 0; this.colon.length = 0;
        this.cur = -1; this.private = 0; this.inter = 0; return;
      case 0x5d: this.state = OSC; this.osc.length = 0; this.oscDropped = false; return; // ]
      case 0x50: case 0x5f: case 0x5e: case 0x58: this.state = STR; return; // P _ ^ X
      case 0x28: this.state = CHARSET; return; // ( : G0
      case 0x29: case 0x2a: case 0x2b: case 0x23: case 0x25: case 0x20:
        this.state = ESC_SKIP; return; // G1-G3, DEC line sizes, charset modes
      case 0x37: this.saveCursor(); return; // 7
      case 0x38: this.restoreCursor(); return; // 8
      case 0x44: this.index(); return; // D
      case 0x45: this.newline(); return; // E
      case 0x4d: this.reverseIndex(); return; // M
      case 0x48: if (this.x < this.cols) this.tabs[this.x] = 1; return; // H
      case 0x63: this.reset(); return; // c
      case 0x1b: this.state = ESC; return;
      default: return; // = > and the unknown: consumed
    }
  }

  // -- UTF-8 ----------------------------------------------------------------------

  utf8Start(b) {
    const u = this.utf8;
    if (b >= 0xc2 && b <= 0xdf) { u.need = 1; u.cp = b & 0x1f; u.min = 0x80; }
    else if (b >= 0xe0 && b <= 0xef) { u.need = 2; u.cp = b & 0x0f; u.min = 0x800; }
    else if (b >= 0xf0 && b <= 0xf4) { u.need = 3; u.cp = b & 0x07; u.min = 0x10000; }
    else { this.bad(b); return; }
    u.bytes.length = 0; u.bytes.push(b);
    u.position = this.position; u.at = this.at; // where the character began, for its line
    this.state = UTF8;
  }

  utf8Continue(b) {
    const u = this.utf8;
    if ((b & 0xc0) !== 0x80 || !this.utf8Allowed(b)) {
      // Each byte of the broken sequence is shown; the one that broke it starts anew.
      for (const x of u.bytes) this.bad(x);
      this.state = GROUND;
      this.step(b);
      return;
    }
    u.bytes.push(b);
    u.cp = (u.cp << 6) | (b & 0x3f);
    if (--u.need === 0) {
      this.state = GROUND;
      if (u.cp >= 0x80 && u.cp < 0xa0) return; // C1 controls: nothing to draw
      const position = this.position, at = this.at;
      this.position = u.position; this.at = u.at;
      this.put(u.cp);
      this.position = position; this.at = at;
    }
  }

  /** The second byte's ranges that rule out overlong forms, surrogates and > U+10FFFF. */
  utf8Allowed(b) {
    const u = this.utf8;
    if (u.bytes.length !== 1) return true;
    const lead = u.bytes[0];
    if (lead === 0xe0) return b >= 0xa0;
    if (lead === 0xed) return b < 0xa0;
    if (lead === 0xf0) return b >= 0x90;
    if (lead === 0xf4) return b < 0x90;
    return true;
  }

  bad(b) {
    const pen = this.pen;
    const s = this.penStyle;
    this.pen = this.styleId(new Style(s.fg, s.bg, s.flags | BAD, s.link));
    this.put(0x110000 | b);
    this.pen = pen;
  }

  // -- CSI ----------------------------------------------------------------------------

  csiByte(b) {
    if (b >= 0x30 && b <= 0x39) {
      this.cur = this.cur < 0 ? b - 0x30 : Math.min(this.cur * 10 + b - 0x30, MAX_PARAM);
    } else if (b === 0x3b || b === 0x3a) {
      this.pushParam();
      this.nextColon = b === 0x3a;
    } else if (b >= 0x3c && b <= 0x3f) {
      if (this.params.length === 0 && this.cur < 0) this.private = b; else this.inter = -1;
    } else if (b >= 0x20 && b <= 0x2f) {
      this.inter = this.inter === 0 ? b : -1;
    } else if (b >= 0x40 && b <= 0x7e) {
      this.pushParam();
      this.state = GROUND;
      this.csi(b);
    } else if (b === 0x1b) {
      this.state = ESC;
    } else if (b === 0x18 || b === 0x1a) {
      this.state = GROUND;
    } else if (b < 0x20) {
      this.control(b); // C0 controls act even inside a sequence
    }
    // Anything else (bytes >= 0x7f) is consumed.
  }

  pushParam() {
    if (this.params.length < MAX_PARAMS) {
      this.colon.push(this.params.length > 0 && this.nextColon === true);
      this.params.push(this.cur);
    }
    this.cur = -1; this.nextColon = false;
  }

  /** Parameter i, or `dflt` when absent or zero where zero means one. */
  p(i, dflt) {
    const v = i < this.params.length ? this.params[i] : -1;
    return v <= 0 ? dflt : v;
  }

  csi(final) {
    if (this.inter !== 0) return; // intermediates: DECSCUSR and friends, nothing to draw
    if (this.private !== 0) {
      if (this.private === 0x3f && (final === 0x68 || final === 0x6c)) this.privateMode(final === 0x68);
      return;
    }
    const p0 = this.params.length ? this.params[0] : -1;
    switch (final) {
      case 0x6d: return this.sgr(); // m
      case 0x41: return this.up(this.p(0, 1)); // A
      case 0x42: case 0x65: return this.down(this.p(0, 1)); // B e
      case 0x43: case 0x61: return this.forward(this.p(0, 1)); // C a
      case 0x44: return this.back(this.p(0, 1)); // D
      case 0x45: this.down(this.p(0, 1)); this.x = 0; return; // E
      case 0x46: this.up(this.p(0, 1)); this.x = 0; return; // F
      case 0x47: case 0x60: this.x = Math.min(this.p(0, 1) - 1, this.cols - 1); return; // G `
      case 0x48: case 0x66: return this.moveTo(this.p(0, 1) - 1, this.p(1, 1) - 1); // H f
      case 0x64: this.y = Math.min(this.p(0, 1) - 1, this.rows - 1); return; // d
      case 0x4a: return this.eraseDisplay(Math.max(p0, 0)); // J
      case 0x4b: return this.eraseLine(Math.max(p0, 0)); // K
      case 0x58: return this.eraseChars(this.p(0, 1)); // X
      case 0x50: return this.deleteChars(this.p(0, 1)); // P
      case 0x40: return this.insertChars(this.p(0, 1)); // @
      case 0x4c: return this.insertLines(this.p(0, 1)); // L
      case 0x4d: return this.deleteLines(this.p(0, 1)); // M
      case 0x53: for (let k = Math.min(this.p(0, 1), this.rows); k > 0; k--) this.scrollUp(); return; // S
      case 0x54: for (let k = Math.min(this.p(0, 1), this.rows); k > 0; k--) this.scrollDown(); return; // T
      case 0x72: // r
        if (this.params.length <= 1 && p0 < 0) { this.top = 0; this.bottom = this.rows - 1; return; }
        return this.margins(this.p(0, 1) - 1, this.p(1, this.rows) - 1);
      case 0x73: return this.saveCursor(); // s
      case 0x75: return this.restoreCursor(); // u
      case 0x67: // g
        if (p0 <= 0) { if (this.x < this.cols) this.tabs[this.x] = 0; } else if (p0 === 3) this.tabs.fill(0);
        return;
      default: return; // unknown: consumed
    }
  }

  privateMode(on) {
    for (const m of this.params) if (m === 7) this.autowrap = on; // DECAWM; others do not draw
  }

  sgr() {
    const ps = this.params, colon = this.colon;
    const s = this.penStyle;
    let fg = s.fg, bg = s.bg, flags = s.flags & ~BAD, link = s.link;
    if (ps.length === 0) { fg = bg = DEFAULT; flags = 0; }
    for (let i = 0; i < ps.length; i++) {
      const code = ps[i] < 0 ? 0 : ps[i];
      if (code === 38 || code === 48 || code === 58) {
        let colour = null;
        if (i + 1 < ps.length && colon[i + 1]) { // 38:5:n, 38:2::r:g:b or 38:2:r:g:b
          let j = i + 1;
          const group = [];
          while (j < ps.length && colon[j]) group.push(ps[j++]);
          i = j - 1;
          if (group[0] === 5 && group.length >= 2) colour = palette(group[1]);
          else if (group[0] === 2 && group.length >= 4) colour = rgb(group.slice(-3));
        } else if (ps[i + 1] === 5) { colour = palette(ps[i + 2]); i += 2; }
        else if (ps[i + 1] === 2) { colour = rgb(ps.slice(i + 2, i + 5)); i += 4; }
        else break; // a malformed colour: the rest cannot be parsed
        if (colour === null) continue;
        if (code === 38) fg = colour; else if (code === 48) bg = colour; // 58: underline colour
        continue;
      }
      if (i + 1 < ps.length && colon[i + 1]) { // 4:3 (curly underline) and other sub-parameters
        if (code === 4) flags = ps[i + 1] > 0 ? flags | UNDERLINE : flags & ~UNDERLINE;
        while (i + 1 < ps.length && colon[i + 1]) i++;
        continue;
      }
      if (code === 0) { fg = bg = DEFAULT; flags = 0; }
      else if (code === 1) flags |= BOLD;
      else if (code === 2) flags |= DIM;
      else if (code === 3) flags |= ITALIC;
      else if (code === 4 || code === 21) flags |= UNDERLINE;
      else if (code === 7) flags |= INVERSE;
      else if (code === 9) flags |= STRIKE;
      else if (code === 22) flags &= ~(BOLD | DIM);
      else if (code === 23) flags &= ~ITALIC;
      else if (code === 24) flags &= ~UNDERLINE;
      else if (code === 27) flags &= ~INVERSE;
      else if (code === 29) flags &= ~STRIKE;
      else if (code >= 30 && code <= 37) fg = code - 30;
      else if (code === 39) fg = DEFAULT;
      else if (code >= 40 && code <= 47) bg = code - 40;
      else if (code === 49) bg = DEFAULT;
      else if (code >= 90 && code <= 97) fg = code - 90 + 8;
      else if (code >= 100 && code <= 107) bg = code - 100 + 8;
    }
    this.setPen(new Style(fg, bg, flags, link));
  }

  setPen(style) {
    this.pen = this.styleId(style);
    this.penStyle = this.styles[this.pen];
  }

  styleId(s) {
    const key = `${s.fg},${s.bg},${s.flags},${s.link}`;
    let id = this.styleIds.get(key);
    if (id === undefined) {
      id = this.styles.length;
      this.styles.push(s);
      this.styleIds.set(key, id);
    }
    return id;
  }

  // -- OSC ----------------------------------------------------------------------------

  oscEnd() {
    this.state = GROUND;
    const o = this.osc;
    if (this.oscDropped || o.length < 2 || o[0] !== 0x38 || o[1] !== 0x3b) return; // only OSC 8
    // 8 ; params ; URI: the URI is after the second ';'
    let k = 2;
    while (k < o.length && o[k] !== 0x3b) k++;
    let url = "";
    for (let m = k + 1; m < o.length; m++) {
      if (o[m] <= 0x20 || o[m] >= 0x7f) { url = ""; break; } // URIs are printable ASCII
      url += String.fromCharCode(o[m]);
    }
    const s = this.penStyle;
    this.setPen(new Style(s.fg, s.bg, s.flags, safeUrl(url) ? this.linkId(url) : 0));
  }

  linkId(url) {
    let id = this.linkIds.get(url);
    if (id === undefined) { id = this.links.length; this.links.push(url); this.linkIds.set(url, id); }
    return id;
  }

  // -- drawing ------------------------------------------------------------------------

  row() { return this.screen[this.y]; }

  /** A run of printable ASCII: straight into the row while it fits, else put() wraps. */
  printAscii(bytes, from, to) {
    let i = from;
    while (i < to) {
      if (this.x >= this.cols) { this.at = i; this.put(bytes[i++]); continue; }
      const row = this.screen[this.y];
      if (row.pos < 0) { row.time = this.time; row.pos = this.position; row.off = i; }
      const n = Math.min(to - i, this.cols - this.x);
      const x = this.x, pen = this.pen;
      row.cp.set(bytes.subarray(i, i + n), x);
      row.st.fill(pen, x, x + n);
      this.x = x + n;
      if (this.x > row.len) row.len = this.x;
      i += n;
    }
  }

  put(cp) {
    if (this.x >= this.cols) {
      if (this.autowrap) {
        this.row().wrapped = true;
        this.x = 0;
        this.index();
      } else {
        this.x = this.cols - 1;
      }
    }
    const row = this.screen[this.y];
    row.cp[this.x] = cp;
    row.st[this.x] = this.pen;
    if (row.pos < 0) { row.time = this.time; row.pos = this.position; row.off = this.at; }
    if (++this.x > row.len) row.len = this.x;
  }

  newline() { this.x = 0; this.index(); }

  index() {
    if (this.y === this.bottom) this.scrollUp();
    else if (this.y < this.rows - 1) this.y++;
  }

  reverseIndex() {
    if (this.y === this.top) this.scrollDown();
    else if (this.y > 0) this.y--;
  }

  /** The margins' rows move up one; the top one leaves (final if it leaves the screen). */
  scrollUp() {
    const whole = this.top === 0 && this.bottom === this.rows - 1;
    const gone = whole ? this.screen.shift() : this.screen.splice(this.top, 1)[0];
    if (this.top === 0) this.emit(gone);
    gone.clear();
    if (whole) this.screen.push(gone); else this.screen.splice(this.bottom, 0, gone);
  }

  scrollDown() {
    const gone = this.screen.splice(this.bottom, 1)[0];
    gone.clear();
    this.screen.splice(this.top, 0, gone);
  }

  up(n) { this.y = Math.max(this.y - n, this.y >= this.top ? this.top : 0); this.clampX(); }
  down(n) { this.y = Math.min(this.y + n, this.y <= this.bottom ? this.bottom : this.rows - 1); this.clampX(); }
  forward(n) { this.x = Math.min(this.x + n, this.cols - 1); }
  back(n) { if (this.x >= this.cols) this.x = this.cols - 1; this.x = Math.max(this.x - n, 0); }
  clampX() { if (this.x >= this.cols) this.x = this.cols - 1; }

  moveTo(y, x) {
    this.y = Math.min(Math.max(y, 0), this.rows - 1);
    this.x = Math.min(Math.max(x, 0), this.cols - 1);
  }

  tab() {
    let x = this.x + 1;
    while (x < this.cols && !this.tabs[x]) x++;
    this.x = Math.min(x, this.cols - 1);
  }

  margins(top, bottom) {
    bottom = Math.min(bottom, this.rows - 1);
    if (bottom - top < 1) return;
    this.top = top; this.bottom = bottom;
    this.moveTo(0, 0);
  }

  saveCursor() {
    this.saved = { x: this.x, y: this.y, pen: this.pen, autowrap: this.autowrap,
      graphics: this.graphics };
  }

  restoreCursor() {
    const s = this.saved;
    if (s === null) { this.moveTo(0, 0); this.setPen(new Style()); return; }
    this.x = s.x; this.y = s.y; this.pen = s.pen; this.penStyle = this.styles[s.pen];
    this.autowrap = s.autowrap; this.graphics = s.graphics;
  }

  reset() {
    this.flush();
    this.size(this.cols, this.rows);
  }

  /** Erased cells take the pen's colours, as on a terminal; default ones are empty. */
  blank(row, from, to) {
    const cp = this.pen === 0 ? 0 : 0x20;
    for (let x = from; x < to; x++) { row.cp[x] = cp; row.st[x] = this.pen; }
    if (this.pen !== 0 && to > row.len) row.len = to;
    if (this.pen === 0 && to >= row.len) row.len = Math.min(row.len, from);
  }

  eraseLine(how) {
    const row = this.row();
    this.inBandSection(row);
    if (how === 0) this.blank(row, Math.min(this.x, this.cols), this.cols);
    else if (how === 1) this.blank(row, 0, Math.min(this.x + 1, this.cols));
    else if (how === 2) this.blank(row, 0, this.cols);
  }

  eraseDisplay(how) {
    if (how === 0) {
      for (let y = this.y + 1; y < this.rows; y++) this.blank(this.screen[y], 0, this.cols);
      this.eraseLine(0);
    } else if (how === 1) {
      for (let y = 0; y < this.y; y++) this.blank(this.screen[y], 0, this.cols);
      this.eraseLine(1);
    } else if (how === 2 || how === 3) {
      for (const row of this.screen) { this.blank(row, 0, this.cols); row.wrapped = false; }
    }
  }

  eraseChars(n) { this.blank(this.row(), Math.min(this.x, this.cols), Math.min(this.x + n, this.cols)); }

  deleteChars(n) {
    const row = this.row(), x = Math.min(this.x, this.cols - 1);
    row.cp.copyWithin(x, Math.min(x + n, this.cols));
    row.st.copyWithin(x, Math.min(x + n, this.cols));
    const from = Math.max(this.cols - n, x);
    row.cp.fill(0, from); row.st.fill(0, from);
    row.len = Math.max(Math.min(row.len - n, this.cols), x);
    if (row.len < x) row.len = x;
  }

  insertChars(n) {
    const row = this.row(), x = Math.min(this.x, this.cols - 1);
    row.cp.copyWithin(x + n, x); row.st.copyWithin(x + n, x);
    row.cp.fill(0, x, Math.min(x + n, this.cols)); row.st.fill(0, x, Math.min(x + n, this.cols));
    row.len = Math.min(row.len + n, this.cols);
  }

  insertLines(n) {
    if (this.y < this.top || this.y > this.bottom) return;
    for (let k = Math.min(n, this.bottom - this.y + 1); k > 0; k--) {
      const gone = this.screen.splice(this.bottom, 1)[0];
      gone.clear();
      this.screen.splice(this.y, 0, gone);
    }
    this.x = 0;
  }

  deleteLines(n) {
    if (this.y < this.top || this.y > this.bottom) return;
    for (let k = Math.min(n, this.bottom - this.y + 1); k > 0; k--) {
      const gone = this.screen.splice(this.y, 1)[0];
      gone.clear();
      this.screen.splice(this.bottom, 0, gone);
    }
    this.x = 0;
  }

  /** GitLab's `section_start:TIME:NAME[collapsed=true]` and `section_end:TIME:NAME`,
   * printed and then erased with CSI K: caught as the erase comes. */
  inBandSection(row) {
    const prefix = "section_";
    if (row.len < 14 || row.cp[0] !== 0x73) return; // 's'
    let text = "";
    for (let x = 0; x < Math.min(row.len, 300); x++) text += String.fromCodePoint(row.cp[x] & 0x1fffff || 32);
    if (!text.startsWith(prefix)) return;
    const [kind, , rest] = splitN(text.slice(prefix.length), ":", 3);
    if ((kind !== "start" && kind !== "end") || rest === undefined) return;
    const open = rest.indexOf("[");
    const name = (open >= 0 ? rest.slice(0, open) : rest).trim();
    if (!name) return;
    this.mark({ kind, name, collapsed: open >= 0 && rest.includes("collapsed=true"), source: "gitlab" });
  }

  // -- output ----------------------------------------------------------------------------

  /** Make every row of the screen that holds anything final (a new screen follows). */
  flush() {
    let last = -1;
    for (let y = this.rows - 1; y >= 0; y--) if (this.screen[y].len || this.screen[y].marks) { last = y; break; }
    for (let y = 0; y <= last; y++) { this.emit(this.screen[y]); this.screen[y].clear(); }
    this.x = 0; this.y = 0;
  }

  emit(row) { this.onFinal(this.toLine(row)); }

  /** The rows still on the screen that hold anything, as lines (they may still change). */
  live() {
    let last = -1;
    for (let y = this.rows - 1; y >= 0; y--) if (this.screen[y].len || this.screen[y].marks || y === this.y) { last = y; break; }
    const out = [];
    for (let y = 0; y <= last; y++) out.push(this.toLine(this.screen[y]));
    return out;
  }

  toLine(row) {
    let end = row.len;
    const cp = row.cp, st = row.st;
    while (end > 0 && (cp[end - 1] === 0 || cp[end - 1] === 0x20) && st[end - 1] === 0) end--;
    // Whole runs of plain BMP characters become strings at once: building
    // text one character at a time leaves the garbage collector most of the work.
    const pieces = [];
    const spans = [];
    let length = 0, style = -1, from = 0;
    for (let x = 0; x <= end; x++) {
      const c = x < end ? cp[x] : -1;
      const plain = c > 0 && c < 0xd800;
      if (x < end && plain && st[x] === style) continue;
      if (x > from) {
        const text = String.fromCharCode.apply(null, cp.subarray(from, x));
        pieces.push(text); length += text.length;
      }
      if (x === end) break;
      if (st[x] !== style) { style = st[x]; spans.push(length, style); }
      from = x;
      if (!plain) {
        const text = c === 0 ? " " : c > 0x10ffff ? hex2(c & 0xff) : String.fromCodePoint(c);
        pieces.push(text); length += text.length;
        from = x + 1;
      }
    }
    return new Line(pieces.length === 1 ? pieces[0] : pieces.join(""), spans, row.wrapped,
      row.time, row.pos, row.off, row.marks ? row.marks.slice() : null);
  }

  /** The screen as pyte shows it: `rows` strings of `cols` characters. */
  display() {
    return this.screen.map((row) => {
      let s = "";
      for (let x = 0; x < this.cols; x++) {
        const cp = row.cp[x];
        s += cp === 0 ? " " : cp > 0x10ffff ? "\ufffd" : String.fromCodePoint(cp);
      }
      return s;
    });
  }
}

function splitN(text, sep, n) {
  const out = [];
  let at = 0;
  while (out.length < n - 1) {
    const k = text.indexOf(sep, at);
    if (k < 0) break;
    out.push(text.slice(at, k));
    at = k + sep.length;
  }
  out.push(text.slice(at));
  return out;
}

function palette(n) { return n >= 0 && n <= 255 ? n : null; }

function rgb(parts) {
  if (parts.length !== 3 || parts.some((v) => !(v >= 0 && v <= 255))) return null;
  return RGB | (parts[0] << 16) | (parts[1] << 8) | parts[2];
}

/** Only http(s) URLs become links: never javascript:, data: or anything else. */
export function safeUrl(url) {
  const lower = url.slice(0, 8).toLowerCase();
  return url.length <= 2048 && (lower.startsWith("http://") || lower.startsWith("https://"));
}

/** The CSS colour of a colour value, or null for the default. */
export function cssColour(c, bright = false) {
  if (c === DEFAULT) return null;
  if (c & RGB) return "#" + (c & 0xffffff).toString(16).padStart(6, "0");
  if (c < 16) return `var(--ansi-${bright && c < 8 ? c + 8 : c})`;
  if (c < 232) {
    const v = [0, 95, 135, 175, 215, 255];
    const k = c - 16;
    return `rgb(${v[Math.floor(k / 36)]},${v[Math.floor(k / 6) % 6]},${v[k % 6]})`;
  }
  const g = 8 + (c - 232) * 10;
  return `rgb(${g},${g},${g})`;
}
