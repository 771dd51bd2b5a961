// Force a build: a form per force scheduler, made from its parameters (`GET /forceschedulers`).
// After a submit the page follows the new request and opens its build when it starts.

import * as api from "../api.js";
import { h, empty, errorBox, replace } from "../dom.js";
import { resourcePage, heading, link } from "../page.js";

/**
 * A parameter's regex as an input's pattern, or null when the browser would read it
 * differently: patterns are JavaScript regexes in `v` mode, the master's are Rust's. The master
 * checks the value either way.
 */
function pattern(regex) {
  if (!regex) return null;
  try {
    new RegExp(`^(?:${regex})$`, "v");
    return regex;
  } catch {
    return null;
  }
}

/** The input for one parameter; `read()` gives its value for the request, or undefined. */
function field(scheduler, p) {
  const id = `f-${scheduler.name}-${p.name}`;
  const label = h("label", { for: id }, p.label || p.name, p.required ? h("span", { class: "required", title: "required" }, " *") : null);
  let input;
  let read;
  switch (p.type) {
    case "bool":
      input = h("input", { id, name: p.name, type: "checkbox", checked: p.default === true });
      read = () => input.checked;
      return { element: h("div", { class: "field check" }, input, label), read };
    case "int":
      input = h("input", { id, name: p.name, type: "number", step: "1", required: p.required, value: p.default ?? "" });
      // Sent as typed: the master turns it into an integer, or says why it is not one.
      read = () => (input.value === "" ? undefined : input.value);
      break;
    case "choice":
      input = h(
        "select",
        { id, name: p.name, required: p.required },
        (p.choices ?? []).map((c) => h("option", { value: c, selected: c === p.default }, c)),
      );
      read = () => input.value;
      break;
    default:
      input = h("input", { id, name: p.name, type: "text", required: p.required, value: p.default ?? "", pattern: pattern(p.regex), title: p.regex ? `must match ${p.regex}` : null });
      read = () => (input.value === "" && !p.required ? undefined : input.value);
  }
  return { element: h("div", { class: "field" }, label, input), read };
}

function form(scheduler, follow) {
  const builders = (scheduler.builders ?? []).map((name) => ({
    name,
    input: h("input", { type: "checkbox", name: "builder", value: name, checked: true }),
  }));
  const reason = h("input", { type: "text", name: "reason", id: `f-${scheduler.name}-reason`, placeholder: "why this build is wanted" });
  const fields = (scheduler.parameters ?? []).map((p) => ({ name: p.name, ...field(scheduler, p) }));
  const result = h("div", { class: "result" });
  const submit = h("button", { type: "submit", class: "primary" }, "Start build");
  const element = h(
    "form",
    {
      class: "force",
      dataset: { scheduler: scheduler.name },
      on: {
        submit: async (e) => {
          e.preventDefault();
          const parameters = {};
          for (const f of fields) {
            const v = f.read();
            if (v !== undefined) parameters[f.name] = v;
          }
          const body = {
            builders: builders.filter((b) => b.input.checked).map((b) => b.name),
            reason: reason.value,
            parameters,
          };
          submit.disabled = true;
          try {
            const answer = await api.post(`forceschedulers/${encodeURIComponent(scheduler.name)}`, body);
            const requests = answer.buildrequests ?? [];
            replace(
              result,
              h(
                "div",
                { class: "ok" },
                `Submitted buildset ${answer.buildsetid}: `,
                requests.map((r, i) => [i ? ", " : null, `request #${r.buildrequestid} on ${r.builder}`]),
                ". ",
                requests.length === 1 ? "Its build opens when it starts; " : null,
                link("/queue", {}, "see the queue"),
                ".",
              ),
            );
            if (requests.length === 1) follow(requests[0].buildrequestid);
          } catch (err) {
            replace(result, errorBox(err));
          } finally {
            submit.disabled = false;
          }
        },
      },
    },
    h("h2", null, scheduler.label || scheduler.name),
    builders.length > 1
      ? h("fieldset", { class: "builders" }, h("legend", null, "Builders"), builders.map((b) => h("label", { class: "check" }, b.input, b.name)))
      : h("p", { class: "muted" }, `Builds on ${builders.map((b) => b.name).join(", ")}.`),
    h("div", { class: "field" }, h("label", { for: `f-${scheduler.name}-reason` }, "Reason"), reason),
    fields.map((f) => f.element),
    h("div", { class: "actions" }, submit),
    result,
  );
  return element;
}

function render(data, follow) {
  const schedulers = data.forceschedulers ?? [];
  return [
    heading("Force a build"),
    schedulers.length === 0
      ? empty("No force scheduler is configured (add a scheduler with type = \"force\").")
      : h("div", { class: "forms" }, schedulers.map((s) => form(s, follow))),
  ];
}

export function mount(view, ctx) {
  return resourcePage(view, { load: () => api.get("forceschedulers"), render: (data) => render(data, ctx.follow) });
}
