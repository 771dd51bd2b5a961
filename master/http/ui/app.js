// The Kiln web UI: one page, hash routes (`#/builds/12`), each page one API request for its
// data plus the live event stream. No framework and no build step: modern JavaScript modules,
// served by the master as they are written.

import * as api from "./api.js";
import { h, replace, errorBox } from "./dom.js";
import { tick } from "./format.js";
import { Events } from "./events.js";
import * as builders from "./pages/builders.js";
import * as grid from "./pages/grid.js";
import * as builds from "./pages/builds.js";
import * as build from "./pages/build.js";
import * as queue from "./pages/queue.js";
import * as workers from "./pages/workers.js";
import * as force from "./pages/force.js";
import * as modules from "./pages/modules.js";
import * as reporters from "./pages/reporters.js";

/** Routes: a pattern over the hash's path, the page, its title and its nav entry. */
const ROUTES = [
  [/^\/(?:builders)?$/, builders, "Builders", "builders"],
  [/^\/grid$/, grid, "Grid", "grid"],
  [/^\/builds$/, builds, "Builds", "builds"],
  [/^\/builds\/(\d+)$/, build, "Build", "builds"],
  [/^\/queue$/, queue, "Queue", "queue"],
  [/^\/workers$/, workers, "Workers", "workers"],
  [/^\/force$/, force, "Force", "force"],
  [/^\/modules$/, modules, "Step modules", "modules"],
  [/^\/reporters$/, reporters, "Reporters", "reporters"],
];

/** How long the first page waits for the event stream before loading anyway. */
const STREAM_WAIT_MS = 1500;

/** Builds seen in events lately, so a page can follow a request that has already started. */
const RECENT_BUILDS = 200;

const view = document.getElementById("view");
const liveIndicator = document.getElementById("live");
let page = null;
let streamState = "connecting";
const recent = [];
let following = null;

const events = new Events({
  event(name, data) {
    if (name === "build") noteBuild(data);
    page?.event?.(name, data);
  },
  open(reconnected) {
    // Events may have been missed while the stream was down: load the page again.
    if (reconnected) page?.resync?.();
  },
  state(state) {
    streamState = state;
    liveIndicator.className = `stream ${state}`;
    liveIndicator.textContent = state;
    liveIndicator.title = state === "live" ? "updates arrive as they happen" : "live updates are paused; the page may be stale";
  },
});

function noteBuild(b) {
  recent.push(b);
  if (recent.length > RECENT_BUILDS) recent.shift();
  if (following !== null && b.buildrequestid === following) {
    following = null;
    location.hash = `#/builds/${b.buildid}`;
  }
}

/** Opens the build of a request as soon as it starts. */
function follow(requestId) {
  const started = recent.find((b) => b.buildrequestid === requestId);
  if (started) {
    location.hash = `#/builds/${started.buildid}`;
    return;
  }
  following = requestId;
  if (streamState !== "live") poll(requestId, 30);
}

/** Without the event stream, asks every two seconds whether the request has a build. */
async function poll(requestId, tries) {
  await new Promise((resolve) => setTimeout(resolve, 2000));
  if (following !== requestId) return;
  try {
    const data = await api.get("builds", { buildrequestid: requestId, limit: 1 });
    const found = data.builds?.[0];
    if (found) return noteBuild(found);
  } catch {
    // Try again.
  }
  if (tries > 1) poll(requestId, tries - 1);
}

function show() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?", 2);
  page?.close?.();
  page = null;
  following = null;
  for (const [pattern, module, title, nav] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.nav === nav);
    document.title = `${title} · Kiln`;
    replace(view, h("p", { class: "loading" }, "Loading…"));
    page = module.mount(view, { params: match.slice(1), query: new URLSearchParams(query), events, follow });
    return;
  }
  replace(view, errorBox(new Error(`There is no page at #${hash}.`)), h("p", null, h("a", { href: "#/" }, "Go to the builders.")));
}

/** The token box: saves the token, and says who the master takes the user for. */
async function showRole() {
  const role = document.getElementById("role");
  const forget = document.getElementById("forget");
  forget.hidden = !api.token();
  try {
    const auth = await api.get("auth");
    role.textContent = auth.anonymous ? `anonymous · ${auth.role}` : `${auth.name ?? "token"} · ${auth.role}`;
    role.className = auth.role === "none" ? "role bad" : "role";
  } catch (e) {
    const refused = e.status === 401 || e.status === 403;
    role.textContent = refused ? (api.token() ? "token refused" : "token needed") : "";
    role.className = "role bad";
    role.title = e.message;
  }
}

function setUpAuth() {
  const form = document.getElementById("auth");
  const input = document.getElementById("token");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!input.value) return;
    api.setToken(input.value.trim());
    input.value = "";
    showRole();
    page?.resync?.();
  });
  document.getElementById("forget").addEventListener("click", () => {
    api.setToken(null);
    showRole();
    page?.resync?.();
  });
  showRole();
}

async function main() {
  setUpAuth();
  setInterval(() => tick(view), 1000);
  window.addEventListener("hashchange", show);
  await events.start(STREAM_WAIT_MS);
  show();
}

main();
