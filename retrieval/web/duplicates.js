"use strict";
// The duplicates view (GET /api/duplicates, `mi duplicates --json`): clusters side by side, each member's thumbnail
// with how it relates to the cluster's first (same file content, SOP, study, series, patient pseudonym; another
// transfer syntax or size), a threshold control, members selected per cluster and exported.
const dup = {key: null, report: null, chosen: new Map()};  // chosen: cluster number -> its member ids

VIEWS.duplicates = {
  params() {
    const out = [["threshold", $("dup-threshold").value]];
    if (!$("dup-near").checked) out.push(["near", "false"]);
    if ($("dup-limit").value !== "50") out.push(["limit", $("dup-limit").value]);
    return out;
  },
  open(from) {
    if (from.get("threshold")) $("dup-threshold").value = from.get("threshold");
    $("dup-near").checked = from.get("near") !== "false";
    const limit = from.get("limit") || "50";
    if (![...$("dup-limit").options].some((option) => option.value === limit)) $("dup-limit").add(new Option(limit));
    $("dup-limit").value = limit;
    loadDuplicates();
  },
};

async function loadDuplicates() {
  const asked = new URLSearchParams({threshold: $("dup-threshold").value, near: String($("dup-near").checked),
                                     limit: $("dup-limit").value});
  if (dup.key === asked.toString()) return;
  dup.key = asked.toString();
  $("dup-summary").innerHTML = '<span class="spinner"></span>Looking for duplicates…';
  $("view-duplicates").setAttribute("aria-busy", "true");
  const report = await viewCall("/api/duplicates?" + asked, "dup-message");
  if (dup.key !== asked.toString()) return;  // a newer request is on its way
  $("view-duplicates").removeAttribute("aria-busy");
  if (!report) { dup.key = null; $("dup-summary").textContent = ""; return; }
  dup.report = report;
  dup.chosen.clear();
  showDuplicates();
}

function memberBadges(member, index, members) {
  // Which earlier member this one is a copy of (same file bytes, or same SOP Instance UID and frame), then how it
  // relates to the cluster's first: same series, study, patient pseudonym; another transfer syntax, size, format.
  const first = members[0], badges = [];
  const copyOf = (group) => member[group] != null && members.slice(0, index).find((m) => m[group] === member[group]);
  const sameFile = copyOf("content_group"), sameSop = !sameFile && copyOf("sop_group");
  if (sameFile) badges.push(["same", `same file as #${sameFile.id}`]);
  else if (sameSop) badges.push(["same", `same SOP as #${sameSop.id}`]);
  if (index === 0) badges.push(["", "first"]);
  else {
    const same = (field) => member[field] != null && member[field] === first[field];
    if (same("series_instance_uid")) badges.push(["same", "same series"]);
    else if (same("study_instance_uid")) badges.push(["same", "same study"]);
    if (same("patient")) badges.push(["same", "same patient"]);
    const differs = (field) => member[field] && first[field] && member[field] !== first[field];
    if (differs("transfer_syntax")) badges.push(["other", "other syntax"]);
    if (differs("width") || differs("height")) badges.push(["other", "other size"]);
    if (differs("source_format")) badges.push(["other", "other format"]);
  }
  return `<div class="badges">${badges.map(([kind, text]) => `<span class="badge ${kind}">${text}</span>`).join("")}</div>`;
}

function clusterCard(cluster) {
  const members = cluster.members.map((m, index) => thumbFigure(m.id, [
    baseName(m.path) + (m.frame ? ` #${m.frame}` : ""),
    `similarity ${m.similarity.toFixed(4)}`,
    [m.width && `${m.width}×${m.height}`, m.transfer_syntax || m.source_format].filter(Boolean).join(" · "),
    m.patient ? `patient ${shortHash(m.patient)}` : "no patient recorded",
  ], memberBadges(m, index, cluster.members))).join("");
  const chosen = dup.chosen.has(cluster.cluster);
  return `<article class="card cluster" data-cluster="${cluster.cluster}" aria-selected="${chosen}" aria-label="cluster ${cluster.cluster}">
    <h3>Cluster ${cluster.cluster} <span class="kind">${escapeHtml(cluster.kind)} · ${cluster.size} images · min similarity ${cluster.min_similarity.toFixed(4)}</span>
      <button type="button" data-choose="${cluster.cluster}" aria-pressed="${chosen}">${chosen ? "Selected" : "Select members"}</button></h3>
    <div class="badges relations">${cluster.relations.map((r) => `<span class="badge">${escapeHtml(r)}</span>`).join("")}</div>
    <div class="members">${members}</div></article>`;
}

function showDuplicates() {
  const report = dup.report, s = report.summary;
  const quantiles = report.nearest_similarity?.quantiles;
  $("dup-distribution").textContent = quantiles ? `nearest-neighbour similarity: p05 ${quantiles.p05.toFixed(3)} · median ${quantiles.p50.toFixed(3)} · p95 ${quantiles.p95.toFixed(3)}` : "";
  $("dup-summary").innerHTML = `${report.images.toLocaleString("en")} images: <b>${s.clusters}</b> clusters (${s.exact_clusters} exact, ${s.near_clusters} near, ${s.mixed_clusters} mixed)`
    + (report.threshold != null ? `, cosine ≥ ${report.threshold}` : ", exact only") + `, ${s.redundant_images} redundant images`
    + (report.clusters.length < s.clusters ? ` · the first ${report.clusters.length} shown` : "");
  $("dup-clusters").innerHTML = report.clusters.length ? report.clusters.map(clusterCard).join("")
    : '<p class="empty-note">No duplicates at this threshold.</p>';
  showDuplicateSelection();
}

function chosenDuplicates() { return [...new Set([...dup.chosen.values()].flat())]; }
function showDuplicateSelection() {
  const ids = chosenDuplicates();
  $("dup-bar").classList.toggle("on", ids.length > 0);
  $("dup-selected").textContent = `${ids.length} images of ${dup.chosen.size} ${dup.chosen.size === 1 ? "cluster" : "clusters"} selected`;
  for (const card of document.querySelectorAll("#dup-clusters .cluster")) {
    const on = dup.chosen.has(Number(card.dataset.cluster));
    card.setAttribute("aria-selected", String(on));
    const button = card.querySelector("button[data-choose]");
    button.setAttribute("aria-pressed", String(on));
    button.textContent = on ? "Selected" : "Select members";
  }
}

$("dup-clusters").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-choose]");
  if (!button) return;
  const number = Number(button.dataset.choose);
  if (dup.chosen.has(number)) dup.chosen.delete(number);
  else dup.chosen.set(number, dup.report.clusters.find((c) => c.cluster === number).members.map((m) => m.id));
  showDuplicateSelection();
});
$("dup-form").addEventListener("submit", (event) => { event.preventDefault(); pushViewUrl(); loadDuplicates(); });
$("dup-export-csv").addEventListener("click", () => exportRows(chosenDuplicates(), "csv", "duplicates"));
$("dup-export-json").addEventListener("click", () => exportRows(chosenDuplicates(), "json", "duplicates"));
$("dup-clear").addEventListener("click", () => { dup.chosen.clear(); showDuplicateSelection(); });
