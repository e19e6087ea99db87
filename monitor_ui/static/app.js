// Hand-written, no dependencies. Everything from the server goes into the page through
// textContent, never innerHTML: captured traffic is attacker-controlled text.
"use strict";

function cell(row, text, className) {
  const td = row.insertCell();
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function statusBadge(td, status) {
  const span = document.createElement("span");
  span.className = "status " + (status === null ? "s-err" : "s" + Math.floor(status / 100) + "xx");
  span.textContent = status === null ? "error" : String(status);
  td.appendChild(span);
}

function flowRow(tbody, f) {
  const row = tbody.insertRow(0);
  const link = document.createElement("a");
  link.href = "/flows/" + encodeURIComponent(f.id);
  link.textContent = f.started_at;
  row.insertCell().appendChild(link);
  statusBadge(row.insertCell(), f.status);
  cell(row, f.method);
  cell(row, f.path, "path");
  cell(row, f.model || "");
  cell(row, f.stream ? "yes" : "");
  cell(row, f.duration_ms === null ? "" : Math.round(f.duration_ms) + " ms", "num");
  cell(row, f.total_tokens === null ? "" : String(f.total_tokens), "num");
  cell(row, f.client_key_id === null ? "" : "#" + f.client_key_id);
  cell(row, (f.upstream_key_id === null ? "" : "#" + f.upstream_key_id) + (f.attempts > 1 ? " (" + f.attempts + " tries)" : ""));
  row.classList.add("fresh");
}

function liveFlows() {
  const table = document.querySelector("table.flows[data-live]");
  if (!table) return;
  const status = document.getElementById("live-status");
  let newest = Number(table.dataset.newest);
  async function poll() {
    try {
      const response = await fetch(table.dataset.live + "&after=" + newest, {headers: {accept: "application/json"}});
      if (!response.ok) throw new Error(String(response.status));
      const page = await response.json();
      const tbody = table.tBodies[0];
      for (const f of page.flows.slice().reverse()) flowRow(tbody, f);
      if (page.flows.length) {
        newest = Math.max(newest, page.flows[0].id);
        const empty = document.getElementById("flows-empty");
        if (empty) empty.remove();
      }
      if (status) status.textContent = "live";
    } catch (e) {
      if (status) status.textContent = "live updates paused (" + e.message + ")";
    }
    setTimeout(poll, 3000);
  }
  setTimeout(poll, 3000);
}

function copyButtons() {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(source.textContent);
        button.textContent = "Copied";
      } catch (e) {
        const range = document.createRange();
        range.selectNodeContents(source);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
}

function confirmations() {
  // Destructive forms say what they will do and wait for a yes.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

function liveDashboard() {
  const root = document.querySelector("[data-refresh]");
  if (!root) return;
  async function refresh() {
    try {
      const response = await fetch(root.dataset.refresh, {headers: {accept: "text/html"}});
      if (response.ok) {
        // The fragment is rendered by the server with autoescape; parsing it as a document
        // (not innerHTML on the live page) keeps scripts inert, and CSP forbids inline ones anyway.
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = doc.querySelector("[data-refresh]");
        if (fresh) root.replaceChildren(...fresh.childNodes);
      }
    } catch (e) { /* the next round tries again */ }
    setTimeout(refresh, 5000);
  }
  setTimeout(refresh, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  liveFlows();
  copyButtons();
  confirmations();
  liveDashboard();
});
