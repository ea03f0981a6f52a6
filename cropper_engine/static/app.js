// The try-it page: upload an image to /v1/crop and draw the candidates and the chosen crop.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#3b82f6", "#f59e0b", "#a855f7", "#14b8a6", "#ec4899"];
const SVG = "http://www.w3.org/2000/svg";
const TOP = 12; // candidates drawn unless "all" is ticked
let file = null;
let fileUrl = null;

function setStatus(text, state) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = state;
}

function headers() {
  const key = $("apikey").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function loadInfo() {
  try {
    const r = await fetch("/v1/info", { headers: headers() });
    if (r.status === 401) {
      $("engine").textContent = "this server needs an API key";
      return;
    }
    const d = await r.json();
    const e = d.engine || {};
    const why = (e.reasons && e.reasons.pipeline) || e.pipeline || (d.loading ? "loading…" : "");
    $("engine").textContent = "pipeline: " + why + " · up to " + d.limits.max_upload_mb + " MB";
  } catch (err) {
    $("engine").textContent = "";
  }
}

function chooseFile(f) {
  if (!f) return;
  file = f;
  if (fileUrl) URL.revokeObjectURL(fileUrl);
  fileUrl = URL.createObjectURL(f);
  $("drop-text").textContent = f.name + " (" + Math.round(f.size / 1024) + " KB) — drop another to replace";
  $("go").disabled = false;
  setStatus("Ready: press Crop.", "idle");
}

function syncTask() {
  const t = $("task").value;
  $("ratio-box").hidden = t !== "ratio";
  $("mask-box").hidden = t !== "subject";
  $("subject-box").hidden = t === "subject";
  $("subject-text-box").hidden = t === "subject" || $("subject").value !== "custom";
}

function subjectSpec() {
  const v = $("subject").value;
  return v === "custom" ? $("subject-text").value.trim() : v;
}

function poly(points, attrs) {
  const p = document.createElementNS(SVG, "polygon");
  p.setAttribute("points", points.map((q) => q.join(",")).join(" "));
  p.setAttribute("vector-effect", "non-scaling-stroke");
  for (const [k, v] of Object.entries(attrs)) p.setAttribute(k, v);
  return p;
}

function rect(box, attrs) {
  const r = document.createElementNS(SVG, "rect");
  const [x1, y1, x2, y2] = box;
  r.setAttribute("x", x1);
  r.setAttribute("y", y1);
  r.setAttribute("width", Math.max(0, x2 - x1));
  r.setAttribute("height", Math.max(0, y2 - y1));
  r.setAttribute("fill", "none");
  r.setAttribute("vector-effect", "non-scaling-stroke");
  for (const [k, v] of Object.entries(attrs)) r.setAttribute(k, v);
  return r;
}

function draw(row) {
  const img = $("original");
  const svg = $("overlay");
  svg.setAttribute("viewBox", "0 0 " + row.width + " " + row.height);
  svg.replaceChildren();
  const tbody = document.querySelector("#candidates tbody");
  tbody.replaceChildren();
  const cands = (row.candidates || []).slice().sort((a, b) => b.score - a.score);
  cands.forEach((c, i) => {
    const col = COLOURS[(c.round || 0) % COLOURS.length];
    const r = rect(c.box, { stroke: col, "stroke-width": 1.5, "stroke-opacity": 0.8,
                            class: i < TOP ? "cand" : "cand extra", "data-round": c.round || 0 });
    const title = document.createElementNS(SVG, "title");
    title.textContent = "round " + (c.round || 0) + " · " + c.source + " · score " + c.score.toFixed(3);
    r.appendChild(title);
    svg.appendChild(r);
    const tr = document.createElement("tr");
    const chosen = c.box.every((v, k) => Math.round(v) === row.box[k]);
    if (chosen) tr.className = "chosen";
    tr.addEventListener("mouseenter", () => r.classList.add("hover"));
    tr.addEventListener("mouseleave", () => r.classList.remove("hover"));
    for (const v of [i + 1, c.round || 0, c.source, c.score.toFixed(4), JSON.stringify(c.box)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  });
  const n = cands.length;
  $("all-box").hidden = n <= TOP;
  $("all-label").textContent = "show all " + n + " candidates (the best " + TOP + " are drawn)";
  for (const pts of row.subject_outline || []) {
    svg.appendChild(poly(pts, { fill: "#22c55e", "fill-opacity": 0.25, stroke: "#22c55e", "stroke-width": 1.5,
                                class: "subject-outline" }));
  }
  if (row.subject_box) {
    svg.appendChild(rect(row.subject_box, { stroke: "#22c55e", "stroke-width": 2, "stroke-dasharray": "5 4",
                                            id: "subject" }));
  }
  for (const f of row.faces || []) {
    svg.appendChild(rect(f.box, { stroke: "#facc15", "stroke-width": 2, class: "face" }));
  }
  for (const [x, y] of row.focal_points || []) {
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", x);
    c.setAttribute("cy", y);
    c.setAttribute("r", Math.max(4, Math.min(row.width, row.height) / 80));
    c.setAttribute("fill", "#22c55e");
    c.setAttribute("class", "focal");
    svg.appendChild(c);
  }
  svg.appendChild(rect(row.box, { stroke: "#ef4444", "stroke-width": 3.5, id: "chosen",
                                  "data-box": row.box.join(",") }));

  const [x1, y1, x2, y2] = row.box;
  const canvas = $("crop");
  const s = Math.min(1, 360 / Math.max(x2 - x1, y2 - y1));
  canvas.width = Math.max(1, Math.round((x2 - x1) * s));
  canvas.height = Math.max(1, Math.round((y2 - y1) * s));
  // the browser shows the image upright (EXIF) as the server does: the boxes are in those pixels
  const sx = img.naturalWidth / row.width;
  const sy = img.naturalHeight / row.height;
  canvas.getContext("2d").drawImage(img, x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy,
                                    0, 0, canvas.width, canvas.height);
  $("summary").textContent = row.task + (row.ratio ? " " + row.ratio : "") + " · pipeline " + row.pipeline +
    (row.subject ? " · subject " + row.subject + (row.subject_requested ? " (asked: " + row.subject_requested +
    ")" : "") : "") + " · score " + row.score.toFixed(3) + " · box [" + row.box.join(", ") + "] of " +
    row.width + "×" +
    row.height + " · " + (row.candidates || []).length + " candidates · " +
    Math.round(1000 * ((row.timings || {}).total || 0)) + " ms in the engine";
}

async function submit(ev) {
  ev.preventDefault();
  if (!file) {
    setStatus("Choose an image first.", "error");
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name);
  let task = $("task").value;
  const subject = task === "subject" ? "" : subjectSpec();
  if (subject && task === "free") task = "subject";  // a subject makes the task subject-aware
  form.append("task", task);
  if (task === "ratio") form.append("ratio", $("ratio").value.trim());
  if (subject) form.append("subject", subject);
  form.append("keep_faces", $("keep-faces").checked ? "true" : "false");
  if (task === "subject" && !subject) {
    const m = $("mask").files[0];
    if (!m) {
      setStatus("The subject task needs a mask image (white subject on black).", "error");
      return;
    }
    form.append("mask", m, m.name);
  }
  $("go").disabled = true;
  setStatus("Cropping…", "busy");
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/crop", { method: "POST", body: form, headers: headers() });
    let d = null;
    try {
      d = await r.json();
    } catch (err) {
      d = null;
    }
    if (!r.ok) {
      const msg = d && d.error ? d.error.message : "HTTP " + r.status;
      const wait = r.headers.get("Retry-After");
      setStatus("Error " + r.status + ": " + msg + (wait ? " (retry after " + wait + " s)" : ""), "error");
      return;
    }
    const rows = d.results || [d];
    const img = $("original");
    img.src = fileUrl;
    await img.decode();
    $("result").hidden = false;
    draw(rows[0]);
    $("json").textContent = JSON.stringify(d, null, 2);
    $("result").dataset.box = rows[0].box.join(",");
    const extra = rows.length > 1 ? " (" + rows.length + " results; the first is drawn)" : "";
    setStatus("Done in " + Math.round(performance.now() - t0) + " ms: box [" + rows[0].box.join(", ") + "]" +
              extra, "done");
  } catch (err) {
    setStatus("Error: " + err, "error");
  } finally {
    $("go").disabled = false;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  chooseFile(e.dataTransfer.files[0]);
});
$("image").addEventListener("change", (e) => chooseFile(e.target.files[0]));
$("task").addEventListener("change", syncTask);
$("subject").addEventListener("change", syncTask);
$("all").addEventListener("change", (e) => $("overlay").classList.toggle("all", e.target.checked));
$("apikey").addEventListener("change", loadInfo);
$("form").addEventListener("submit", submit);
syncTask();
loadInfo();
