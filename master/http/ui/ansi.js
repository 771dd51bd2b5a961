// ANSI escape codes in log lines: SGR sequences (colours, bold, italic, underline) become
// styled segments; every other escape (cursor movement, erasing, titles, hyperlinks) is
// dropped. The text itself is never interpreted.

/**
 * Escape sequences: CSI (`ESC [ params intermediates final`), OSC (`ESC ] ... BEL|ESC \`,
 * possibly cut off at the end of the line), other `ESC intermediates final` sequences, and a
 * lone ESC at the end.
 */
const ESCAPE = /\x1b(?:\[([\x30-\x3f]*)([\x20-\x2f]*)([\x40-\x7e])|\][^\x07\x1b]*(?:\x07|\x1b\\|$)|[\x20-\x2f]*[\x30-\x7e]|$)/g;

/** The 256-colour palette above the 16 named colours, as CSS colours. */
function palette(n) {
  if (n < 232) {
    const levels = [0, 95, 135, 175, 215, 255];
    const i = n - 16;
    return `rgb(${levels[Math.floor(i / 36)]}, ${levels[Math.floor(i / 6) % 6]}, ${levels[i % 6]})`;
  }
  const grey = 8 + 10 * (n - 232);
  return `rgb(${grey}, ${grey}, ${grey})`;
}

/** A colour: `{index: 0..15}` (styled by the stylesheet) or `{css: "rgb(...)"}`. */
function extendedColour(params, i) {
  if (params[i + 1] === 5 && params[i + 2] != null) {
    const n = params[i + 2];
    return [n < 16 ? { index: n } : n < 256 ? { css: palette(n) } : null, i + 2];
  }
  if (params[i + 1] === 2 && params[i + 4] != null) {
    const [r, g, b] = params.slice(i + 2, i + 5).map((c) => Math.min(255, c));
    return [{ css: `rgb(${r}, ${g}, ${b})` }, i + 4];
  }
  return [null, params.length];
}

/**
 * The graphic state of one stream of lines (terminals keep colours across line ends, so a
 * log keeps one `Ansi` per channel).
 */
export class Ansi {
  constructor() {
    this.reset();
  }

  reset() {
    this.bold = false;
    this.dim = false;
    this.italic = false;
    this.underline = false;
    this.strike = false;
    this.fg = null;
    this.bg = null;
  }

  /** Applies the parameters of one SGR sequence. */
  sgr(text) {
    const params = text === "" ? [0] : text.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
    for (let i = 0; i < params.length; i++) {
      const p = params[i];
      if (p === 0) this.reset();
      else if (p === 1) this.bold = true;
      else if (p === 2) this.dim = true;
      else if (p === 3) this.italic = true;
      else if (p === 4) this.underline = true;
      else if (p === 9) this.strike = true;
      else if (p === 21 || p === 22) this.bold = this.dim = false;
      else if (p === 23) this.italic = false;
      else if (p === 24) this.underline = false;
      else if (p === 29) this.strike = false;
      else if (p >= 30 && p <= 37) this.fg = { index: p - 30 };
      else if (p === 38) [this.fg, i] = extendedColour(params, i);
      else if (p === 39) this.fg = null;
      else if (p >= 40 && p <= 47) this.bg = { index: p - 40 };
      else if (p === 48) [this.bg, i] = extendedColour(params, i);
      else if (p === 49) this.bg = null;
      else if (p >= 90 && p <= 97) this.fg = { index: p - 90 + 8 };
      else if (p >= 100 && p <= 107) this.bg = { index: p - 100 + 8 };
      // Anything else (blink, inverse, fonts, ...) is ignored.
    }
  }

  /** The current style: CSS classes and CSS colours for what the classes cannot name. */
  style() {
    const classes = [];
    if (this.bold) classes.push("a-bold");
    if (this.dim) classes.push("a-dim");
    if (this.italic) classes.push("a-italic");
    if (this.underline) classes.push("a-underline");
    if (this.strike) classes.push("a-strike");
    if (this.fg?.index != null) classes.push(`a-fg${this.fg.index}`);
    if (this.bg?.index != null) classes.push(`a-bg${this.bg.index}`);
    return { classes, color: this.fg?.css ?? null, background: this.bg?.css ?? null };
  }

  /**
   * Splits a line into segments `{text, classes, color, background}`; escape sequences are
   * consumed and never appear in the text.
   */
  parse(line) {
    const segments = [];
    let last = 0;
    const push = (text) => {
      if (text) segments.push({ text, ...this.style() });
    };
    for (const match of line.matchAll(ESCAPE)) {
      push(line.slice(last, match.index));
      last = match.index + match[0].length;
      if (match[3] === "m" && match[2] === "" && !/[<=>?]/.test(match[1])) this.sgr(match[1]);
    }
    push(line.slice(last));
    return segments;
  }
}
