// The live event stream (`GET /api/v2/events`, Server-Sent Events): builds, steps, requests,
// workers, and the lines of the logs the page is showing.
//
// Following a different set of logs means a new stream. The new one opens before the old one
// closes ("make before break"), so no event falls between them; an event may then arrive
// twice, which every consumer tolerates (log lines carry their offset).
//
// An EventSource sends no Authorization header: with a saved token, each stream is opened
// with a short-lived ticket the token buys (api.ticketed).

import * as api from "./api.js";

/** The event names the master sends. */
const NAMES = ["build", "step", "request", "worker", "log"];

/** How long to wait before opening a stream again after the master refused one. */
const RETRY_MS = 5000;

export class Events {
  /**
   * `handler.event(name, data)` for each event; `handler.open(reconnected)` each time a
   * stream opens (`reconnected`: events may have been missed, so pages load again);
   * `handler.state("live" | "connecting" | "offline")` for the indicator.
   */
  constructor(handler) {
    this.handler = handler;
    this.logs = new Set();
    this.source = null;
    this.previous = [];
    this.waiting = [];
    this.retry = null;
    /** Streams asked for; one still fetching its ticket is not open yet. */
    this.asked = 0;
    this.ticketing = false;
  }

  /** Opens the stream; resolves when it is open (or after `timeoutMs`, whichever is first). */
  start(timeoutMs) {
    this.open(false);
    return Promise.race([this.opened(), new Promise((resolve) => setTimeout(resolve, timeoutMs))]);
  }

  /** Resolves when the current stream is open. */
  opened() {
    if (!this.ticketing && this.source?.readyState === EventSource.OPEN) return Promise.resolve();
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  /** Follows one more log; resolves once its lines are being received. */
  watch(logid) {
    if (!this.logs.has(logid)) {
      this.logs.add(logid);
      this.open(false);
    }
    return this.opened();
  }

  /** Stops following a log. */
  unwatch(logid) {
    if (this.logs.delete(logid)) this.open(false);
  }

  async open(reconnected) {
    clearTimeout(this.retry);
    const asked = ++this.asked;
    const ids = [...this.logs].sort((a, b) => a - b);
    let url = ids.length ? `api/v2/events?logs=${ids.join(",")}` : "api/v2/events";
    this.ticketing = true;
    try {
      url = await api.ticketed(url);
    } catch {
      // No ticket (token refused, master away): the plain stream says why, or fails.
    }
    // A later call asked for another stream meanwhile: that one is opened instead.
    if (asked !== this.asked) return;
    this.ticketing = false;
    const source = new EventSource(url);
    if (this.source) this.previous.push(this.source);
    this.source = source;
    let wasOpen = false;
    let missed = reconnected;
    source.onopen = () => {
      if (this.source !== source) {
        // A newer stream replaced this one before it opened: it must not hold a connection.
        source.close();
        return;
      }
      for (const old of this.previous.splice(0)) old.close();
      this.retryMs = 0;
      this.handler.state("live");
      this.handler.open(missed);
      missed = false;
      wasOpen = true;
      for (const resolve of this.waiting.splice(0)) resolve();
    };
    source.onerror = () => {
      if (this.source !== source) {
        source.close();
        return;
      }
      if (wasOpen) missed = true;
      if (source.readyState === EventSource.CLOSED) {
        // Refused (not a stream): try again later with a new one. Whoever waits for the
        // stream goes on without it.
        this.handler.state("offline");
        for (const resolve of this.waiting.splice(0)) resolve();
        // Backing off: a stream refused for good (no token for streams) is not asked for
        // every few seconds forever.
        this.retryMs = Math.min((this.retryMs || RETRY_MS / 2) * 2, 60_000);
        this.retry = setTimeout(() => this.open(true), this.retryMs);
      } else {
        // The browser reconnects by itself.
        this.handler.state("connecting");
      }
    };
    // The master dropped events this stream could not take in time: load the page again.
    source.addEventListener("lagged", () => this.handler.open(true));
    for (const name of NAMES) {
      source.addEventListener(name, (e) => {
        let data;
        try {
          data = JSON.parse(e.data);
        } catch {
          return;
        }
        this.handler.event(name, data);
      });
    }
  }
}
