// The master's REST API (`/api/v2`), with the user's token when one is saved.
// URLs are relative to the page, so the UI works behind a proxy that mounts the master under
// a path.

const TOKEN_KEY = "kiln.token";

/** The saved API token, or null. */
export function token() {
  return localStorage.getItem(TOKEN_KEY);
}

/** Saves (or with an empty value, forgets) the API token. */
export function setToken(value) {
  if (value) localStorage.setItem(TOKEN_KEY, value);
  else localStorage.removeItem(TOKEN_KEY);
}

/** An API call that failed: the message is the API's own `error` when it gave one. */
export class ApiError extends Error {
  constructor(method, path, status, message) {
    super(`${method} /api/v2/${path}: ${message} (HTTP ${status})`);
    this.status = status;
  }
}

/** A path with query parameters; `null`/`undefined` values are left out, arrays repeat. */
export function path(base, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === "") continue;
    for (const v of Array.isArray(value) ? value : [value]) query.append(key, String(v));
  }
  const text = query.toString();
  return text ? `${base}?${text}` : base;
}

async function call(method, apiPath, body) {
  const headers = { Accept: "application/json" };
  const saved = token();
  if (saved) headers.Authorization = `Bearer ${saved}`;
  const init = { method, headers };
  if (body !== undefined) {
    // The master refuses cross-site actions; a JSON content type is part of how it tells.
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`api/v2/${apiPath}`, init);
  } catch (e) {
    throw new ApiError(method, apiPath, 0, `the master could not be reached (${e.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON: the status says what happened.
  }
  if (!response.ok) {
    // The master's errors say what to do (which role, how to make a token).
    throw new ApiError(method, apiPath, response.status, data?.error ?? (response.statusText || "failed"));
  }
  return data;
}

/** `GET /api/v2/<path>` with query parameters. */
export function get(apiPath, params) {
  return call("GET", path(apiPath, params));
}

/**
 * A URL of the API that a browser opens by itself (the event stream, a raw log), which sends
 * no token: with a saved token it carries a short-lived ticket for it instead
 * (`POST /api/v2/auth/ticket`); without one it is the plain URL.
 */
export async function ticketed(url) {
  if (!token()) return url;
  const { ticket } = await post("auth/ticket");
  return `${url}${url.includes("?") ? "&" : "?"}ticket=${encodeURIComponent(ticket)}`;
}

/** `POST /api/v2/<path>` with a JSON body. */
export function post(apiPath, body = {}) {
  return call("POST", apiPath, body);
}
