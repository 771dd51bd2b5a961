// Step modules uploaded to the master (`kiln step upload`): steps, observers and policies by
// name and version.

import * as api from "../api.js";
import { h, table, empty } from "../dom.js";
import { bytes, at } from "../format.js";
import { resourcePage, heading } from "../page.js";

function render(data) {
  const modules = data.stepmodules ?? [];
  return [
    heading("Step modules", h("span", { class: "muted" }, "upload with kiln step upload FILE.wasm --name NAME")),
    modules.length === 0
      ? empty("No modules have been uploaded; builders use the built-in steps.")
      : table(
          ["Name", "Version", "Kind", "Size", "SHA-256", "Uploaded", "In use"],
          modules.map((m) => [
            h("strong", null, m.name),
            [m.version ?? "", m.latest ? [" ", h("span", { class: "tag" }, "latest")] : null],
            h("span", { class: "tag" }, m.kind ?? ""),
            bytes(m.size),
            h("code", { title: m.sha256 ?? "" }, (m.sha256 ?? "").slice(0, 16)),
            at(m.uploaded_at),
            (m.used_by ?? []).length ? m.used_by.join(", ") : m.in_use ? "yes" : h("span", { class: "muted" }, "no"),
          ]),
          { class: "list modules" },
        ),
  ];
}

export function mount(view) {
  return resourcePage(view, { load: () => api.get("stepmodules"), render });
}
