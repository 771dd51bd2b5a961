// Builders: each with its tags, what it is doing now, and how its last build ended.

import * as api from "../api.js";
import { h, table, empty } from "../dom.js";
import { resultBadge, when } from "../format.js";
import { resourcePage, link, heading } from "../page.js";

/** What a builder is doing: building N, N pending, or idle. */
function state(b) {
  const parts = [];
  if (b.running > 0) parts.push(h("span", { class: "badge r-running" }, `building ${b.running}`));
  if (b.pending > 0) parts.push(h("span", { class: "badge r-pending" }, `${b.pending} pending`));
  return parts.length ? parts : h("span", { class: "muted" }, "idle");
}

function lastBuild(b) {
  const last = b.last_build;
  if (!last) return h("span", { class: "muted" }, "no builds yet");
  return [
    h("a", { href: `#/builds/${last.buildid}`, class: "build-link" }, resultBadge(last.results, { complete: last.complete_at != null, label: `#${last.number}` })),
    " ",
    when(last.complete_at ?? last.started_at),
  ];
}

function render(data) {
  const builders = data.builders ?? [];
  return [
    heading("Builders", h("span", { class: "muted" }, `${builders.length} builders`)),
    builders.length === 0
      ? empty("No builders are configured.")
      : table(
          ["Builder", "Tags", "State", "Last build"],
          builders.map((b) => [
            [link("/builds", { builder: b.name }, h("strong", null, b.name)), b.description ? h("div", { class: "muted small" }, b.description) : null],
            (b.tags ?? []).map((t) => h("span", { class: "tag" }, t)),
            state(b),
            lastBuild(b),
          ]),
          { class: "list builders" },
        ),
  ];
}

export function mount(view) {
  return resourcePage(view, {
    load: () => api.get("builders"),
    render,
    changedBy: (name) => name === "build" || name === "request",
  });
}
