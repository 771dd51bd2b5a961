// A log, shown live: its lines so far from `GET /logs/{id}/contents`, then the lines of "log"
// events as they come. Lines carry their offset, so a line seen twice (a fetch and an event
// overlapping) is shown once, and a gap (events missed) is filled by fetching from where the
// view stopped. stdout, stderr and Kiln's header lines each have their own style; ANSI colours
// are rendered; every line is text.

import * as api from "./api.js";
import { Ansi } from "./ansi.js";
import { h, append } from "./dom.js";
import { count } from "./format.js";

/** Most lines kept on the page; a longer log shows its tail (the raw log has it all). */
const MAX_LINES = 5000;

/** Lines asked for per request. */
const PAGE = 2000;

/** Channels as the API names them, and their classes. */
const CHANNELS = { o: "ch-o", e: "ch-e", h: "ch-h" };

/**
 * Opens a raw log with a ticket when the user has a token (a link sends none). The window
 * opens at once, while the click still counts as the user's, and goes to the log when the
 * ticket comes.
 */
function rawWithTicket(event) {
  if (!api.token()) return;
  event.preventDefault();
  const target = window.open("about:blank", "_blank");
  if (target) target.opener = null;
  const href = event.currentTarget.getAttribute("href");
  api.ticketed(href).then(
    (url) => (target ? (target.location.href = new URL(url, location.href).href) : location.assign(url)),
    () => target?.close(),
  );
}

export class LogView {
  /** `log`: `{logid, name, num_lines, complete}` from the build. */
  constructor(log, events) {
    this.log = log;
    this.events = events;
    this.next = null;
    this.first = 0;
    this.pending = [];
    this.fetching = false;
    this.again = false;
    this.closed = false;
    this.ansi = { o: new Ansi(), e: new Ansi(), h: new Ansi() };
    this.note = h("div", { class: "log-note", hidden: true });
    this.body = h("div", { class: "log-lines", tabindex: "0" });
    this.status = h("span", { class: "log-count" }, `${count(log.num_lines ?? 0)} lines`);
    this.element = h(
      "section",
      { class: "log", dataset: { logid: String(log.logid) } },
      h(
        "header",
        null,
        h("strong", null, log.name),
        this.status,
        h("a", { href: `api/v2/logs/${encodeURIComponent(log.logid)}/raw`, target: "_blank", rel: "noopener", on: { click: rawWithTicket } }, "raw"),
      ),
      this.note,
      this.body,
    );
  }

  /** Starts showing the log: follows it first (if it may still grow), then fetches. */
  async start() {
    if (!this.log.complete) await this.events.watch(this.log.logid);
    if (!this.closed) await this.catchUp();
  }

  /** Stops following the log. */
  close() {
    this.closed = true;
    this.events.unwatch(this.log.logid);
  }

  /** Lines from an event (or a fetch): `offset` is the first one's line number. */
  add(offset, lines) {
    if (this.next === null || offset > this.next) {
      // Not loaded yet, or lines were missed: keep these until the fetch fills the gap.
      this.pending.push([offset, lines]);
      if (this.next !== null) this.catchUp();
      return;
    }
    const skip = this.next - offset;
    if (skip >= lines.length) return;
    this.render(lines.slice(skip), this.next);
    this.next = offset + lines.length;
    this.showCount();
  }

  /** `12 lines · live` in the log's header. */
  showCount() {
    const total = Math.max(this.total ?? 0, this.next ?? 0);
    this.status.textContent = `${count(total)} lines${this.log.complete ? "" : " · live"}`;
  }

  /** Fetches the lines after the last one shown (the tail of a long log at first). */
  async catchUp() {
    if (this.fetching) {
      this.again = true;
      return;
    }
    this.fetching = true;
    try {
      // A bounded loop: each round moves forward or ends.
      for (let round = 0; round < 100 && !this.closed; round++) {
        this.again = false;
        const before = this.next;
        const from = this.next ?? Math.max(0, (this.log.num_lines ?? 0) - MAX_LINES);
        const data = await api.get(`logs/${encodeURIComponent(this.log.logid)}/contents`, { offset: from, limit: PAGE });
        if (this.closed) return;
        if (this.next === null) {
          this.next = data.offset;
          this.first = data.offset;
        }
        this.add(data.offset, data.lines ?? []);
        const pending = this.pending.splice(0).sort((a, b) => a[0] - b[0]);
        for (const [offset, lines] of pending) {
          if (offset <= this.next) this.add(offset, lines);
          else this.pending.push([offset, lines]);
        }
        this.log.complete = data.complete;
        this.total = data.num_lines;
        this.showCount();
        const more = (data.lines ?? []).length > 0 && this.next < (data.num_lines ?? 0);
        if (!more && (this.next === before || (!this.again && this.pending.length === 0))) break;
      }
    } catch (e) {
      append(this.body, h("div", { class: "line ch-error" }, e.message));
    } finally {
      this.fetching = false;
    }
  }

  /** Appends lines numbered from `offset`, keeping the view at the bottom if it was there. */
  render(lines, offset) {
    const follow = this.body.scrollHeight - this.body.scrollTop - this.body.clientHeight < 8;
    const fragment = document.createDocumentFragment();
    lines.forEach(([channel, text], i) => {
      const ch = Object.hasOwn(CHANNELS, channel) ? channel : "o";
      const line = h("div", { class: ["line", CHANNELS[ch]], dataset: { n: String(offset + i + 1) } });
      for (const segment of this.ansi[ch].parse(String(text ?? ""))) {
        if (segment.classes.length === 0 && !segment.color && !segment.background) {
          line.append(segment.text);
          continue;
        }
        const span = h("span", { class: segment.classes }, segment.text);
        // CSSOM, not a style attribute: allowed by the page's CSP.
        if (segment.color) span.style.color = segment.color;
        if (segment.background) span.style.backgroundColor = segment.background;
        line.append(span);
      }
      fragment.append(line);
    });
    this.body.append(fragment);
    let extra = this.body.childElementCount - MAX_LINES;
    while (extra-- > 0) {
      this.body.firstElementChild.remove();
      this.first += 1;
    }
    if (this.first > 0) {
      this.note.hidden = false;
      this.note.textContent = `${count(this.first)} earlier lines are not shown; the raw log has them all.`;
    }
    if (follow) this.body.scrollTop = this.body.scrollHeight;
  }
}
