// Prints the final screen of the project's terminal for a file of bytes, as
// JSON lines of text: `node screen.mjs FILE COLS ROWS [CHUNK]`.  CHUNK feeds
// the bytes in slices of that size, to show slicing changes nothing.
import { readFileSync } from "node:fs";
import { Terminal } from "../../agent/web/static/terminal.mjs";

const [file, cols, rows, chunk] = process.argv.slice(2);
const bytes = readFileSync(file);
const term = new Terminal({ cols: Number(cols), rows: Number(rows) });
const step = Number(chunk || bytes.length || 1);
for (let i = 0; i < bytes.length; i += step) term.write(bytes.subarray(i, i + step));
process.stdout.write(JSON.stringify(term.display()));
