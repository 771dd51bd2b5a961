// A build: its steps (results, summaries, durations, statistics, URLs, resource use), its
// logs streaming live, its properties and changes, and stop and rebuild. One request for the
// build (`GET /builds/{id}`, steps and logs included); events keep it current; steps and open
// logs are updated in place, never rebuilt, so a log being read stays where it is.

import * as api from "../api.js";
import { h, replace, table, errorBox, empty } from "../dom.js";
import { resultBadge, resultClass, buildName, elapsed, at, bytes, value, when } from "../format.js";
import { LogView } from "../logview.js";
import { throttled, link, heading } from "../page.js";

/** While a running step has no logs yet, how often to look for them. */
const LOG_POLL_MS = 2000;

/** Results whose steps open their logs by themselves. */
const OPEN_ON = new Set(["FAILURE", "EXCEPTION"]);

/** A step's resource figures, when the worker reported them. */
function resources(step) {
  const figures = [];
  const cpu = step.cpu_seconds ?? (step.cpu_ms != null ? step.cpu_ms / 1000 : null);
  if (cpu != null) figures.push(["CPU", `${Number(cpu).toFixed(2)} s`, "CPU time of the step's commands"]);
  if (step.peak_rss_bytes != null) figures.push(["RSS", bytes(step.peak_rss_bytes), "peak resident memory of the step's commands"]);
  if (step.guest_memory_bytes != null) figures.push(["guest", bytes(step.guest_memory_bytes), "peak memory of the step's WebAssembly guest"]);
  if (step.observer_memory_bytes != null) figures.push(["observer", bytes(step.observer_memory_bytes), "peak memory of the step's largest log observer"]);
  return figures.map(([name, v, title]) => h("span", { class: "figure", title }, h("span", { class: "muted" }, `${name} `), v));
}

function statistics(step) {
  return Object.entries(step.statistics ?? {}).map(([k, v]) => h("span", { class: "stat" }, h("span", { class: "muted" }, `${k} `), value(v)));
}

function urls(step) {
  return (step.urls ?? []).map((u) => h("a", { href: u.url, class: "url", target: "_blank", rel: "noopener noreferrer" }, u.name || u.url));
}

/** One step: its row, and a row under it for its open logs. */
class StepView {
  constructor(page) {
    this.page = page;
    this.logs = new Map();
    this.auto = new Set();
    this.cells = {
      number: h("td", { class: "num" }),
      name: h("td", { class: "name" }),
      result: h("td"),
      summary: h("td", { class: "summary" }),
      duration: h("td", { class: "duration" }),
      details: h("td", { class: "details" }),
      logs: h("td", { class: "log-buttons" }),
    };
    this.row = h("tr", { class: "step" }, Object.values(this.cells));
    this.logCell = h("td", { colspan: "7" });
    this.logRow = h("tr", { class: "step-logs", hidden: true }, this.logCell);
    this.element = h("tbody", null, this.row, this.logRow);
  }

  /** Shows `step` (from the build, or from a "step" event without `logs`). */
  update(step) {
    const wasComplete = this.complete === true;
    const merged = { ...this.step, ...step };
    this.step = merged;
    const complete = merged.complete_at != null || merged.results != null;
    this.complete = complete;
    const started = merged.started_at != null;
    this.element.className = merged.hidden ? "hidden-step" : "";
    this.element.dataset.stepid = String(merged.stepid);
    this.cells.number.textContent = String(merged.number ?? "");
    this.cells.name.textContent = merged.name ?? "";
    replace(this.cells.result, started || complete ? resultBadge(merged.results, { complete }) : h("span", { class: "badge r-pending" }, "pending"));
    // The result's colour marks the step's number cell (see style.css).
    this.row.dataset.result = resultClass(merged.results, complete || !started).slice(2);
    this.cells.summary.textContent = merged.state_string ?? "";
    replace(this.cells.duration, elapsed(merged.started_at, merged.complete_at));
    replace(this.cells.details, statistics(merged), urls(merged), resources(merged));
    // The last lines may have come after the last event the page saw.
    if (complete && !wasComplete) for (const view of this.logs.values()) view.catchUp();
    if (step.logs) this.updateLogs(step.logs, complete);
  }

  updateLogs(logs, complete) {
    this.logList = logs;
    replace(
      this.cells.logs,
      logs.map((log) =>
        h(
          "button",
          {
            type: "button",
            class: ["log-toggle", this.logs.has(log.logid) ? "open" : null],
            dataset: { logid: String(log.logid) },
            title: `${log.num_lines ?? 0} lines`,
            on: { click: () => this.toggle(log) },
          },
          log.name,
        ),
      ),
    );
    // Logs of a running or failed step open by themselves, once.
    const open = !complete || OPEN_ON.has(this.step.results);
    for (const log of logs) {
      if (open && !this.auto.has(log.logid)) {
        this.auto.add(log.logid);
        if (!this.logs.has(log.logid)) this.toggle(log);
      }
    }
  }

  toggle(log) {
    const view = this.logs.get(log.logid);
    if (view) {
      view.close();
      view.element.remove();
      this.logs.delete(log.logid);
    } else {
      const created = new LogView({ ...log }, this.page.events);
      this.logs.set(log.logid, created);
      this.logCell.append(created.element);
      created.start();
    }
    this.logRow.hidden = this.logs.size === 0;
    for (const button of this.cells.logs.querySelectorAll("button")) {
      button.classList.toggle("open", this.logs.has(Number(button.dataset.logid)));
    }
  }

  close() {
    for (const view of this.logs.values()) view.close();
  }
}

class BuildPage {
  constructor(view, ctx) {
    this.view = view;
    this.id = Number(ctx.params[0]);
    this.events = ctx.events;
    this.follow = ctx.follow;
    this.steps = new Map();
    this.closed = false;
    this.header = h("div", { class: "build-header" });
    this.stepsBody = h("table", { class: "steps" });
    this.extra = h("div", { class: "build-extra" });
    this.reload = throttled(() => this.load());
    this.reload();
  }

  async load() {
    let build;
    try {
      build = await api.get(`builds/${this.id}`);
    } catch (e) {
      if (!this.closed && !this.build) replace(this.view, heading(`Build ${this.id}`), errorBox(e));
      return;
    }
    if (this.closed) return;
    if (!this.build) {
      replace(this.view, this.header, h("h2", null, "Steps"), this.stepsBody, this.extra);
    }
    this.build = build;
    this.renderHeader();
    for (const step of build.steps ?? []) this.step(step);
    this.renderExtra();
    this.pollForLogs();
  }

  /** A step's view, made and placed in order the first time it is seen. */
  step(step) {
    let view = this.steps.get(step.stepid);
    if (!view) {
      view = new StepView(this);
      this.steps.set(step.stepid, view);
      const later = [...this.steps.values()].find((v) => v !== view && (v.step?.number ?? 0) > (step.number ?? 0));
      this.stepsBody.insertBefore(view.element, later?.element ?? null);
    }
    view.update(step);
    return view;
  }

  /** A running step may not have made its logs when the build was read: look again soon. */
  pollForLogs() {
    clearTimeout(this.logTimer);
    const waiting = [...this.steps.values()].some((v) => v.step.complete_at == null && v.step.started_at != null && !(v.logList ?? []).length);
    if (waiting && !this.build.complete) this.logTimer = setTimeout(() => this.reload(), LOG_POLL_MS);
  }

  renderHeader() {
    const b = this.build;
    const actions = [];
    if (!b.complete) {
      actions.push(this.action("Stop", "danger", `builds/${b.buildid}/stop`, { reason: "stopped from the web UI" }));
    } else {
      actions.push(this.action("Rebuild", null, `builds/${b.buildid}/rebuild`, {}));
    }
    const facts = [
      ["Builder", link("/builds", { builder: b.builder }, b.builder ?? "")],
      ["Worker", b.worker ? link("/workers", {}, b.worker) : h("span", { class: "muted" }, "none yet")],
      ["Started", at(b.started_at)],
      [
        "Finished",
        b.complete_at != null
          ? at(b.complete_at)
          : b.estimated_finish_at != null
            ? h("span", { class: "eta", title: "estimated from its steps' progress against the builder's last good build" }, "expected ", when(b.estimated_finish_at))
            : h("span", { class: "muted" }, "running"),
      ],
      ["Duration", elapsed(b.started_at, b.complete_at)],
      ["Reason", b.buildset?.reason ?? ""],
      ["Request", b.buildrequestid != null ? `#${b.buildrequestid}` : ""],
    ];
    replace(
      this.header,
      heading([resultBadge(b.results, { complete: b.complete }), " ", buildName(b)], h("span", { class: "actions" }, actions)),
      // The state says more than the badge only when it is not just the result.
      b.state_string && b.state_string.toUpperCase() !== String(b.results).toUpperCase()
        ? h("p", { class: ["state", resultClass(b.results, b.complete)] }, b.state_string)
        : null,
      h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v)))),
    );
    document.title = `${buildName(b)} · Kiln`;
  }

  action(label, style, path, body) {
    const button = h("button", {
      type: "button",
      class: style,
      on: {
        click: async () => {
          button.disabled = true;
          try {
            const answer = await api.post(path, body);
            const requests = answer?.buildrequests ?? [];
            if (requests.length === 1) this.follow(requests[0].buildrequestid);
            this.reload();
          } catch (e) {
            button.replaceWith(errorBox(e));
          }
        },
      },
    }, label);
    return button;
  }

  renderExtra() {
    const b = this.build;
    const properties = Object.entries(b.properties ?? {}).sort(([x], [y]) => x.localeCompare(y));
    const changes = b.changes ?? [];
    replace(
      this.extra,
      h("h2", null, "Properties"),
      properties.length === 0
        ? empty("No properties.")
        : table(
            ["Name", "Value", "Source"],
            properties.map(([name, [v, source] = []]) => [h("code", null, name), h("code", { class: "value" }, value(v)), h("span", { class: "muted" }, source ?? "")]),
            { class: "list properties" },
          ),
      h("h2", null, "Changes"),
      changes.length === 0
        ? empty("No changes: this build was forced or started by a timer.")
        : table(
            ["Revision", "Author", "Branch", "Comments", "Files", "When"],
            changes.map((c) => [
              c.revlink ? h("a", { href: c.revlink, target: "_blank", rel: "noopener noreferrer" }, h("code", null, (c.revision ?? "").slice(0, 12))) : h("code", null, (c.revision ?? "").slice(0, 12)),
              c.author ?? "",
              c.branch ?? "",
              h("span", { title: c.comments ?? "" }, (c.comments ?? "").split("\n")[0]),
              String((c.files ?? []).length),
              when(c.when_timestamp ?? c.when),
            ]),
            { class: "list changes" },
          ),
    );
  }

  event(name, data) {
    if (!this.build) {
      // The first load may have read the build before this: load again once it is done.
      if (name !== "log" && data.buildid === this.id) this.reload();
      return;
    }
    if (name === "log") {
      // Log events name their log; the page follows only its own.
      for (const step of this.steps.values()) step.logs.get(data.logid)?.add(data.offset, data.lines ?? []);
      return;
    }
    if (data.buildid !== this.id) return;
    if (name === "build") {
      const finished = data.complete && !this.build.complete;
      Object.assign(this.build, data);
      this.renderHeader();
      // The final properties and statistics come with the whole build.
      if (finished) this.reload();
    } else if (name === "step") {
      const known = this.steps.get(data.stepid);
      this.step(data);
      // A new step's logs, and a finished step's figures, come with the whole build.
      if (!known || data.complete_at != null) this.reload();
    }
  }

  resync() {
    this.reload();
    for (const step of this.steps.values()) for (const view of step.logs.values()) view.catchUp();
  }

  close() {
    this.closed = true;
    clearTimeout(this.logTimer);
    for (const step of this.steps.values()) step.close();
  }
}

export function mount(view, ctx) {
  return new BuildPage(view, ctx);
}
