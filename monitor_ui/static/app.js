// Hand-written, no dependencies. Everything from the server goes into the page through
// textContent, never innerHTML: captured traffic is attacker-controlled text.
"use strict";

function cell(row, text, className, label) {
  const td = row.insertCell();
  if (className) td.className = className;
  if (label) td.dataset.label = label;
  if (text) td.textContent = text;
  return td;
}

function statusBadge(status) {
  const span = document.createElement("span");
  span.className = "status " + (status === null ? "s-err" : "s" + Math.floor(status / 100) + "xx");
  span.textContent = status === null ? "error" : String(status);
  return span;
}

// The same link as the server's query.link(): this list's filters plus one more.
function filterLink(name, value, content, title) {
  const params = new URLSearchParams(location.search);
  for (const unused of ["before", "limit", "after"]) params.delete(unused);
  for (const [key, v] of [...params]) if (!v) params.delete(key);
  params.set(name, String(value));
  const link = document.createElement("a");
  link.className = "filter";
  link.href = "/flows?" + params.toString();
  link.title = title;
  if (typeof content === "string") link.textContent = content; else link.appendChild(content);
  return link;
}

// Text that may wrap after each slash, as a word wraps, rather than inside a name (the server's
// breaks_at_slash filter, monitor_ui/views.py).
function breaksAtSlash(element, text) {
  text.split("/").forEach((part, i) => {
    if (i) element.append("/", document.createElement("wbr"));
    element.append(part);
  });
}

function ms(value) {
  return value === null || value === undefined ? "" : Math.round(value) + " ms";
}

// Mirrors templates/_flow_row.html.
function flowRow(tbody, f) {
  const row = tbody.insertRow(0);
  const link = document.createElement("a");
  link.href = "/flows/" + encodeURIComponent(f.id);
  link.title = f.started_at;
  const year = document.createElement("span");
  year.className = "year";
  year.textContent = f.started_at.slice(0, 5);
  link.append(year, f.started_at.slice(5, 10) + " " + f.started_at.slice(11, 19));
  cell(row, "", "c-time").appendChild(link);
  cell(row, "", "c-status").appendChild(filterLink("status", f.status === null ? "error" : f.status, statusBadge(f.status), "Only this status"));
  const request = cell(row, "", "c-path");
  const method = document.createElement("span");
  method.className = "method";
  method.textContent = f.method;
  const path = document.createElement("span");
  path.className = "path";
  breaksAtSlash(path, f.path);
  request.append(method, " ", path);
  if (f.tags || f.session) {
    const labels = document.createElement("span");
    labels.className = "labels";
    for (const tag of (f.tags || "").split(",").filter(Boolean)) {
      const link = filterLink("tag", tag, tag, "Only this tag");
      link.classList.add("tag");
      labels.append(" ", link);
    }
    if (f.session) {
      const link = filterLink("session", f.session, "session " + f.session, "Only this session");
      link.classList.add("session");
      labels.append(" ", link);
    }
    request.appendChild(labels);
  }
  if (f.prompt_preview || f.answer_preview) {
    const preview = document.createElement("span");
    preview.className = "preview";
    for (const [name, text, title] of [["prompt", f.prompt_preview, "The prompt's last user message"], ["answer", f.answer_preview, "The answer"]]) {
      if (!text) continue;
      const part = document.createElement("span");
      part.className = name;
      part.title = title;
      part.textContent = text;
      preview.appendChild(part);
    }
    request.appendChild(preview);
  }
  const model = cell(row, "", "c-model");
  if (f.model) model.appendChild(filterLink("model", f.model, f.model, "Only this model"));
  if (f.fallback_model) {
    const fallback = document.createElement("span");
    fallback.className = "meta fallback";
    fallback.title = "asked " + f.model + ", answered by " + f.fallback_model;
    fallback.textContent = "answered by " + f.fallback_model;
    model.append(" ", fallback);
  }
  if (f.stream) {
    const flag = document.createElement("span");
    flag.className = "meta";
    flag.textContent = "stream";
    model.append(" ", flag);
  }
  cell(row, ms(f.duration_ms), "num c-duration", "took");
  cell(row, ms(f.first_byte_ms), "num c-first-byte", "first byte");
  cell(row, f.total_tokens === null ? "" : String(f.total_tokens), "num c-tokens", "tokens");
  cell(row, f.cost === null ? "" : "$" + f.cost.toFixed(4), "num c-cost", "cost");
  const client = cell(row, "", "c-client", "client");
  if (f.client_key_id !== null) client.appendChild(filterLink("client", f.client_key_id, f.client, "Only this client"));
  const group = cell(row, "", "c-group", "group");
  if (f.group_id !== null) {
    const label = document.createElement("span");
    breaksAtSlash(label, f.group);
    group.appendChild(filterLink("group", f.group_id, label, "Only this group"));
  }
  const key = cell(row, "", "c-key", "key");
  if (f.upstream_key_id !== null) key.appendChild(filterLink("key", f.upstream_key_id, f.upstream_key, "Only this key"));
  if (f.attempts > 1) {
    const tries = document.createElement("span");
    tries.className = "meta";
    tries.textContent = "(" + f.attempts + " tries)";
    key.append(" ", tries);
  }
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
        if (fresh) {
          root.replaceChildren(...fresh.childNodes);
          afterRefresh();
        }
      }
    } catch (e) { /* the next round tries again */ }
    setTimeout(refresh, 5000);
  }
  setTimeout(refresh, 5000);
}

// Chart values on hover (mouse) or tap (touch): one tip for the page, so the dashboard's
// refresh, which replaces the charts, never leaves a stale one behind in them.
let afterRefresh = () => {};

function chartTips() {
  const tip = document.createElement("div");
  tip.className = "chart-tip";
  tip.id = "chart-tip";
  tip.setAttribute("role", "status");
  tip.hidden = true;
  document.body.appendChild(tip);
  let active = null;
  function show(hit) {
    if (active) active.classList.remove("active");
    active = hit;
    hit.classList.add("active");
    tip.textContent = hit.dataset.tip;
    tip.hidden = false;
    const box = hit.getBoundingClientRect();
    const plot = hit.ownerSVGElement.getBoundingClientRect();
    const left = Math.min(Math.max(box.left + box.width / 2 - tip.offsetWidth / 2, 4), innerWidth - tip.offsetWidth - 4);
    tip.style.left = (left + scrollX) + "px";
    tip.style.top = (plot.top + scrollY - tip.offsetHeight - 4) + "px";
  }
  function hide() {
    if (active) active.classList.remove("active");
    active = null;
    tip.hidden = true;
  }
  // After the dashboard refreshed, point at the same bucket of the same chart, with its new figures.
  afterRefresh = () => {
    if (!active || active.isConnected) return;
    const figure = active.closest("figure.chart");
    const fresh = figure && document.querySelector(
      "#" + figure.id + ' svg.plot .hit[data-bucket="' + active.dataset.bucket + '"]');
    if (fresh) show(fresh); else hide();
  };
  const hitOf = (event) => event.target instanceof Element ? event.target.closest("svg.plot .hit") : null;
  document.addEventListener("pointerover", (event) => { const hit = hitOf(event); if (hit) show(hit); });
  document.addEventListener("click", (event) => { const hit = hitOf(event); if (hit) show(hit); else hide(); });
  document.addEventListener("pointerout", (event) => {
    if (event.pointerType === "mouse" && hitOf(event) && !(event.relatedTarget instanceof Element && event.relatedTarget.closest("svg.plot .hit"))) hide();
  });
}

// A login refused for too many wrong keys says how long to wait, counting down. The form stays
// usable: the right admin key is always accepted.
function loginWait() {
  const notice = document.querySelector("[data-retry-after]");
  if (!notice) return;
  let left = Number(notice.dataset.retryAfter);
  const tick = () => {
    left -= 1;
    notice.textContent = left > 0
      ? "Too many wrong admin keys from this address: try again in " + left + " s. The right admin key is not locked out."
      : "You may try again now.";
    if (left > 0) setTimeout(tick, 1000);
  };
  setTimeout(tick, 1000);
}

// A table wider than its box scrolls inside it; the box says so while there is more to see.
function scrollHints() {
  const update = (wrap) => {
    const more = wrap.scrollWidth - wrap.clientWidth > 1;
    wrap.classList.toggle("scrolls", more);
    wrap.classList.toggle("at-end", !more || wrap.scrollLeft + wrap.clientWidth >= wrap.scrollWidth - 1);
  };
  const observer = new ResizeObserver((entries) => { for (const e of entries) update(e.target); });
  const watch = () => {
    for (const wrap of document.querySelectorAll(".table-wrap:not([data-watched])")) {
      wrap.dataset.watched = "1";
      observer.observe(wrap);
      wrap.addEventListener("scroll", () => update(wrap), {passive: true});
      update(wrap);
    }
  };
  watch();
  const refreshed = afterRefresh;
  afterRefresh = () => { refreshed(); watch(); };
  for (const details of document.querySelectorAll("details")) details.addEventListener("toggle", watch);
}

document.addEventListener("DOMContentLoaded", () => {
  chartTips();
  scrollHints();
  loginWait();
  liveFlows();
  copyButtons();
  confirmations();
  liveDashboard();
});
