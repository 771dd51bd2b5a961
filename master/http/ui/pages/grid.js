// The grid: recent builds, one row per builder, newest on the left, each a box in its result's
// colour. One page of builds at a time (`GET /builds?limit=&offset=`), however many there are.

import * as api from "../api.js";
import { h, empty } from "../dom.js";
import { resultClass, buildName, fullTime, duration } from "../format.js";
import { resourcePage, link, pager, offsetOf, heading } from "../page.js";

/** Builds per page of the grid. */
const LIMIT = 200;

function box(b) {
  const title = [buildName(b), b.results ?? "running", b.state_string, fullTime(b.started_at), b.complete_at ? duration(b.complete_at - b.started_at) : ""]
    .filter(Boolean)
    .join(" · ");
  return h("a", { href: `#/builds/${b.buildid}`, class: ["box", resultClass(b.results, b.complete)], title }, String(b.number));
}

function render(data, offset) {
  const builds = data.builds ?? [];
  const rows = new Map();
  for (const b of builds) {
    const name = b.builder ?? `builder ${b.builderid}`;
    if (!rows.has(name)) rows.set(name, []);
    rows.get(name).push(b);
  }
  const names = [...rows.keys()].sort();
  const paging = pager("/grid", {}, { offset, limit: LIMIT, shown: builds.length, total: data.meta?.total });
  return [
    heading("Grid", paging),
    builds.length === 0
      ? empty("No builds yet.")
      : h(
          "table",
          { class: "grid" },
          h(
            "tbody",
            null,
            names.map((name) =>
              h("tr", null, h("th", null, link("/builds", { builder: name }, name)), h("td", null, h("div", { class: "boxes" }, rows.get(name).map(box)))),
            ),
          ),
        ),
  ];
}

export function mount(view, ctx) {
  const offset = offsetOf(ctx.query);
  return resourcePage(view, {
    load: () => api.get("builds", { limit: LIMIT, offset, order: "-buildid" }),
    render: (data) => render(data, offset),
    changedBy: (name) => name === "build" && offset === 0,
  });
}
