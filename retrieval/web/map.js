"use strict";
// The map (GET /api/map, /api/map/points, /api/map/colours): every image a point, drawn straight into the canvas's
// pixels (100k points in a few ms, no library, no GPU needed), panned by dragging, zoomed by the wheel, coloured by
// a field with a legend (counts; click to hide a value), the current search's hits ringed, a lasso that selects
// (then shown as results or exported), a click that opens the viewer. Data coordinates: y up; the screen's:
// sx = x * scale + tx, sy = -y * scale + ty (CSS pixels), kept on the canvas's data-* for tests.
// 20 colours told apart on the dark and the light background (Tableau's 10, then lighter and darker kin); the
// rarer values share a grey, which the legend says.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
                 "#a0cbe8", "#ffbe7d", "#8cd17d", "#b6992d", "#499894", "#86bcb6", "#d37295", "#fabfd2", "#d4a6c8", "#f1ce63"];
const MISSING_COLOUR = "#7f7f7f", OTHER_COLOUR = "#5a5a5a";
const map = {info: null, ids: null, xy: null, n: 0, codes: null, values: [], colours: [], hidden: new Set(), by: null,
             scale: 1, tx: 0, ty: 0, fitted: false, lasso: false, drag: null, path: null, chosen: null, chosenCount: 0,
             hits: [], frames: 0, dirty: false, loading: null, colourCache: new Map(), image: null};
const mapCanvas = $("map-canvas");

VIEWS.map = {
  params() { return $("map-by").value !== "modality" ? [["colour", $("map-by").value]] : []; },
  open(from) {
    $("map-by").value = from.get("colour") || "modality";
    loadMap().then(() => { if (map.n) { resizeMap(); colourMap($("map-by").value); } });
  },
};

async function rawGet(url) {
  const response = await fetch(withToken(url), {headers: auth});
  if (!response.ok) {
    const type = response.headers.get("content-type") || "";
    const body = type.includes("json") ? await response.json() : {};
    throw new Error(body.error || body.detail || response.statusText);
  }
  return response;
}

function loadMap() {  // once per page: the points; the colours per field, cached
  map.loading ??= (async () => {
    let info;
    try {
      info = await (await rawGet("/api/map")).json();
    } catch (error) {
      map.loading = null;
      $("map-summary").textContent = "";
      $("map-message").innerHTML = /no map|not found/i.test(error.message)
        ? 'No map yet: run <code>mi map</code> on the index, then reload.' : escapeHtml(error.message);
      $("map-message").className = /no map|not found/i.test(error.message) ? "empty-note" : "view-message";
      return;
    }
    $("map-summary").innerHTML = '<span class="spinner"></span>Loading the map…';
    const buffer = await (await rawGet("/api/map/points")).arrayBuffer();
    const n = buffer.byteLength / 12;
    map.info = info; map.n = n;
    map.ids = new Int32Array(buffer, 0, n);
    map.xy = new Float32Array(buffer, 4 * n, 2 * n);
    map.chosen = new Uint8Array(n);
    $("map-message").textContent = "";
    $("map-summary").textContent = `${n.toLocaleString("en")} images · ${info.method || "map"} of generation ${info.generation}`;
    mapCanvas.dataset.count = n;
  })();
  return map.loading;
}

async function colourMap(by) {
  map.by = by;
  let colours = map.colourCache.get(by);
  if (!colours) {
    try { colours = await (await rawGet("/api/map/colours?" + new URLSearchParams({by}))).json(); } catch (error) { $("map-message").textContent = error.message; return; }
    const bytes = Uint8Array.from(atob(colours.codes), (c) => c.charCodeAt(0));
    colours.array = new Uint16Array(bytes.buffer, 0, bytes.length >> 1);
    map.colourCache.set(by, colours);
  }
  if (map.by !== by) return;
  map.codes = colours.array;
  map.values = colours.values;
  map.colours = colours.values.map((value, i) => value === null ? MISSING_COLOUR : i < PALETTE.length ? PALETTE[i] : OTHER_COLOUR);
  map.hidden.clear();
  showLegend();
  drawMap();
}

function showLegend() {
  const counts = new Uint32Array(map.values.length);
  for (let i = 0; i < map.n; i++) counts[map.codes[i]]++;
  const label = {modality: "Modality", body_part: "Body part", view: "View", folder: "Folder"}[map.by] || map.by;
  $("map-legend").innerHTML = `<h3>${escapeHtml(label)}</h3>` + map.values.map((value, code) =>
    `<button type="button" data-code="${code}" aria-pressed="true" title="${escapeHtml(value ?? "none recorded")}: show or hide">
      <span class="swatch" style="background:${map.colours[code]}"></span><span class="value">${escapeHtml(value === null ? "none recorded" : map.by === "folder" ? baseName(value) || value : value)}</span><span class="n">${counts[code].toLocaleString("en")}</span></button>`).join("");
}

function resizeMap() {
  const box = mapCanvas.getBoundingClientRect(), ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(box.width * ratio)), height = Math.max(1, Math.round(box.height * ratio));
  if (mapCanvas.width !== width || mapCanvas.height !== height) { mapCanvas.width = width; mapCanvas.height = height; map.image = null; }
  if (!map.fitted && map.n) fitMap();
}
function fitMap() {
  let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  for (let i = 0; i < map.n; i++) {
    const x = map.xy[2 * i], y = map.xy[2 * i + 1];
    if (x < minX) minX = x; if (x > maxX) maxX = x; if (y < minY) minY = y; if (y > maxY) maxY = y;
  }
  const box = mapCanvas.getBoundingClientRect();
  const spanX = Math.max(maxX - minX, 1e-9), spanY = Math.max(maxY - minY, 1e-9);
  map.scale = 0.9 * Math.min(box.width / spanX, box.height / spanY);
  map.tx = box.width / 2 - (minX + maxX) / 2 * map.scale;
  map.ty = box.height / 2 + (minY + maxY) / 2 * map.scale;
  map.fitted = true;
  drawMap();
}
const toScreen = (x, y) => [x * map.scale + map.tx, -y * map.scale + map.ty];
const toData = (sx, sy) => [(sx - map.tx) / map.scale, -(sy - map.ty) / map.scale];

function drawMap() {
  Object.assign(mapCanvas.dataset, {scale: map.scale, tx: map.tx, ty: map.ty});  // where the next frame draws
  if (map.dirty) return;
  map.dirty = true;
  requestAnimationFrame(paintMap);
}
function rgba32(hex) {  // "#rrggbb" as the little-endian uint32 of its RGBA bytes
  const v = parseInt(hex.slice(1), 16);
  return (255 << 24 | (v & 255) << 16 | (v >> 8 & 255) << 8 | v >> 16) >>> 0;
}
function paintMap() {
  map.dirty = false;
  if (!map.n || !map.codes || currentTab !== "map") return;
  const started = performance.now();
  const width = mapCanvas.width, height = mapCanvas.height, ratio = width / Math.max(1, mapCanvas.getBoundingClientRect().width);
  const context = mapCanvas.getContext("2d");
  if (!map.image) map.image = context.createImageData(width, height);
  const pixels = new Uint32Array(map.image.data.buffer);
  pixels.fill(0);
  const colours = Uint32Array.from(map.colours, rgba32), hidden = new Uint8Array(map.values.length);
  for (const code of map.hidden) hidden[code] = 1;
  const chosenColour = rgba32("#ffffff");
  const radius = Math.round((map.n > 30000 ? 1 : map.n > 3000 ? 2 : 3) * Math.min(ratio, 2)), scale = map.scale * ratio, tx = map.tx * ratio, ty = map.ty * ratio;
  const xy = map.xy, codes = map.codes, chosen = map.chosen;
  for (let pass = 0; pass < 2; pass++) {  // the chosen points last, on top
    for (let i = 0; i < map.n; i++) {
      if (hidden[codes[i]] || (pass === 1) !== (chosen[i] === 1)) continue;
      const px = (xy[2 * i] * scale + tx) | 0, py = (-xy[2 * i + 1] * scale + ty) | 0;
      if (px < radius || py < radius || px >= width - radius || py >= height - radius) continue;
      const colour = pass ? chosenColour : colours[codes[i]];
      for (let dy = -radius; dy <= radius; dy++) {
        const row = (py + dy) * width + px;
        for (let dx = -radius; dx <= radius; dx++) pixels[row + dx] = colour;
      }
    }
  }
  context.putImageData(map.image, 0, 0);
  context.save();
  context.scale(ratio, ratio);
  let ringed = 0;
  context.lineWidth = 2;
  context.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--sel").trim() || "#ffb020";
  for (const id of map.hits) {  // the current search's hits
    const at = pointIndex(id);
    if (at < 0 || hidden[codes[at]]) continue;
    const [sx, sy] = toScreen(xy[2 * at], xy[2 * at + 1]);
    context.beginPath(); context.arc(sx, sy, 6, 0, 2 * Math.PI); context.stroke();
    ringed++;
  }
  if (map.path && map.path.length > 1) {
    context.strokeStyle = "#ffffff"; context.lineWidth = 1.5; context.setLineDash([5, 4]);
    context.beginPath(); context.moveTo(...map.path[0]);
    for (const point of map.path) context.lineTo(...point);
    context.closePath(); context.stroke();
  }
  context.restore();
  map.frames++;
  Object.assign(mapCanvas.dataset, {frames: map.frames, highlighted: ringed,
                                    chosen: map.chosenCount, frameMs: (performance.now() - started).toFixed(2)});
  if (map.frames === 1) performance.mark("mi-map-drawn");
}
function pointIndex(id) {  // the map's ids are ascending
  let low = 0, high = map.n - 1;
  while (low <= high) {
    const mid = (low + high) >> 1, value = map.ids[mid];
    if (value === id) return mid;
    if (value < id) low = mid + 1; else high = mid - 1;
  }
  return -1;
}
function nearestPoint(sx, sy, within = 8) {
  const [x, y] = toData(sx, sy), limit = (within / map.scale) ** 2;
  const hidden = new Set(map.hidden);
  let best = -1, bestDistance = limit;
  for (let i = 0; i < map.n; i++) {
    const dx = map.xy[2 * i] - x, dy = map.xy[2 * i + 1] - y, distance = dx * dx + dy * dy;
    if (distance < bestDistance && !hidden.has(map.codes?.[i])) { best = i; bestDistance = distance; }
  }
  return best;
}

function zoomMap(factor, sx, sy) {
  const box = mapCanvas.getBoundingClientRect();
  sx ??= box.width / 2; sy ??= box.height / 2;
  const scale = Math.max(1e-6, map.scale * factor);
  map.tx = sx - (sx - map.tx) * scale / map.scale; map.ty = sy - (sy - map.ty) * scale / map.scale; map.scale = scale;
  drawMap();
}
function lassoSelect(path) {  // the points inside the polygon (screen), by the even-odd rule in data coordinates
  const polygon = path.map(([sx, sy]) => toData(sx, sy));
  let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  for (const [x, y] of polygon) { minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y); maxY = Math.max(maxY, y); }
  const hidden = new Set(map.hidden);
  map.chosen.fill(0);
  let count = 0;
  for (let i = 0; i < map.n; i++) {
    const x = map.xy[2 * i], y = map.xy[2 * i + 1];
    if (x < minX || x > maxX || y < minY || y > maxY || hidden.has(map.codes[i])) continue;
    let inside = false;
    for (let a = 0, b = polygon.length - 1; a < polygon.length; b = a++) {
      const [xa, ya] = polygon[a], [xb, yb] = polygon[b];
      if ((ya > y) !== (yb > y) && x < (xb - xa) * (y - ya) / (yb - ya) + xa) inside = !inside;
    }
    if (inside) { map.chosen[i] = 1; count++; }
  }
  map.chosenCount = count;
  showMapChoice();
}
function chosenIds() { const out = []; for (let i = 0; i < map.n; i++) if (map.chosen[i]) out.push(map.ids[i]); return out; }
function showMapChoice() {
  $("map-bar").classList.toggle("on", map.chosenCount > 0);
  $("map-selected").textContent = `${map.chosenCount.toLocaleString("en")} in the lasso`;
  mapCanvas.dataset.chosen = map.chosenCount;
  drawMap();
}
function setLasso(on) {
  map.lasso = on;
  $("map-mode").setAttribute("aria-pressed", String(on));
  mapCanvas.classList.toggle("lasso", on);
}

// The lasso's images as the results (their rows from the export endpoint), all selected: export or "more like these".
const SHOWN_MAX = 1000;
async function showChosen() {
  const ids = chosenIds().slice(0, SHOWN_MAX);
  if (!ids.length) return;
  let rows;
  try {
    const response = await fetch(withToken("/api/export"), {method: "POST", headers: {"Content-Type": "application/json", ...auth},
      body: JSON.stringify({ids, format: "json", group: "map lasso"})});
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    rows = await response.json();
  } catch (error) { $("map-message").textContent = error.message; return; }
  goTab("search");
  if (controller) controller.abort();
  hits = rows.map((row) => ({...row, score: null}));
  more = false;
  selected = new Set(ids); anchor = null;
  showQuery([]);
  $("shown").innerHTML = `<span>Chosen on the map: ${ids.length.toLocaleString("en")} images${map.chosenCount > ids.length ? ` (the first ${ids.length} of ${map.chosenCount})` : ""}</span>`;
  showHits(ids.length, 0);
  $("count").textContent = `${ids.length} images from the map's lasso`;
  showSelection();
}

mapCanvas.addEventListener("pointerdown", (event) => {
  if (!map.n) return;
  mapCanvas.setPointerCapture(event.pointerId);
  const box = mapCanvas.getBoundingClientRect(), sx = event.clientX - box.left, sy = event.clientY - box.top;
  map.drag = {sx, sy, tx: map.tx, ty: map.ty, moved: false, lasso: map.lasso || event.shiftKey};
  if (map.drag.lasso) map.path = [[sx, sy]];
});
mapCanvas.addEventListener("pointermove", (event) => {
  const box = mapCanvas.getBoundingClientRect(), sx = event.clientX - box.left, sy = event.clientY - box.top;
  const drag = map.drag;
  if (!drag) {  // hover: which image is under the pointer
    const at = map.n ? nearestPoint(sx, sy) : -1;
    $("map-readout").textContent = at >= 0 ? `image ${map.ids[at]}${map.codes ? " · " + (map.values[map.codes[at]] ?? "none recorded") : ""}` : "";
    return;
  }
  if (Math.abs(sx - drag.sx) + Math.abs(sy - drag.sy) > 3) drag.moved = true;
  if (drag.lasso) { map.path.push([sx, sy]); drawMap(); return; }
  map.tx = drag.tx + sx - drag.sx; map.ty = drag.ty + sy - drag.sy;
  drawMap();
});
mapCanvas.addEventListener("pointerup", (event) => {
  const drag = map.drag;
  map.drag = null;
  if (!drag) return;
  if (!drag.moved) {  // a click: open the nearest image
    map.path = null;
    const at = nearestPoint(drag.sx, drag.sy);
    if (at >= 0) openViewer(map.ids[at], null);
    drawMap();
    return;
  }
  if (drag.lasso && map.path.length > 2) lassoSelect(map.path);
  map.path = null;
  drawMap();
});
mapCanvas.addEventListener("wheel", (event) => {
  event.preventDefault();
  const box = mapCanvas.getBoundingClientRect();
  zoomMap(Math.exp(-event.deltaY / 400), event.clientX - box.left, event.clientY - box.top);
}, {passive: false});
mapCanvas.addEventListener("keydown", (event) => {
  const step = 60, keys = {ArrowLeft: () => { map.tx += step; }, ArrowRight: () => { map.tx -= step; }, ArrowUp: () => { map.ty += step; },
    ArrowDown: () => { map.ty -= step; }, "+": () => zoomMap(1.25), "=": () => zoomMap(1.25), "-": () => zoomMap(0.8), "0": fitMap,
    l: () => setLasso(!map.lasso), Escape: () => { map.chosen?.fill(0); map.chosenCount = 0; showMapChoice(); }};
  if (!keys[event.key] || event.ctrlKey || event.metaKey || event.altKey || $("viewer").classList.contains("open")) return;
  event.preventDefault();
  event.stopPropagation();
  keys[event.key]();
  drawMap();
});
$("map-legend").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-code]");
  if (!button) return;
  const code = Number(button.dataset.code);
  if (map.hidden.has(code)) map.hidden.delete(code); else map.hidden.add(code);
  button.setAttribute("aria-pressed", String(!map.hidden.has(code)));
  drawMap();
});
$("map-by").addEventListener("change", () => { pushViewUrl(); colourMap($("map-by").value); });
$("map-mode").addEventListener("click", () => setLasso(!map.lasso));
$("map-fit").addEventListener("click", fitMap);
$("map-clear").addEventListener("click", () => { map.chosen.fill(0); map.chosenCount = 0; showMapChoice(); });
$("map-show").addEventListener("click", showChosen);
$("map-export-csv").addEventListener("click", () => exportRows(chosenIds(), "csv", "map lasso"));
$("map-export-json").addEventListener("click", () => exportRows(chosenIds(), "json", "map lasso"));
window.addEventListener("resize", () => { if (currentTab === "map" && map.n) { resizeMap(); drawMap(); } });
document.addEventListener("mi:hits", () => { map.hits = hits.map((hit) => hit.id); drawMap(); });
