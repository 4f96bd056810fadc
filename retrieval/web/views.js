"use strict";
// The dataset views' tabs: which view shows (?tab=...), its settings in the URL beside the search's (back, forward
// and bookmarks work), arrow keys between the tabs, and what every view shares: thumbnails that open the viewer,
// exports of chosen images. Each view registers {open(params), params()} in VIEWS (duplicates.js, ...).
const TAB_NAMES = ["search", "duplicates", "leakage", "outliers", "map"];
const VIEWS = {};
let currentTab = "search";

function tabUrl(name, searchParams = lastParams || params()) {
  const out = new URLSearchParams(searchParams);
  if (name !== "search") {
    out.set("tab", name);
    for (const [key, value] of VIEWS[name]?.params() || []) out.append(key, value);
  }
  if (token) out.set("token", token);
  const text = out.toString();
  return "/" + (text ? "?" + text : "");
}
function showTab(name, from = new URLSearchParams(location.search)) {
  if (!TAB_NAMES.includes(name)) name = "search";
  currentTab = name;
  document.body.dataset.tab = name;
  for (const button of document.querySelectorAll("#tabs button")) {
    const on = button.dataset.tab === name;
    button.setAttribute("aria-selected", String(on));
    button.tabIndex = on ? 0 : -1;
  }
  if (name !== "search") VIEWS[name]?.open(from);
}
function goTab(name) {  // a new history entry: back returns to the view before
  if (name === currentTab) return;
  const url = tabUrl(name);
  if (location.pathname + location.search !== url) history.pushState(null, "", url);
  showTab(name);
}
function pushViewUrl() {  // a view's own settings changed: a new entry says them
  const url = tabUrl(currentTab);
  if (location.pathname + location.search !== url) history.pushState(null, "", url);
}
// The search's URL keeps the map's settings: searching on the map highlights its hits there.
function withView(asked) {
  if (currentTab === "map") return tabUrl("map", asked);
  if (currentTab !== "search") showTab("search");
  return null;
}
$("tabs").addEventListener("click", (event) => { const button = event.target.closest("button[data-tab]"); if (button) goTab(button.dataset.tab); });
$("tabs").addEventListener("keydown", (event) => {
  const moves = {ArrowLeft: -1, ArrowRight: 1};
  if (!moves[event.key]) return;
  event.preventDefault();
  event.stopPropagation();
  const next = TAB_NAMES[(TAB_NAMES.indexOf(currentTab) + moves[event.key] + TAB_NAMES.length) % TAB_NAMES.length];
  goTab(next);
  $("tab-" + next).focus();
});
window.addEventListener("popstate", () => showTab(new URLSearchParams(location.search).get("tab") || "search"));

// ---------------------------------------------------------------- shared by the views
const baseName = (path) => String(path ?? "").split("/").pop();
function thumbFigure(id, lines = [], badges = "") {
  return `<div class="thumb"><img src="${thumbUrl(id)}" data-open="${id}" tabindex="0" loading="lazy" alt="image ${id}"
      title="image ${id}: open in the viewer">${lines.map((line, i) => `<span class="${i ? "sub" : "name"}" title="${escapeHtml(line)}">${escapeHtml(line)}</span>`).join("")}${badges}</div>`;
}
// A thumbnail anywhere in a view opens the viewer (click, Enter); closing it gives the focus back.
for (const id of ["view-duplicates", "view-leakage", "view-outliers"]) {
  $(id).addEventListener("click", (event) => { const img = event.target.closest("img[data-open]"); if (img) openViewer(img.dataset.open, null); });
  $(id).addEventListener("keydown", (event) => {
    const img = event.target.closest("img[data-open]");
    if (img && event.key === "Enter") { event.preventDefault(); openViewer(img.dataset.open, null); }
  });
}
async function viewCall(url, messageId) {  // a view's report, or null with its one-line error shown
  $(messageId).textContent = "";
  try { return await call(url); } catch (error) { $(messageId).textContent = error.message; return null; }
}
function shortHash(value) { return value ? String(value).slice(0, 10) + "…" : "—"; }

// Every view has registered by then (their scripts follow this one).
window.addEventListener("DOMContentLoaded", () => showTab(new URLSearchParams(location.search).get("tab") || "search"));
