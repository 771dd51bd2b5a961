// Workers: connected or not, health, notes, paused or quarantined, what each is building,
// with buttons to pause and unpause.

import * as api from "../api.js";
import { h, table, empty, errorBox } from "../dom.js";
import { when, fullTime } from "../format.js";
import { resourcePage, heading } from "../page.js";

/** The master's word for a worker's state, and its badge's colour and label. */
const STATES = {
  paused: ["r-retry", "paused"],
  quarantined: ["r-exception", "quarantined"],
  offline: ["r-cancelled", "offline"],
  draining: ["r-warnings", "draining"],
  busy: ["r-running", "building"],
  idle: ["r-success", "idle"],
};

/** A worker's state (the master's `state`) as one badge. */
function state(w) {
  const [colour, label] = STATES[w.state] ?? ["r-unknown", String(w.state ?? "unknown")];
  const title = w.state === "quarantined" && w.quarantine_until != null ? `until ${fullTime(w.quarantine_until)}` : null;
  const text = w.state === "offline" && w.latent ? `latent, ${w.latent}` : label;
  return h("span", { class: ["badge", colour], title }, text);
}

function health(w) {
  if (w.health == null) return h("span", { class: "muted" }, "unknown");
  const bad = w.health !== "ok";
  return [
    h("span", { class: bad ? "bad" : null }, w.health),
    w.failure_count ? h("span", { class: "muted" }, ` · ${w.failure_count} failures`) : null,
    w.quarantine_until != null && w.quarantine_until > Date.now() ? [h("br"), "quarantined until ", when(w.quarantine_until)] : null,
  ];
}

/** A current build: the API gives ids or build objects. */
function buildLink(b) {
  if (typeof b === "number") return h("a", { href: `#/builds/${b}` }, `build ${b}`);
  const id = b.buildid ?? b.build ?? b.id;
  const label = b.builder ? `${b.builder}${b.number != null ? ` #${b.number}` : ""}` : `build ${id}`;
  return id != null ? h("a", { href: `#/builds/${id}` }, label) : label;
}

function info(w) {
  const i = w.info ?? {};
  return [i.os, i.arch, ...(i.tags ?? [])].filter(Boolean).map((t) => h("span", { class: "tag" }, String(t)));
}

function actions(w, reload) {
  const action = w.paused ? "unpause" : "pause";
  const button = h("button", {
    type: "button",
    on: {
      click: async () => {
        button.disabled = true;
        try {
          await api.post(`workers/${encodeURIComponent(w.name)}/${action}`, {});
          reload();
        } catch (e) {
          button.replaceWith(errorBox(e));
        }
      },
    },
  }, w.paused ? "Unpause" : "Pause");
  return button;
}

function render(data, reload) {
  const workers = data.workers ?? [];
  return [
    heading("Workers", h("span", { class: "muted" }, `${workers.filter((w) => w.connected).length} of ${workers.length} connected`)),
    workers.length === 0
      ? empty("No workers are configured.")
      : table(
          ["Worker", "State", "Health", "Notes", "Building", "Platform", ""],
          workers.map((w) => [
            [h("strong", null, w.name), w.sandbox ? h("span", { class: "tag" }, "sandbox") : null],
            state(w),
            health(w),
            w.notes ? h("span", { class: "notes" }, w.notes) : "",
            (w.builds ?? []).map((b, i) => [i ? ", " : null, buildLink(b)]),
            info(w),
            actions(w, reload),
          ]),
          { class: "list workers" },
        ),
  ];
}

export function mount(view) {
  const page = resourcePage(view, {
    load: () => api.get("workers"),
    render: (data) => render(data, () => page.resync()),
    changedBy: (name) => name === "worker",
  });
  return page;
}
