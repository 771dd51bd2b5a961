// The queue: build requests not yet complete, with when they should start and finish, and a
// button to cancel each.

import * as api from "../api.js";
import { h, table, empty, errorBox } from "../dom.js";
import { when, at } from "../format.js";
import { resourcePage, link, pager, offsetOf, heading } from "../page.js";

/** Requests per page. */
const LIMIT = 100;

function cancelButton(r, reload) {
  const button = h("button", {
    type: "button",
    class: "danger",
    on: {
      click: async () => {
        button.disabled = true;
        try {
          await api.post(`buildrequests/${r.buildrequestid}/cancel`, {});
          reload();
        } catch (e) {
          button.replaceWith(errorBox(e));
        }
      },
    },
  }, "Cancel");
  return button;
}

function state(r) {
  if (r.claimed) return h("span", { class: "badge r-running" }, "building");
  return h("span", { class: "badge r-pending" }, "waiting");
}

function render(data, offset, reload) {
  const requests = data.buildrequests ?? [];
  return [
    heading("Queue", pager("/queue", {}, { offset, limit: LIMIT, shown: requests.length, total: data.meta?.total })),
    requests.length === 0
      ? empty("Nothing is waiting: every request has been built.")
      : table(
          ["Request", "Builder", "State", "Priority", "Submitted", "Reason", "Starts", "Finishes", ""],
          requests.map((r) => [
            `#${r.buildrequestid}`,
            link("/builds", { builder: r.builder }, r.builder ?? `builder ${r.builderid}`),
            state(r),
            String(r.priority ?? 0),
            at(r.submitted_at),
            r.reason ?? "",
            r.claimed ? h("span", { class: "muted" }, "started") : r.estimated_start_at != null ? when(r.estimated_start_at) : h("span", { class: "muted" }, "unknown"),
            r.estimated_finish_at != null ? when(r.estimated_finish_at) : h("span", { class: "muted" }, "unknown"),
            cancelButton(r, reload),
          ]),
          { class: "list queue" },
        ),
  ];
}

export function mount(view, ctx) {
  const offset = offsetOf(ctx.query);
  const page = resourcePage(view, {
    load: () => api.get("buildrequests", { complete: "false", limit: LIMIT, offset }),
    render: (data) => render(data, offset, () => page.resync()),
    changedBy: (name) => name === "request" || name === "build",
  });
  return page;
}
