// Building the page. Every value that came from the server goes into the document as text
// (text nodes, attributes set one by one, URLs checked): nothing here parses HTML, so a log
// line, a property or a step's summary can never become markup or script. The page's
// Content-Security-Policy enforces this (`require-trusted-types-for 'script'` makes any
// assignment of a string to innerHTML throw).

/** Attributes set as DOM properties rather than with setAttribute. */
const PROPERTIES = new Set(["value", "checked", "disabled", "selected", "required", "hidden"]);

/**
 * An element: `h("a", {href: url, class: "x"}, "text", child, [more])`.
 * Children are nodes, strings (inserted as text), arrays of children, or null/false (skipped).
 * `on: {click: fn}` adds listeners; `dataset: {k: v}` sets data attributes.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "on") {
      for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "class") {
      el.className = Array.isArray(value) ? value.filter(Boolean).join(" ") : value;
    } else if (key === "href" || key === "src") {
      el.setAttribute(key, safeUrl(value));
    } else if (key.startsWith("on") || key === "style" || key === "srcdoc") {
      throw new Error(`h: attribute ${key} is not allowed`);
    } else if (PROPERTIES.has(key)) {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Appends children (see `h`) to a node. */
export function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.append(child);
    else parent.append(document.createTextNode(String(child)));
  }
  return parent;
}

/** Replaces a node's children. */
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

/**
 * A URL safe to put in href: the app's own routes (`#/...`), relative paths, and http(s)
 * URLs. Anything else (`javascript:`, `data:`, ...) becomes a dead link.
 */
export function safeUrl(url) {
  const text = String(url ?? "");
  if (text.startsWith("#")) return text;
  try {
    const parsed = new URL(text, document.baseURI);
    if (parsed.protocol === "http:" || parsed.protocol === "https:") return parsed.href;
  } catch {
    // Not a URL at all.
  }
  return "#";
}

/** A table with a header row; `rows` are arrays of cells (children of `td`) or `tr` elements. */
export function table(headers, rows, props = {}) {
  return h(
    "table",
    props,
    h("thead", null, h("tr", null, headers.map((title) => h("th", null, title)))),
    h(
      "tbody",
      null,
      rows.map((row) => (row instanceof Node ? row : h("tr", null, row.map((c) => h("td", null, c))))),
    ),
  );
}

/** The message shown when a page has nothing to list. */
export function empty(text) {
  return h("p", { class: "empty" }, text);
}

/** A box saying what failed, for a page or an action. */
export function errorBox(error) {
  return h("div", { class: "error", role: "alert" }, error.message ?? String(error));
}
