// How values read: results as coloured badges (Buildbot's colours), times, durations, sizes.

import { h } from "./dom.js";

/** Results as the API spells them, worst last (Buildbot's order). */
export const RESULTS = ["SUCCESS", "WARNINGS", "FAILURE", "SKIPPED", "EXCEPTION", "RETRY", "CANCELLED"];

/** The CSS class of a result, or of a build or step that has none yet. */
export function resultClass(results, complete = results != null) {
  if (results != null && RESULTS.includes(results)) return `r-${results.toLowerCase()}`;
  return complete ? "r-unknown" : "r-running";
}

/** A result as a coloured badge; `running` (or `label`) while there is none. */
export function resultBadge(results, { complete = results != null, label } = {}) {
  const text = label ?? (results != null ? String(results).toLowerCase() : complete ? "unknown" : "running");
  return h("span", { class: ["badge", resultClass(results, complete)] }, text);
}

/** A build's link text: `builder #number`. */
export function buildName(build) {
  return `${build.builder ?? `builder ${build.builderid}`} #${build.number}`;
}

/** `12.3s`, `4m 05s`, `2h 10m`: a duration in milliseconds. */
export function duration(ms) {
  if (ms == null || !Number.isFinite(ms)) return "";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))}ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

/** A span whose text is the time since `start` (ms), kept current by `tick`. */
export function elapsed(start, end) {
  if (start == null) return "";
  if (end != null) return duration(end - start);
  return h("span", { class: "elapsed", dataset: { start: String(start) } }, duration(Date.now() - start));
}

/** Updates every running duration on the page; the app calls this each second. */
export function tick(root = document) {
  const now = Date.now();
  for (const el of root.querySelectorAll(".elapsed")) {
    el.textContent = duration(now - Number(el.dataset.start));
  }
  for (const el of root.querySelectorAll(".relative")) {
    el.textContent = relative(Number(el.dataset.at), now);
  }
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** A time (ms since the epoch) in local time: `14:03:22` today, `03-11 14:03` otherwise. */
export function clock(ms) {
  if (ms == null) return "";
  const d = new Date(ms);
  const now = new Date();
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  if (d.toDateString() === now.toDateString()) return `${time}:${pad(d.getSeconds())}`;
  const date = `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  return d.getFullYear() === now.getFullYear() ? `${date} ${time}` : `${d.getFullYear()}-${date} ${time}`;
}

/** The full local time, for tooltips. */
export function fullTime(ms) {
  return ms == null ? "" : new Date(ms).toLocaleString();
}

/** `in 2m 30s`, `5m 10s ago`. */
export function relative(ms, now = Date.now()) {
  if (ms == null) return "";
  const delta = ms - now;
  if (Math.abs(delta) < 1000) return "now";
  return delta > 0 ? `in ${duration(delta)}` : `${duration(-delta)} ago`;
}

/** A time shown relative to now (kept current by `tick`), the exact time as its tooltip. */
export function when(ms) {
  if (ms == null) return "";
  return h("time", { class: "relative", dataset: { at: String(ms) }, title: fullTime(ms) }, relative(ms));
}

/** A time shown as a clock, the full time as its tooltip. */
export function at(ms) {
  if (ms == null) return "";
  return h("time", { title: fullTime(ms) }, clock(ms));
}

/** `1.5 KiB`, `34.2 MiB`. */
export function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

/** `10,000`. */
export function count(n) {
  return Number(n).toLocaleString("en");
}

/** A JSON value as one line of text (strings without their quotes). */
export function value(v) {
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}
