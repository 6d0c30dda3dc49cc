// lorasynth web app: plain JavaScript, no build step, talks only to this server's /api.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { info: null, photo: null, image: null, faces: [], face: 0, results: [], blend: [], libOffset: 0,
                libTotal: 0, mark: null };

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const type = res.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await res.json() : null;
  if (!res.ok) throw new Error((body && body.error) || `HTTP ${res.status}`);
  return body;
}

function banner(message) {
  const b = $("#banner");
  b.textContent = message || "";
  b.hidden = !message;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// ---------------------------------------------------------------------- tabs
for (const t of document.querySelectorAll(".tab")) {
  t.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((x) => x.classList.toggle("active", x === t));
    document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === t.dataset.tab));
    if (t.dataset.tab === "library") { loadLibrary(); drawMap(); }
  });
}

// ---------------------------------------------------------------------- photo + faces
const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) usePhoto(e.dataTransfer.files[0]);
});
$("#photo").addEventListener("change", (e) => { if (e.target.files.length) usePhoto(e.target.files[0]); });

async function usePhoto(file) {
  banner("");
  state.photo = file; state.faces = []; state.face = 0;
  $("#synthesize").disabled = true;
  $("#faces-status").textContent = "finding faces…";
  try {
    state.image = await loadImage(file);
    const form = new FormData(); form.append("image", file);
    const r = await api("/api/faces", { method: "POST", body: form });
    state.faces = r.faces;
    $("#faces-status").textContent = r.faces.length
      ? `${r.faces.length} face(s) found; the largest is selected — click a box to choose another`
      : "no face found in this photo";
    $("#synthesize").disabled = r.faces.length === 0;
  } catch (err) {
    $("#faces-status").textContent = "";
    banner(err.message);
  }
  drawPhoto(); drawChips();
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null); // the server says what is wrong with it
    img.src = URL.createObjectURL(file);
  });
}

function drawPhoto() {
  const c = $("#photo-canvas");
  if (!state.image) { c.hidden = true; return; }
  const scale = Math.min(1, 380 / state.image.width);
  c.width = Math.round(state.image.width * scale); c.height = Math.round(state.image.height * scale);
  c.dataset.scale = scale; c.hidden = false;
  const g = c.getContext("2d");
  g.drawImage(state.image, 0, 0, c.width, c.height);
  state.faces.forEach((f, i) => {
    const [x0, y0, x1, y1] = f.box.map((v) => v * scale);
    g.lineWidth = i === state.face ? 3 : 1.5;
    g.strokeStyle = i === state.face ? "#ff3b30" : "#ffd60a";
    g.strokeRect(x0, y0, x1 - x0, y1 - y0);
    g.fillStyle = g.strokeStyle; g.font = "12px sans-serif"; g.fillText(String(i), x0 + 3, y0 + 13);
  });
}

$("#photo-canvas").addEventListener("click", (e) => {
  const c = e.currentTarget, r = c.getBoundingClientRect(), s = Number(c.dataset.scale);
  const x = (e.clientX - r.left) * (c.width / r.width) / s, y = (e.clientY - r.top) * (c.height / r.height) / s;
  let best = -1, area = Infinity;
  state.faces.forEach((f, i) => {
    const [x0, y0, x1, y1] = f.box, a = (x1 - x0) * (y1 - y0);
    if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && a < area) { best = i; area = a; }
  });
  if (best >= 0) selectFace(best);
});

function selectFace(i) { state.face = i; drawPhoto(); drawChips(); }

function drawChips() {
  const box = $("#face-chips"); box.replaceChildren();
  state.faces.forEach((f, i) => box.append(el("button", {
    class: "face-chip" + (i === state.face ? " selected" : ""), "data-index": i, onclick: () => selectFace(i),
  }, `face ${i}`)));
}

// ---------------------------------------------------------------------- synthesize
$("#synthesize").addEventListener("click", async () => {
  banner("");
  const form = new FormData();
  form.append("image", state.photo);
  form.append("face_index", state.face);
  form.append("strategy", $("#strategy").value);
  if ($("#guidance").value !== "") form.append("guidance", $("#guidance").value);
  form.append("seed", $("#seed").value || "0");
  form.append("samples", $("#samples").value || "1");
  $("#synthesize").disabled = true; $("#synth-status").textContent = "synthesizing…";
  const t0 = performance.now();
  try {
    const r = await api("/api/synthesize", { method: "POST", body: form });
    $("#synth-status").textContent = `${r.loras.length} LoRA(s) in ${Math.round(performance.now() - t0)} ms`;
    for (const item of r.loras) addResult(item);
    synthPreview.setLoRA(r.loras[0]);
    state.mark = r.loras[0].id;
  } catch (err) { banner(err.message); $("#synth-status").textContent = ""; }
  $("#synthesize").disabled = state.faces.length === 0;
});

function addResult(item) {
  state.results.push(item);
  const fmt = el("select", { class: "format" });
  for (const f of state.info.formats) fmt.append(el("option", { value: f }, f));
  const link = el("a", { class: "download-link", href: item.files[state.info.formats[0]], download: "" }, "Download");
  fmt.addEventListener("change", () => { link.href = item.files[fmt.value]; });
  const prov = el("pre", { class: "provenance" }, JSON.stringify(item.provenance, null, 1));
  const card = el("div", { class: "card result", "data-id": item.id },
    el("b", {}, item.label), el("div", { class: "row" }, fmt, link,
      el("button", { class: "use-preview", onclick: () => synthPreview.setLoRA(item) }, "Preview"),
      el("button", { class: "add-blend", onclick: () => addBlendItem("result", item.id, item.label) }, "Add to blend")),
    el("details", { open: "" }, el("summary", {}, "provenance"), prov));
  $("#results").prepend(card);
  if (item.kind === "synthesized" && state.blend.length === 0) addBlendItem("result", item.id, item.label);
}

// ---------------------------------------------------------------------- preview (one per tab)
class Preview {
  constructor(root) {
    this.root = root; this.lora = null; this.job = null;
    root.append($("#preview-template").content.cloneNode(true));
    this.q = (s) => $(s, root);
    this.q(".generate").addEventListener("click", () => this.start());
    this.q(".cancel").addEventListener("click", () => this.cancel());
  }
  init(info) {
    const p = this.q(".prompt"); p.value = info.trigger_prompt;
    for (const s of info.schedulers) this.q(".scheduler").append(el("option", { value: s }, s));
    if (!info.has_base) this.q(".lora-name").textContent = "previews need a base model: start the server with --base";
  }
  setLoRA(item) {
    this.lora = item;
    this.q(".lora-name").textContent = "LoRA: " + item.label;
    this.q(".generate").disabled = !state.info.has_base;
  }
  async start() {
    banner("");
    const size = Number(this.q(".size").value);
    const body = { loras: [{ id: this.lora.id, scale: Number(this.q(".scale").value) }], prompt: this.q(".prompt").value,
      scheduler: this.q(".scheduler").value, steps: Number(this.q(".steps").value), seed: Number(this.q(".gen-seed").value),
      guidance: Number(this.q(".gen-guidance").value), width: size, height: size };
    try {
      const job = await api("/api/generate", { method: "POST", headers: { "content-type": "application/json" },
                                                body: JSON.stringify(body) });
      this.job = job.id; this.q(".cancel").disabled = false; this.q(".generate").disabled = true;
      this.poll();
    } catch (err) { banner(err.message); }
  }
  async poll() {
    if (!this.job) return;
    let j;
    try { j = await api(`/api/jobs/${this.job}`); } catch (err) { banner(err.message); return this.finish(); }
    const bar = this.q(".gen-progress");
    bar.max = Math.max(j.total, 1); bar.value = j.step;
    this.q(".gen-status").textContent = j.state === "running" ? `step ${j.step}/${j.total}` : j.state;
    if (j.state === "done") {
      const img = this.q(".preview-img"); img.src = j.image; img.hidden = false;
      this.q(".gen-status").textContent = `done (${j.total} steps)`;
      return this.finish();
    }
    if (j.state === "error") { banner(j.error); return this.finish(); }
    if (j.state === "cancelled") return this.finish();
    setTimeout(() => this.poll(), 200);
  }
  async cancel() { if (this.job) await api(`/api/jobs/${this.job}/cancel`, { method: "POST" }).catch(() => {}); }
  finish() { this.job = null; this.q(".cancel").disabled = true; this.q(".generate").disabled = !this.lora; }
}
const synthPreview = new Preview($("#preview-panel"));
const blendPreview = new Preview($("#blend-preview-panel"));

// ---------------------------------------------------------------------- blend
function addBlendItem(source, id, label) {
  if (state.blend.some((b) => b.source === source && b.id === String(id))) return;
  state.blend.push({ source, id: String(id), label, weight: state.blend.length ? 0.5 : 1.0 });
  drawBlend();
}

function drawBlend() {
  const box = $("#blend-items"); box.replaceChildren();
  state.blend.forEach((b, i) => {
    const out = el("output", { class: "weight-value" }, b.weight.toFixed(2));
    const slider = el("input", { class: "weight", type: "range", min: "-2", max: "2", step: "0.05", value: b.weight,
      "aria-label": "weight of " + b.label });
    slider.addEventListener("input", () => { b.weight = Number(slider.value); out.textContent = b.weight.toFixed(2); });
    box.append(el("div", { class: "card blend-item" }, el("span", { class: "blend-label" },
      `${b.source === "library" ? "library #" + b.id : "result"}: ${b.label}`),
      el("div", { class: "row" }, slider, out,
        el("button", { onclick: () => { state.blend.splice(i, 1); drawBlend(); } }, "✕"))));
  });
  $("#blend-run").disabled = state.blend.length === 0;
}

$("#blend-run").addEventListener("click", async () => {
  banner("");
  const rank = $("#blend-mode").value === "rank" ? Number($("#blend-rank").value) : null;
  const body = { items: state.blend.map((b) => ({ source: b.source, id: b.id, weight: b.weight })), rank };
  try {
    const r = await api("/api/blend", { method: "POST", headers: { "content-type": "application/json" },
                                         body: JSON.stringify(body) });
    const rep = r.report;
    $("#blend-status").textContent = rep.rank === null ? "exact blend (no approximation error)"
      : `rank ${rep.rank}: relative error ${(100 * rep.overall_relative_error).toFixed(2)}% overall, ` +
        `${(100 * rep.max_module_relative_error).toFixed(2)}% worst module`;
    state.results.push(r);
    const fmt = el("select", { class: "format" });
    for (const f of state.info.formats) fmt.append(el("option", { value: f }, f));
    const link = el("a", { class: "download-link", href: r.files[state.info.formats[0]], download: "" }, "Download");
    fmt.addEventListener("change", () => { link.href = r.files[fmt.value]; });
    $("#blend-result").replaceChildren(el("div", { class: "card" }, el("b", {}, r.label), el("div", { class: "row" }, fmt, link)));
    blendPreview.setLoRA(r);
  } catch (err) { banner(err.message); }
});

// ---------------------------------------------------------------------- library
async function loadLibrary() {
  if (!state.info.has_library) { $("#lib-status").textContent = "no library: start the server with --library"; return; }
  const q = encodeURIComponent($("#lib-q").value);
  try {
    const r = await api(`/api/library?q=${q}&limit=20&offset=${state.libOffset}`);
    state.libTotal = r.total;
    $("#lib-status").textContent = `${r.total} entries` + (r.total ? `, showing ${r.offset + 1}–${r.offset + r.entries.length}` : "");
    const body = $("#lib-table tbody"); body.replaceChildren();
    for (const e of r.entries) body.append(el("tr", {}, el("td", {}, String(e.id)), el("td", {}, e.name),
      el("td", {}, e.source), el("td", {}, e.trainer),
      el("td", {}, el("button", { class: "lib-add", onclick: () => addBlendItem("library", e.id, e.name) }, "+ blend"))));
  } catch (err) { banner(err.message); }
}
$("#lib-search").addEventListener("click", () => { state.libOffset = 0; loadLibrary(); });
$("#lib-q").addEventListener("keydown", (e) => { if (e.key === "Enter") { state.libOffset = 0; loadLibrary(); } });
$("#lib-prev").addEventListener("click", () => { state.libOffset = Math.max(0, state.libOffset - 20); loadLibrary(); });
$("#lib-next").addEventListener("click", () => {
  if (state.libOffset + 20 < state.libTotal) { state.libOffset += 20; loadLibrary(); }
});

async function drawMap() {
  const c = $("#map"), g = c.getContext("2d");
  let m;
  try { m = await api("/api/library/map" + (state.mark ? `?mark=${state.mark}` : "")); }
  catch (err) { $("#map-status").textContent = err.message; return; }
  const xs = m.x.concat(m.marked ? [m.marked.xy[0]] : []), ys = m.y.concat(m.marked ? [m.marked.xy[1]] : []);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const px = (x) => 15 + (c.width - 30) * (x - x0) / ((x1 - x0) || 1);
  const py = (y) => c.height - 15 - (c.height - 30) * (y - y0) / ((y1 - y0) || 1);
  g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
  g.fillStyle = "rgba(90,110,140,0.45)";
  for (let i = 0; i < m.x.length; i++) g.fillRect(px(m.x[i]) - 1.5, py(m.y[i]) - 1.5, 3, 3);
  if (m.marked) {
    g.fillStyle = "#d62828"; g.beginPath(); g.arc(px(m.marked.xy[0]), py(m.marked.xy[1]), 7, 0, 2 * Math.PI); g.fill();
  }
  $("#map-status").textContent = `${m.x.length} library LoRAs (2-D PCA of their latents)` +
    (m.marked ? `; red: ${m.marked.label}` : m.note ? `; ${m.note}` : "; synthesize a face to mark it");
}

$("#nearest-photo").addEventListener("change", async (e) => {
  if (!e.target.files.length) return;
  const form = new FormData(); form.append("image", e.target.files[0]); form.append("k", "5");
  const list = $("#nearest-list"); list.replaceChildren();
  try {
    const r = await api("/api/library/nearest", { method: "POST", body: form });
    for (const n of r.neighbours) list.append(el("li", {}, `${n.name} (id ${n.id}), cosine ${n.cosine.toFixed(3)}`));
  } catch (err) { banner(err.message); }
});

// ---------------------------------------------------------------------- start
(async () => {
  try {
    state.info = await api("/api/info");
  } catch (err) { banner("cannot reach the server: " + err.message); return; }
  const info = state.info;
  for (const s of info.strategies) $("#strategy").append(el("option", { value: s }, s));
  $("#server-info").textContent = `model folder “${info.model}” · ${info.embedder} embeddings · ` +
    (info.has_base ? "previews on" : "no base model") + (info.base_is_random_weights ? " (random-weight demo model)" : "");
  synthPreview.init(info); blendPreview.init(info);
  document.body.dataset.ready = "1";
})();
