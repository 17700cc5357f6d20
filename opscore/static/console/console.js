/* Ops-Core console: the little script the server-rendered pages need (no framework, no build step).
 *
 * - [data-live]: a region the server renders; it is fetched again from its data-live URL when the
 *   audit stream (data-stream) commits a record it shows (data-entity-prefix narrows that), at most
 *   every REFRESH_MS and always once more after the last event (a trailing refresh: no update is lost).
 * - [data-feed]: the audit page's live feed: records from the stream, newest first; it resumes after
 *   the last record it received when the server ends the stream (event "end") or the connection drops.
 * - [data-action]: a button that sends the request the API documents (POST, JSON body) with the session
 *   cookie and the page's X-CSRF-Token, and shows the answer; a refusal shows the server's detail.
 * - [data-verify]: the audit page's verification (the last checkpoint is rendered by the server).
 * - img[data-diagram]: says so when the server cannot draw SVG (Graphviz missing).
 */
"use strict";
(function () {
  const REFRESH_MS = 250;
  const FEED_MAX = 500;
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const status = document.getElementById("live-status");

  function showStatus(text) {
    if (!status) return;
    status.hidden = false;
    status.textContent = text;
  }

  // -- a stream that reopens itself after the server ended it --------------------------------------
  function follow(url, onRecord, onOpen) {
    let source = null;
    let lastId = null;
    function open() {
      let target = url;
      if (lastId !== null) {
        const u = new URL(url, location.href);
        u.searchParams.set("after", lastId);
        target = u.pathname + u.search;
      }
      source = new EventSource(target);
      source.addEventListener("open", () => { showStatus("live"); if (onOpen) onOpen(); });
      source.addEventListener("error", () => showStatus("reconnecting…"));
      source.addEventListener("audit", (event) => {
        lastId = event.lastEventId || lastId;
        let record;
        try { record = JSON.parse(event.data); } catch (e) { return; }
        onRecord(record);
      });
      source.addEventListener("end", () => {  // slow consumer or shutdown: resume where we were
        source.close();
        showStatus("resuming…");
        setTimeout(open, 1000);
      });
    }
    open();
    window.addEventListener("pagehide", () => source && source.close());
  }

  // -- live regions ------------------------------------------------------------------------------
  function liveRegion(region) {
    if (region.hasAttribute("data-frozen")) return;  // time travel: a past moment does not change
    let timer = null;
    let inFlight = false;
    let again = false;
    async function refresh() {
      if (inFlight) { again = true; return; }
      inFlight = true;
      try {
        const answer = await fetch(region.dataset.live, { credentials: "same-origin", headers: { Accept: "text/html" } });
        if (answer.status === 401) { showStatus("signed out"); return; }
        if (answer.ok) {
          region.innerHTML = await answer.text();
          watchDiagrams(region);
          region.dispatchEvent(new CustomEvent("opscore:refreshed", { bubbles: true }));
        }
      } catch (e) {
        showStatus("offline?");
      } finally {
        inFlight = false;
        if (again) { again = false; schedule(); }
      }
    }
    function schedule() {
      if (timer !== null) return;
      timer = setTimeout(() => { timer = null; refresh(); }, REFRESH_MS);
    }
    region.opscoreRefresh = schedule;
    const prefix = region.dataset.entityPrefix;
    let opened = false;
    follow(region.dataset.stream, (record) => {
      if (prefix && !(record.entityId === prefix || String(record.entityId).startsWith(prefix + ":"))) return;
      schedule();
    }, () => { if (opened) schedule(); opened = true; });  // after a reconnect, catch up once
  }

  // -- the audit feed ----------------------------------------------------------------------------
  function cell(text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (text instanceof Node) td.appendChild(text); else td.textContent = text;
    return td;
  }
  function badge(text, cls) {
    const span = document.createElement("span");
    span.className = "badge " + cls;
    span.textContent = text;
    return span;
  }
  function entityLink(record) {
    const frag = document.createDocumentFragment();
    frag.append(record.entityType + " ");
    const base = record.entityType === "agent" ? "/console/agents/" : record.entityType === "workflow" ? "/console/runs/" : null;
    if (base) {
      const a = document.createElement("a");
      a.href = base + encodeURIComponent(record.entityId);
      a.textContent = record.entityId;
      frag.append(a);
    } else {
      frag.append(record.entityId);
    }
    return frag;
  }
  function feed(body) {
    const seen = new Set(Array.from(body.querySelectorAll("tr[data-record]"), (tr) => tr.dataset.record));
    const counter = document.getElementById("feed-count");
    const url = new URL(body.dataset.stream, location.href);
    url.searchParams.set("after", body.dataset.after);
    follow(url.pathname + url.search, (r) => {
      const id = String(r.id);
      if (seen.has(id)) return;
      seen.add(id);
      const tr = document.createElement("tr");
      tr.dataset.record = id;
      tr.className = "fresh" + (r.outcome === "rejected" ? " refused" : "");
      tr.append(
        cell(id),
        cell(String(r.recordedAt || "").slice(0, 19).replace("T", " ")),
        cell(entityLink(r)),
        cell(r.event || "—"),
        cell((r.source || "—") + " → " + (r.dest || "—")),
        cell(r.outcome === "rejected" ? badge("refused: " + r.reason, "refused") : badge("applied", "ok")),
        cell(r.actor || ""),
      );
      body.insertBefore(tr, body.firstChild);
      while (body.rows.length > FEED_MAX) body.deleteRow(body.rows.length - 1);
      if (counter) counter.textContent = String(body.rows.length);
    });
  }

  // -- actions -----------------------------------------------------------------------------------
  async function act(button) {
    const scope = button.closest("main") || document;
    const output = scope.querySelector("output.answer");
    const buttons = scope.querySelectorAll("button[data-action]");
    buttons.forEach((b) => { b.disabled = true; });
    let text;
    let ok = false;
    try {
      const answer = await fetch(button.dataset.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
        body: button.dataset.body || "{}",
      });
      let body = {};
      try { body = await answer.json(); } catch (e) { body = {}; }
      ok = answer.ok;
      if (ok) {
        text = `${answer.status} ${button.textContent}: ${body.state ? "now " + body.state : "done"}`;
      } else {
        text = `${answer.status} ${body.code || "error"}: ${body.detail || answer.statusText}`;
      }
    } catch (e) {
      text = "the request did not reach Ops-Core: " + e;
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
    if (output) {
      output.textContent = text;
      output.className = "answer " + (ok ? "ok" : "refused");
    }
    document.querySelectorAll("[data-live]").forEach((r) => r.opscoreRefresh && r.opscoreRefresh());
  }

  // -- verification and checkpoints --------------------------------------------------------------
  async function verify(panel) {
    const out = panel.querySelector(".verify-result");
    out.textContent = "Verifying every hash chain…";
    try {
      const answer = await fetch(panel.dataset.verify, { credentials: "same-origin" });
      const body = await answer.json();
      if (!answer.ok) { out.textContent = `${answer.status} ${body.code}: ${body.detail}`; out.className = "verify-result refused"; return; }
      out.className = "verify-result " + (body.ok ? "ok" : "refused");
      out.textContent = (body.ok ? "✔ every chain verifies: " : "✘ verification failed: ") +
        `${body.records} records of ${body.entities} entities` +
        (body.problems && body.problems.length ? `; ${body.problems.length} problem(s): ` +
          body.problems.slice(0, 5).map((p) => `${p.entityType} ${p.entityId} seq ${p.seq}: ${p.problem}`).join("; ") : "");
    } catch (e) {
      out.textContent = "verification could not be asked: " + e;
    }
  }
  // -- diagrams ------------------------------------------------------------------------------------
  function watchDiagrams(root) {
    root.querySelectorAll("img[data-diagram]").forEach((img) => {
      const broken = () => {
        const note = document.createElement("p");
        note.className = "note";
        note.textContent = "No diagram: the server cannot draw SVG (install Graphviz's dot there).";
        img.replaceWith(note);
      };
      if (img.complete && img.naturalWidth === 0) broken(); else img.addEventListener("error", broken);
    });
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) { event.preventDefault(); act(button); }
    const again = event.target.closest("button[data-verify-again]");
    if (again) verify(again.closest("[data-verify]"));
  });
  document.querySelectorAll("[data-live]").forEach(liveRegion);
  document.querySelectorAll("tbody[data-feed]").forEach(feed);
  document.querySelectorAll("[data-verify]").forEach(verify);
  watchDiagrams(document);
})();
