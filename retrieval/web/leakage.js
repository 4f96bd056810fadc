"use strict";
// The leakage view (GET /api/leakage, `mi leakage --json`): splits by a stored field or by two or more folder
// prefixes (the folder facet's values offered), then per pair of splits what is in both (patients and studies, by
// pseudonym and UID only), exact and near duplicates across, the offending images side by side.
const leak = {key: null};
const LEAK_CHECKS = [["same_images", "images in both"], ["patients", "patients in both"], ["studies", "studies in both"],
                     ["exact_duplicates", "exact duplicates across"], ["near_duplicates", "near duplicates across"]];
const LEAK_SHOWN = 60;  // items shown per finding; the count says how many there are

function splitRow(name = "", folder = "") {
  const row = document.createElement("div");
  row.className = "split-row";
  const n = $("leak-folders").children.length + 1;
  row.innerHTML = `<input name="split-name" aria-label="split ${n}: name" placeholder="name" value="${escapeHtml(name)}">
    <input name="split-folder" aria-label="split ${n}: folder" list="l-under" placeholder="a folder (the folder facet's)" value="${escapeHtml(folder)}">
    <button type="button" data-remove-split aria-label="remove split ${n}">✕</button>`;
  $("leak-folders").append(row);
}
function splitsGiven() {
  return [...$("leak-folders").querySelectorAll(".split-row")].map((row) => [row.querySelector("[name=split-name]").value.trim(),
    row.querySelector("[name=split-folder]").value.trim()]).filter(([name, folder]) => name && folder);
}
const byField = () => document.querySelector("input[name=leak-how]:checked").value === "field";

VIEWS.leakage = {
  params() {
    const out = byField() ? [["by", $("leak-field").value]] : splitsGiven().map(([name, folder]) => ["split", `${name}=${folder}`]);
    if (out.length) out.push(["threshold", $("leak-threshold").value]);
    return out;
  },
  open(from) {
    const splits = from.getAll("split");
    if (from.get("by")) {
      document.querySelector("input[name=leak-how][value=field]").checked = true;
      $("leak-field").value = from.get("by");
    } else if (splits.length) {
      document.querySelector("input[name=leak-how][value=folders]").checked = true;
    }
    if (splits.length || !$("leak-folders").children.length) {
      $("leak-folders").innerHTML = "";
      for (const split of splits) { const at = split.indexOf("="); splitRow(split.slice(0, at), split.slice(at + 1)); }
      while ($("leak-folders").children.length < 2) splitRow();
    }
    if (from.get("threshold")) $("leak-threshold").value = from.get("threshold");
    if (from.get("by") || splits.length) loadLeakage();
    else $("leak-summary").textContent = "Give two or more splits: folders (the folder facet's values are offered) or a stored field.";
  },
};

async function loadLeakage() {
  const asked = new URLSearchParams(VIEWS.leakage.params());
  if (leak.key === asked.toString()) return;
  leak.key = asked.toString();
  $("leak-summary").innerHTML = '<span class="spinner"></span>Checking the splits…';
  $("leak-pairs").innerHTML = "";
  const report = await viewCall("/api/leakage?" + asked, "leak-message");
  if (leak.key !== asked.toString()) return;
  if (!report) { leak.key = null; $("leak-summary").textContent = ""; return; }
  showLeakage(report);
}

function showLeakage(report) {
  const splits = Object.entries(report.splits).map(([name, n]) => `${escapeHtml(name)} <b>${n}</b>`).join(", ");
  const notes = [...report.notes, ...(report.without_patient ? [`${report.without_patient} images have no patient pseudonym: they cannot be checked by patient`] : [])];
  $("leak-summary").innerHTML = `${report.images.toLocaleString("en")} images; splits: ${splits}; ${report.unassigned} in no split · `
    + (report.leakage ? '<span class="leaks">leakage found</span>' : '<span class="clean">the splits are clean</span>')
    + notes.map((note) => `<br>Note: ${escapeHtml(note)}.`).join("");
  $("leak-pairs").innerHTML = report.pairs.map((pair) => pairCard(pair, report.threshold)).join("");
}

function pairCard(pair, threshold) {
  const [a, b] = pair.splits;
  const counts = LEAK_CHECKS.filter(([check]) => pair[check]).map(([check, words]) =>
    `<tr data-check="${check}"><td>${words}${check === "near_duplicates" ? ` (cosine ≥ ${threshold})` : ""}</td><td>${pair[check].count}</td></tr>`).join("");
  const findings = [
    keyed(pair.patients, "patient", "Patients in both (pseudonyms)", a, b),
    keyed(pair.studies, "study_instance_uid", "Studies in both", a, b),
    across(pair.exact_duplicates, "Exact duplicates across", "relation"),
    across(pair.near_duplicates, "Near duplicates across", "similarity"),
    pair.same_images.count ? `<div class="finding"><h4>Images in both splits (${pair.same_images.count})</h4><div class="row">${pair.same_images.items.slice(0, LEAK_SHOWN).map((item) => thumbFigure(item.id, [`image ${item.id}`])).join("")}</div></div>` : "",
  ].join("");
  return `<article class="card leak-pair" data-pair="${escapeHtml(a)}/${escapeHtml(b)}" aria-label="splits ${escapeHtml(a)} and ${escapeHtml(b)}">
    <h3>${escapeHtml(a)} / ${escapeHtml(b)} ${pair.leaks ? '<span class="leaks">LEAKAGE</span>' : '<span class="clean">clean</span>'}</h3>
    <table class="counts">${counts}</table>${findings}</article>`;
}

function keyed(found, keyName, title, a, b) {
  if (!found?.count) return "";
  const items = found.items.slice(0, LEAK_SHOWN).map((item) => {
    const side = (name) => `<div class="side" data-split="${escapeHtml(name)}"><span class="side-name">${escapeHtml(name)}</span><div class="row">${item.images[name].map((id) => thumbFigure(id, [`image ${id}`])).join("")}</div></div>`;
    return `<div class="card key-item" data-key="${escapeHtml(item[keyName])}"><div class="view-summary" title="${escapeHtml(item[keyName])}">${keyName === "patient" ? "patient " + escapeHtml(shortHash(item[keyName])) : "study " + escapeHtml(item[keyName])}</div>
      <div class="sides">${side(a)}${side(b)}</div></div>`;
  }).join("");
  return `<div class="finding" data-finding="${keyName}"><h4>${title} (${found.count})</h4>${items}${moreNote(found)}</div>`;
}

function across(found, title, extra) {
  if (!found?.count) return "";
  const pairs = found.items.slice(0, LEAK_SHOWN).map((item) => {
    const [i, j] = item.ids, [si, sj] = item.splits;
    const link = extra === "similarity" ? `cosine ${item.similarity.toFixed(4)}` : escapeHtml(item.relation);
    return `<div class="pair" data-ids="${i},${j}">${thumbFigure(i, [si, `image ${i}`])}<span class="link">⇄<br>${link}</span>${thumbFigure(j, [sj, `image ${j}`])}</div>`;
  }).join("");
  return `<div class="finding" data-finding="${extra}"><h4>${title} (${found.count})</h4><div class="pairs">${pairs}</div>${moreNote(found)}</div>`;
}
const moreNote = (found) => found.count > LEAK_SHOWN ? `<p class="view-summary">… and ${found.count - LEAK_SHOWN} more (mi leakage --csv lists them all)</p>` : "";

$("leak-add").addEventListener("click", () => { splitRow(); $("leak-folders").lastElementChild.querySelector("input").focus(); });
$("leak-folders").addEventListener("click", (event) => {
  if (event.target.closest("[data-remove-split]")) event.target.closest(".split-row").remove();
});
$("leak-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (!byField() && splitsGiven().length < 2) { $("leak-message").textContent = "give at least two splits, each a name and a folder"; return; }
  pushViewUrl();
  loadLeakage();
});
