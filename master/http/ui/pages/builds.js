// Builds, newest first, of every builder or of one, a page at a time.

import * as api from "../api.js";
import { h, table, empty } from "../dom.js";
import { resultBadge, at, elapsed } from "../format.js";
import { resourcePage, link, pager, offsetOf, heading } from "../page.js";

/** Builds per page. */
const LIMIT = 50;

function render(data, builder, offset) {
  const builds = data.builds ?? [];
  const params = { builder };
  return [
    heading(builder ? `Builds of ${builder}` : "Builds", pager("/builds", params, { offset, limit: LIMIT, shown: builds.length, total: data.meta?.total })),
    builds.length === 0
      ? empty("No builds.")
      : table(
          ["Build", "Result", "Summary", "Worker", "Started", "Duration"],
          builds.map((b) => [
            h("a", { href: `#/builds/${b.buildid}` }, builder ? `#${b.number}` : `${b.builder} #${b.number}`),
            resultBadge(b.results, { complete: b.complete }),
            b.state_string ?? "",
            b.worker ? link("/workers", {}, b.worker) : "",
            at(b.started_at),
            elapsed(b.started_at, b.complete_at),
          ]),
          { class: "list builds" },
        ),
  ];
}

export function mount(view, ctx) {
  const builder = ctx.query.get("builder");
  const offset = offsetOf(ctx.query);
  return resourcePage(view, {
    load: () => api.get("builds", { builder, limit: LIMIT, offset, order: "-buildid" }),
    render: (data) => render(data, builder, offset),
    changedBy: (name, b) => name === "build" && offset === 0 && (!builder || b.builder === builder),
  });
}
