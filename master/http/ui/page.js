// What pages share: loading one API resource and loading it again when an event says it
// changed (at most once a second, however busy the farm), links to routes, and paging.

import { h, replace, errorBox } from "./dom.js";
import { count } from "./format.js";

/** Loads again at most once per `gapMs`; a call during a load asks for one more after it. */
export function throttled(load, gapMs = 1000) {
  let running = false;
  let again = false;
  let last = 0;
  async function run() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        const wait = last + gapMs - Date.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        last = Date.now();
        await load();
      } while (again);
    } finally {
      running = false;
    }
  }
  return run;
}

/**
 * A page showing one API resource: `load()` fetches it (one request), `render(data)` makes
 * the page's content, and `changedBy(name, data)` says whether an event means it is stale.
 */
export function resourcePage(view, { load, render, changedBy = () => false }) {
  let closed = false;
  const reload = throttled(async () => {
    try {
      const data = await load();
      if (!closed) replace(view, render(data));
    } catch (e) {
      if (!closed) replace(view, errorBox(e));
    }
  });
  reload();
  return {
    event(name, data) {
      if (changedBy(name, data)) reload();
    },
    resync: reload,
    close() {
      closed = true;
    },
  };
}

/** The link to a route: `route("/builds", {builder: "x"})` is `#/builds?builder=x`. */
export function route(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "" && value !== 0) query.set(key, String(value));
  }
  const text = query.toString();
  return text ? `#${path}?${text}` : `#${path}`;
}

/** A link to a route. */
export function link(path, params, ...children) {
  return h("a", { href: route(path, params) }, children);
}

/** `1–50 of 10,000` with links to the newer and older pages. */
export function pager(path, params, { offset, limit, shown, total }) {
  const first = shown ? offset + 1 : 0;
  const last = offset + shown;
  const more = total != null ? last < total : shown === limit;
  return h(
    "nav",
    { class: "pager" },
    offset > 0 ? link(path, { ...params, offset: Math.max(0, offset - limit) }, "‹ newer") : h("span", { class: "off" }, "‹ newer"),
    h("span", null, total != null ? `${count(first)}–${count(last)} of ${count(total)}` : `${count(first)}–${count(last)}`),
    more ? link(path, { ...params, offset: offset + limit }, "older ›") : h("span", { class: "off" }, "older ›"),
  );
}

/** A page's offset from its route's query. */
export function offsetOf(query) {
  const n = Number.parseInt(query.get("offset") ?? "0", 10);
  return Number.isFinite(n) && n > 0 ? n : 0;
}

/** A page heading with optional things on its right. */
export function heading(title, ...extra) {
  return h("div", { class: "heading" }, h("h1", null, title), extra);
}
