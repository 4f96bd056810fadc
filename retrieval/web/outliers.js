"use strict";
// The outliers view (GET /api/outliers, `mi outliers --json`): the most unusual images first, each with its score
// (robust z), the reason, its group and its nearest neighbours; judged against the whole index or a group.
const outl = {key: null};

VIEWS.outliers = {
  params() {
    const out = [];
    if ($("out-by").value) out.push(["by", $("out-by").value]);
    if ($("out-top").value !== "20") out.push(["top", $("out-top").value]);
    return out;
  },
  open(from) {
    $("out-by").value = from.get("by") || "";
    $("out-top").value = from.get("top") || "20";
    loadOutliers();
  },
};

async function loadOutliers() {
  const asked = new URLSearchParams(VIEWS.outliers.params());
  asked.set("top", $("out-top").value);
  if (outl.key === asked.toString()) return;
  outl.key = asked.toString();
  $("out-summary").innerHTML = '<span class="spinner"></span>Ranking…';
  const report = await viewCall("/api/outliers?" + asked, "out-message");
  if (outl.key !== asked.toString()) return;
  if (!report) { outl.key = null; $("out-summary").textContent = ""; $("out-list").innerHTML = ""; return; }
  $("out-summary").innerHTML = `${report.outliers.length} most unusual of ${report.images.toLocaleString("en")} images, `
    + (report.by ? `each judged against its ${escapeHtml(report.by.replace("_", " "))} and the whole index` : "judged against the whole index")
    + ` (score: robust z, MADs below the median; index median similarity to the ${report.k} nearest ${report.median_mean_similarity.toFixed(3)})`;
  $("out-list").innerHTML = report.outliers.map((o, rank) => `<article class="card outlier" data-id="${o.id}" aria-label="outlier ${rank + 1}: image ${o.id}">
      ${thumbFigure(o.id, [baseName(o.path) + (o.frame ? ` #${o.frame}` : "")])}
      <div><div><span class="view-summary">#${rank + 1}</span> <span class="score" title="robust z">${o.score.toFixed(2)}</span></div>
        <div class="reason">${escapeHtml(o.reason)}</div>
        ${o.group != null ? `<div class="view-summary">group: ${escapeHtml(o.group)}</div>` : ""}
        <div class="view-summary">nearest:</div>
        <div class="neighbours">${o.neighbours.map((n) => `<img src="${thumbUrl(n.id)}" data-open="${n.id}" tabindex="0" loading="lazy" alt="neighbour ${n.id}" title="${escapeHtml(baseName(n.path))}">`).join("")}</div></div>
    </article>`).join("") || '<p class="empty-note">No images to rank.</p>';
}

$("out-form").addEventListener("submit", (event) => { event.preventDefault(); pushViewUrl(); loadOutliers(); });
$("out-by").addEventListener("change", () => { pushViewUrl(); loadOutliers(); });
