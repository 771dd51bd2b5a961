// Reporters (`[[reporters]]`): each with its deliveries counted by state, and the deliveries
// that failed lately: what was wrong, after how many attempts, and when the next one is due.
// One request, `GET /api/v2/reporters`.

import * as api from "../api.js";
import { h, table, empty } from "../dom.js";
import { when, count } from "../format.js";
import { resourcePage, heading } from "../page.js";

/**
 * How often the page loads again by itself: retries come due without an event on the
 * stream (the master's reporter task looks at its queue as often).
 */
const REFRESH_MS = 5000;

/** Delivery states in the order shown, with their badge colours. */
const STATES = [
  ["pending", "r-pending"],
  ["delivered", "r-success"],
  ["failed", "r-failure"],
  ["skipped", "r-skipped"],
  ["superseded", "r-cancelled"],
];

/** A reporter's deliveries by state: a badge per state that has any. */
function counts(r) {
  const d = r.deliveries ?? {};
  const shown = STATES.filter(([state]) => Number(d[state] ?? 0) > 0);
  if (shown.length === 0) return h("span", { class: "muted" }, "nothing yet");
  return shown.map(([state, colour]) =>
    h("span", { class: ["badge", colour, "count"], dataset: { state } }, `${count(d[state])} ${state}`),
  );
}

/** What a delivery was about: a build links to its page. */
function subject(d) {
  const event = String(d.event ?? "");
  if (event.startsWith("build.")) return h("a", { href: `#/builds/${Number(d.subject)}` }, `build ${d.subject}`);
  if (event.startsWith("buildset.")) return `buildset ${d.subject}`;
  return String(d.subject ?? "");
}

/** A failed delivery's row: retrying (with the next attempt's time) or given up. */
function failureRow(r, d, retrying) {
  return h(
    "tr",
    { class: retrying ? "retrying" : "failed" },
    h("td", null, h("strong", null, r.name)),
    h("td", null, h("code", null, d.event ?? "")),
    h("td", null, subject(d)),
    h("td", null, h("span", { class: ["badge", retrying ? "r-warnings" : "r-failure"] }, retrying ? "retrying" : "failed")),
    h("td", { class: "num" }, String(d.attempts ?? "")),
    h("td", { class: "delivery-error" }, d.last_error ?? ""),
    h("td", null, retrying ? when(d.next_attempt_at) : h("span", { class: "muted" }, "not retried")),
    h("td", null, when(d.created_at)),
  );
}

function render(data) {
  const reporters = data.reporters ?? [];
  const failures = reporters.flatMap((r) => [
    ...(r.retrying ?? []).map((d) => failureRow(r, d, true)),
    ...(r.recent_failures ?? []).map((d) => failureRow(r, d, false)),
  ]);
  const troubled = reporters.filter((r) => (r.retrying ?? []).length || (r.recent_failures ?? []).length).length;
  return [
    heading(
      "Reporters",
      h("span", { class: troubled ? "bad" : "muted" }, troubled ? `${troubled} of ${reporters.length} failing` : `${reporters.length} configured`),
    ),
    reporters.length === 0
      ? empty("No reporters are configured; add [[reporters]] to kiln.toml to tell the outside world about builds.")
      : table(
          ["Reporter", "Type", "Builders", "Deliveries"],
          reporters.map((r) => [
            h("strong", null, r.name),
            h("span", { class: "tag" }, r.type ?? ""),
            [
              r.builders == null ? h("span", { class: "muted" }, "all") : r.builders.join(", "),
              r.buildsets ? [" ", h("span", { class: "tag" }, "buildsets")] : null,
            ],
            counts(r),
          ]),
          { class: "list reporters" },
        ),
    reporters.length === 0
      ? null
      : [
          h("h2", null, "Recent failures"),
          failures.length === 0
            ? empty("No delivery has failed lately.")
            : table(["Reporter", "Event", "About", "State", "Attempts", "Error", "Next attempt", "Queued"], failures, {
                class: "list failures",
              }),
        ],
  ];
}

export function mount(view) {
  const page = resourcePage(view, {
    load: () => api.get("reporters"),
    render,
    changedBy: (name) => name === "build",
  });
  const timer = setInterval(() => page.resync(), REFRESH_MS);
  return {
    ...page,
    close() {
      clearInterval(timer);
      page.close();
    },
  };
}
