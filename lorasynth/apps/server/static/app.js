// lorasynth web app: plain JavaScript, no build step, talks only to this server's /api.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const state = { info: null, photo: null, image: null, faces: [], face: 0, results: [], blend: [], libOffset: 0,
                libTotal: null, mark: null, jobs: new Map(), lastCopied: "" };

//: What each strategy trades, in one sentence (shown under the strategy menu).
const STRATEGY_HELP = {
  diffusion: "One sample from the model for this face: varied, so try a few seeds (the paper's method).",
  average: "The model's expected LoRA for this face: the most faithful single LoRA, the same for every seed.",
  blend: "A weighted sum of the library LoRAs whose faces are closest: safe and smooth, but only as good as its neighbours.",
  nearest: "The one library LoRA whose face is most similar: a real trained LoRA, but of someone else.",
  sample: "A new identity from the model, no photo needed: change the seed to meet another person.",
};

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const type = res.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await res.json() : null;
  if (!res.ok) throw new Error((body && body.error) || `HTTP ${res.status}`);
  return body;
}
const postJSON = (path, body) => api(path, { method: "POST", headers: { "content-type": "application/json" },
                                             body: JSON.stringify(body) });

function banner(message) {
  const b = $("#banner");
  b.textContent = message || "";
  b.hidden = !message;
}
function announce(message) { $("#announce").textContent = message; }

/** A server refusal of a photo, worded for a person (the server's own words in brackets). */
function photoError(message) {
  const m = message.replace(/^the upload\s*/i, "");
  if (/not a readable image|truncated|not an image/i.test(message)) return `This file is not a complete image we can read (${m}).`;
  if (/too large|larger than|refused/i.test(message)) return `This photo is too large (${m}).`;
  return message.charAt(0).toUpperCase() + message.slice(1);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

/** Move focus to ``target`` if it sat on ``from`` (a control about to disable itself) or nowhere. */
function keepFocus(from, target) {
  const a = document.activeElement;
  if (target && (a === from || a === document.body || a === null)) target.focus({ preventScroll: false });
}

async function copyText(text, what) {
  state.lastCopied = text;
  try { await navigator.clipboard.writeText(text); }
  catch (err) {
    const t = el("textarea", { class: "visually-hidden", "aria-hidden": "true" }); t.value = text;
    document.body.append(t); t.select(); document.execCommand("copy"); t.remove();
  }
  announce(`copied ${what}`);
}

const randomSeed = () => Math.floor(Math.random() * 2 ** 31);

// ---------------------------------------------------------------------- tabs (WAI-ARIA tabs, arrow keys)
const tabs = $$('[role="tab"]');
function selectTab(tab, focus = false) {
  for (const t of tabs) {
    const on = t === tab;
    t.classList.toggle("active", on);
    t.setAttribute("aria-selected", on ? "true" : "false");
    t.tabIndex = on ? 0 : -1;
    const panel = document.getElementById(t.dataset.tab);
    panel.hidden = !on; panel.classList.toggle("active", on);
  }
  if (focus) tab.focus();
  if (tab.dataset.tab === "library") loadLibrary().then(drawMap);
  if (tab.dataset.tab === "gallery") renderGallery();
}
for (const t of tabs) {
  t.addEventListener("click", () => selectTab(t));
  t.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(t);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    selectTab(tabs[(next + tabs.length) % tabs.length], true);
  });
}

// ---------------------------------------------------------------------- photo + faces
const drop = $("#drop");
// the whole page takes a dropped photo (a drop outside the zone must not navigate away from the session)
window.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) drop.classList.remove("over"); });
window.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (!file) return;
  selectTab($("#tab-synth"));
  usePhoto(file);
});
$("#photo").addEventListener("change", (e) => { if (e.target.files.length) usePhoto(e.target.files[0]); });

async function usePhoto(file) {
  banner("");
  state.photo = file; state.faces = []; state.face = 0; state.image = null;
  updateSynthButton();
  $("#faces-status").textContent = `finding faces in ${file.name}…`;
  drawPhoto(); drawChips();
  try {
    const image = await loadImage(file);
    const form = new FormData(); form.append("image", file);
    const r = await api("/api/faces", { method: "POST", body: form });
    state.image = image; state.faces = r.faces;
    $("#faces-status").textContent = r.faces.length
      ? `${r.faces.length} face(s) found in ${file.name}; the largest is selected — click a box or a face button to choose another`
      : `no face found in ${file.name}`;
  } catch (err) {
    state.photo = null;  // nothing of a refused photo stays on the page
    $("#faces-status").textContent = "";
    banner(photoError(err.message));
  }
  updateSynthButton(); drawPhoto(); drawChips();
  const chip = $(".face-chip.selected");
  if (chip) keepFocus(null, chip);
}

function loadImage(file) {
  return new Promise((resolve) => {
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
  c.setAttribute("aria-label", `${state.photo ? state.photo.name : "the photo"} with ${state.faces.length} face(s) boxed; ` +
                 `face ${state.face} selected`);
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

function selectFace(i) {
  state.face = i; drawPhoto(); drawChips();
  announce(`face ${i} selected`);
}

function drawChips() {
  const box = $("#face-chips"); box.replaceChildren();
  state.faces.forEach((f, i) => box.append(el("button", {
    class: "face-chip" + (i === state.face ? " selected" : ""), "data-index": i, "aria-pressed": i === state.face ? "true" : "false",
    onclick: () => { selectFace(i); $(`.face-chip[data-index="${i}"]`).focus(); },
  }, `face ${i}`)));
}

// ---------------------------------------------------------------------- synthesize
let synthBusy = false;
function updateSynthButton() {
  const needsPhoto = $("#strategy").value !== "sample";
  $("#synthesize").disabled = synthBusy ? false : (needsPhoto && state.faces.length === 0);
  $("#synthesize").setAttribute("aria-disabled", synthBusy ? "true" : "false");
  $("#strategy-help").textContent = STRATEGY_HELP[$("#strategy").value] || "";
}
$("#strategy").addEventListener("change", updateSynthButton);
$("#seed-random").addEventListener("click", () => { $("#seed").value = randomSeed(); announce(`seed ${$("#seed").value}`); });

$("#synthesize").addEventListener("click", async () => {
  if (synthBusy) return;
  banner("");
  const strategy = $("#strategy").value;
  const form = new FormData();
  if (strategy !== "sample") { form.append("image", state.photo); form.append("face_index", state.face); }
  form.append("strategy", strategy);
  if ($("#guidance").value !== "") form.append("guidance", $("#guidance").value);
  form.append("seed", $("#seed").value || "0");
  form.append("samples", $("#samples").value || "1");
  synthBusy = true; updateSynthButton(); $("#synth-status").textContent = "synthesizing…";
  const t0 = performance.now();
  try {
    const r = await api("/api/synthesize", { method: "POST", body: form });
    $("#synth-status").textContent = `${r.loras.length} LoRA(s) in ${Math.round(performance.now() - t0)} ms: ${r.loras[0].label}`;
    let card = null;
    for (const item of r.loras) card = addResult(item) || card;
    synthPreview.setLoRA(r.loras[0]);
    state.mark = r.loras[0].id;
    if (card) $(".result-title", card).focus();
  } catch (err) { banner(err.message); $("#synth-status").textContent = ""; }
  synthBusy = false; updateSynthButton();
});

/** The provenance in one line: strategy, model hash, version, and how many keys the raw JSON has. */
function provenanceSummary(p) {
  const parts = [];
  if (p["lorasynth.strategy"]) parts.push(p["lorasynth.strategy"] + (p["lorasynth.average_of"] ? " (average)" : ""));
  if (p["lorasynth.blend"]) parts.push("blend");
  if (p["lorasynth.model_hash"]) parts.push("model " + p["lorasynth.model_hash"].slice(0, 8));
  if (p["lorasynth.guidance"]) parts.push("guidance " + p["lorasynth.guidance"]);
  if (p["lorasynth.version"]) parts.push("lorasynth " + p["lorasynth.version"]);
  return `${parts.join(" · ")} — ${Object.keys(p).length} fields`;
}

/** The face a LoRA was made from, cropped from the photo on the page (when it is still the same photo). */
function faceThumb(item) {
  if (!item.face || !state.image || !state.photo || item.source !== state.photo.name) return null;
  const [x0, y0, x1, y1] = item.face.box, pad = 0.25 * (x1 - x0);
  const c = el("canvas", { class: "thumb", width: 48, height: 48, role: "img", "aria-label": `face ${item.face.index} of ${item.source}` });
  c.getContext("2d").drawImage(state.image, x0 - pad, y0 - pad, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, 0, 0, 48, 48);
  return c;
}

const loraName = (item) => item.a1111_name || `lorasynth_${item.kind}_${item.id}_kohya`;
const loraTag = (item, scale = 0.8) => `<lora:${loraName(item)}:${scale}>`;
const resultById = (id) => state.results.find((r) => r.id === id);

function formatPicker(item) {
  const fmt = el("select", { class: "format", "aria-label": `file format for ${item.label}` });
  for (const f of state.info.formats) fmt.append(el("option", { value: f }, f));
  const link = el("a", { class: "download-link", href: item.files[state.info.formats[0]], download: "" }, "Download");
  fmt.addEventListener("change", () => { link.href = item.files[fmt.value]; });
  return [fmt, link];
}

function addResult(item) {
  if (resultById(item.id)) return null;
  state.results.push(item);
  const t = item.timings ? Object.values(item.timings).reduce((a, b) => a + b, 0) : null;
  const meta = [item.kind, t !== null ? `${Math.round(t * 1000)} ms` : null,
                item.report && item.report.rank !== null ? `rank ${item.report.rank}` : null].filter(Boolean).join(" · ");
  const card = el("article", { class: "card result", "data-id": item.id, "aria-label": item.label },
    faceThumb(item), el("h4", { class: "result-title", tabindex: "-1" }, item.label),
    el("p", { class: "muted small" }, meta),
    el("div", { class: "row" }, ...formatPicker(item),
      el("button", { class: "use-preview", onclick: () => { synthPreview.setLoRA(item); $(".prompt", synthPreview.root).focus(); } }, "Preview"),
      el("button", { class: "add-blend", onclick: () => { addBlendItem("result", item.id, item.label); announce(`${item.label} added to the blend`); } }, "Add to blend"),
      el("button", { class: "copy-tag", onclick: () => copyText(loraTag(item), loraTag(item)) }, "Copy <lora>")),
    el("details", { class: "provenance-box" }, el("summary", {}, "provenance: " + provenanceSummary(item.provenance)),
      el("pre", { class: "provenance" }, JSON.stringify(item.provenance, null, 1))));
  $("#results").prepend(card);
  $("#results-count").textContent = `(${state.results.length})`;
  if (item.kind === "synthesized" && state.blend.length === 0) addBlendItem("result", item.id, item.label);
  drawInterpolate(); drawEditFrom();
  return card;
}

// ---------------------------------------------------------------------- jobs: one poller for the session
const MINE = "lorasynth.jobs";  // localStorage: job id -> the panel that started it (re-attach after a reload)
const mine = () => { try { return JSON.parse(localStorage.getItem(MINE) || "{}"); } catch (e) { return {}; } };
function remember(id, panel) {
  const m = mine(); m[id] = panel;
  const ids = Object.keys(m); for (const k of ids.slice(0, Math.max(0, ids.length - 64))) delete m[k];
  localStorage.setItem(MINE, JSON.stringify(m));
}
const isOpen = (j) => j && (j.state === "queued" || j.state === "running");

let polling = null;
async function refreshJobs() {
  let r;
  try { r = await api("/api/jobs"); } catch (err) { banner(err.message); return; }
  const seen = new Set();
  for (const j of r.jobs) { state.jobs.set(j.id, j); seen.add(j.id); }
  for (const id of Array.from(state.jobs.keys())) if (!seen.has(id)) state.jobs.delete(id);
  state.jobOrder = r.jobs.map((j) => j.id);
  for (const p of previews) p.update();
  renderGallery();
}
function poll() {
  if (polling) return;
  const tick = async () => {
    await refreshJobs();
    const open = Array.from(state.jobs.values()).some(isOpen);
    polling = open ? setTimeout(tick, 250) : null;
  };
  polling = setTimeout(tick, 0);
}

function jobTitle(j) {
  if (!j.params.loras.length) return "base model, no LoRA";
  return j.params.loras.map((l) => { const it = resultById(l.id); return `${it ? it.label : "LoRA " + l.id} × ${l.scale}`; }).join(" + ");
}
function jobDetails(j) {
  const p = j.params;
  return [`seed ${p.seed}`, `${p.steps} steps`, `${p.width}×${p.height}`, p.scheduler, `guidance ${p.guidance}`,
          j.seconds !== undefined ? `${j.seconds.toFixed(1)} s` : null].filter(Boolean).join(" · ");
}
function etaText(j, rate) {
  if (j.state === "queued") {  // it starts when the job just ahead of it ends (the server's estimate)
    const ahead = Array.from(state.jobs.values()).find((x) => isOpen(x) && x.position === j.position - 1);
    return `queued · ${j.position || 0} ahead · starts in about ${Math.round(ahead ? ahead.eta_s : 0)} s`;
  }
  const left = rate ? (j.total - j.step) / rate : (j.eta_s || 0);
  return `step ${j.step}/${j.total}` + (rate ? ` · ${rate.toFixed(1)} steps/s` : "") + ` · about ${Math.ceil(left)} s left`;
}

/** One preview as a figure: the image (once done), what made it, copy buttons. */
function figure(j) {
  const fig = el("figure", { class: "shot", "data-job": j.id });
  fig.append(el("div", { class: "frame" }, el("span", { class: "job-state muted" }, j.state)));
  const cap = el("figcaption", {}, el("b", { class: "shot-title" }, jobTitle(j)), el("span", { class: "shot-details muted small" }, jobDetails(j)));
  const tools = el("div", { class: "row shot-tools" });
  cap.append(tools);
  fig.append(cap);
  return fig;
}
function updateFigure(fig, j) {
  if (fig.dataset.state === j.state + (j.seconds !== undefined)) return;
  fig.dataset.state = j.state + (j.seconds !== undefined);
  $(".shot-title", fig).textContent = jobTitle(j);
  $(".shot-details", fig).textContent = jobDetails(j);
  const frame = $(".frame", fig);
  if (j.state === "done") {
    frame.replaceChildren(el("img", { class: "preview-img", src: j.image, width: j.params.width, height: j.params.height,
      alt: `preview: ${jobTitle(j)}, ${jobDetails(j)}` }));
    const tools = $(".shot-tools", fig); tools.replaceChildren(
      el("button", { class: "copy-params", onclick: async () => {
        const r = await api(`/api/jobs/${j.id}/parameters`); copyText(r.parameters, "the generation parameters"); } }, "Copy parameters"),
      ...j.params.loras.map((l) => { const it = resultById(l.id) || { id: l.id, kind: "synthesized" };
        return el("button", { class: "copy-tag", onclick: () => copyText(loraTag(it, l.scale), loraTag(it, l.scale)) }, "Copy <lora>"); }),
      el("a", { href: j.image, download: `preview_${j.id}.png` }, "PNG"));
  } else {
    frame.replaceChildren(el("span", { class: "job-state muted" }, j.state === "error" ? `error: ${j.error}` : j.state));
  }
}

/** Groups of jobs, newest first: a base-model job and the LoRA job after it with the same seed form a pair. */
function jobGroups(ids) {
  const jobs = ids.map((id) => state.jobs.get(id)).filter(Boolean);
  const same = (a, b) => ["prompt", "negative_prompt", "seed", "steps", "width", "height", "scheduler", "guidance"]
    .every((k) => a.params[k] === b.params[k]);
  const groups = [];
  for (let i = 0; i < jobs.length; i++) {
    const j = jobs[i], n = jobs[i + 1];
    if (!j.params.loras.length && n && n.params.loras.length && same(j, n)) { groups.push([j, n]); i++; }
    else groups.push([j]);
  }
  return groups.reverse();
}

const galleryFigures = new Map();
let galleryOrder = "";
function renderGallery() {
  const ids = (state.jobOrder || []).filter((id) => state.jobs.get(id).state !== "cancelled");
  const groups = jobGroups(ids);
  const box = $("#gallery-items");
  const order = groups.map((g) => g.map((j) => j.id).join("+")).join(",");
  for (const g of groups) for (const j of g) {
    if (!galleryFigures.has(j.id)) galleryFigures.set(j.id, figure(j));
    updateFigure(galleryFigures.get(j.id), j);
  }
  if (order !== galleryOrder) {
    galleryOrder = order;
    box.replaceChildren(...groups.map((g) => el("div", { class: g.length > 1 ? "pair" : "single",
      role: "group", "aria-label": g.length > 1 ? `same seed ${g[0].params.seed}: base model and LoRA` : null },
      ...g.map((j) => galleryFigures.get(j.id)))));
  }
  const done = ids.filter((id) => state.jobs.get(id).state === "done").length;
  $("#gallery-count").textContent = done ? `(${done})` : "";
  if (!ids.length) $("#gallery-status").textContent = "No previews yet: synthesize a LoRA, then Generate preview.";
  else $("#gallery-status").textContent = `${done} preview(s) of this server's session, newest first; base and LoRA side by side when compared.`;
}

// ---------------------------------------------------------------------- preview (one per tab)
const previews = [];
class Preview {
  constructor(root, name) {
    this.root = root; this.name = name; this.lora = null; this.jobs = []; this.samples = [];
    root.append($("#preview-template").content.cloneNode(true));
    this.q = (s) => $(s, root);
    this.q(".generate").addEventListener("click", () => this.start());
    this.q(".cancel").addEventListener("click", () => this.cancel());
    this.q(".gen-seed-random").addEventListener("click", () => { this.q(".gen-seed").value = randomSeed(); });
    for (const lab of $$("label", root)) {  // each control named after its panel, for screen readers
      const c = $("input, select", lab);
      if (c) c.setAttribute("aria-label", `${lab.textContent.trim().split(/\s{2,}|\n/)[0]} (${name} preview)`);
    }
    previews.push(this);
  }
  init(info) {
    this.q(".prompt").value = info.trigger_prompt;
    for (const s of info.schedulers) this.q(".scheduler").append(el("option", { value: s }, s));
    if (!info.has_base) this.q(".lora-name").textContent = "previews need a base model: start the server with --base";
  }
  setLoRA(item) {
    this.lora = item;
    this.q(".lora-name").textContent = "LoRA: " + item.label;
    this.q(".generate").disabled = !state.info.has_base || this.jobs.some((id) => isOpen(state.jobs.get(id)));
  }
  async start() {
    banner("");
    const size = Number(this.q(".size").value);
    const body = { loras: [{ id: this.lora.id, scale: Number(this.q(".scale").value) }], prompt: this.q(".prompt").value,
      negative_prompt: this.q(".negative").value, scheduler: this.q(".scheduler").value, steps: Number(this.q(".steps").value),
      seed: Number(this.q(".gen-seed").value), guidance: Number(this.q(".gen-guidance").value), width: size, height: size };
    const bodies = this.q(".compare").checked ? [{ ...body, loras: [] }, body] : [body];
    const ids = [];
    try {
      for (const b of bodies) {
        const job = await postJSON("/api/generate", b);
        remember(job.id, this.name); ids.push(job.id); state.jobs.set(job.id, job);
      }
    } catch (err) { banner(err.message); }
    if (!ids.length) return;
    this.attach(ids);
  }
  attach(ids) {
    this.jobs = ids; this.samples = [];
    this.q(".generate").disabled = true; this.q(".cancel").disabled = false;
    keepFocus(this.q(".generate"), this.q(".cancel"));
    this.q(".gen-status").textContent = "queued";
    this.q(".latest").replaceChildren(...ids.map((id) => { const f = figure(state.jobs.get(id)); f.dataset.panel = this.name; return f; }));
    poll();
  }
  update() {
    const jobs = this.jobs.map((id) => state.jobs.get(id)).filter(Boolean);
    if (!jobs.length) return;
    for (const j of jobs) { const f = $(`figure[data-job="${j.id}"]`, this.root); if (f) updateFigure(f, j); }
    const running = jobs.find((j) => j.state === "running"), queued = jobs.find((j) => j.state === "queued");
    const bar = this.q(".gen-progress"), status = this.q(".gen-status");
    if (running) {
      const now = performance.now();
      this.samples.push([now, running.step, running.id]);
      this.samples = this.samples.filter((s) => s[2] === running.id && now - s[0] < 5000);
      const [t0, s0] = this.samples[0];
      const rate = now - t0 > 300 && running.step > s0 ? (running.step - s0) / ((now - t0) / 1000) : null;
      bar.max = Math.max(running.total, 1); bar.value = running.step;
      status.textContent = etaText(running, rate);
      return;
    }
    if (queued) { status.textContent = etaText(queued, null); return; }
    const last = jobs[jobs.length - 1];
    if (jobs.every((j) => j.state === "done")) {
      bar.max = Math.max(last.total, 1); bar.value = last.step;
      status.textContent = `done (${last.total} steps)`;
    } else if (jobs.some((j) => j.state === "error")) {
      const e = jobs.find((j) => j.state === "error"); banner(e.error); status.textContent = "error";
    } else status.textContent = "cancelled";
    this.finish(jobs.every((j) => j.state === "done"));
  }
  async cancel() {
    for (const id of this.jobs) await api(`/api/jobs/${id}/cancel`, { method: "POST" }).catch(() => {});
    poll();
  }
  finish(done) {
    const ids = this.jobs; this.jobs = [];
    this.q(".cancel").disabled = true; this.q(".generate").disabled = !this.lora || !state.info.has_base;
    const img = this.q(".preview-img");
    if (done && img) keepFocus(this.q(".cancel"), img.closest("figure").querySelector(".copy-params") || this.q(".generate"));
    else keepFocus(this.q(".cancel"), this.q(".generate"));
    if (done) announce(`preview ready (${ids.length} image${ids.length > 1 ? "s" : ""})`);
  }
}
const synthPreview = new Preview($("#preview-panel"), "synthesize");
const blendPreview = new Preview($("#blend-preview-panel"), "blend");

// ---------------------------------------------------------------------- blend + interpolate
function addBlendItem(source, id, label) {
  if (state.blend.some((b) => b.source === source && b.id === String(id))) return;
  state.blend.push({ source, id: String(id), label, weight: state.blend.length ? 0.5 : 1.0 });
  drawBlend();
}

function drawBlend() {
  const box = $("#blend-items"); box.replaceChildren();
  state.blend.forEach((b, i) => {
    const name = `${b.source === "library" ? "library #" + b.id : "result"}: ${b.label}`;
    const out = el("output", { class: "weight-value" }, b.weight.toFixed(2));
    const slider = el("input", { class: "weight", type: "range", min: "-2", max: "2", step: "0.05", value: b.weight,
      "aria-label": "weight of " + b.label });
    slider.addEventListener("input", () => { b.weight = Number(slider.value); out.textContent = b.weight.toFixed(2); });
    box.append(el("div", { class: "card blend-item" }, el("span", { class: "blend-label" }, name),
      el("div", { class: "row" }, slider, out,
        el("button", { "aria-label": "remove " + b.label + " from the blend",
          onclick: () => { state.blend.splice(i, 1); drawBlend(); $("#blend-run").focus(); } }, "✕"))));
  });
  $("#blend-run").disabled = state.blend.length === 0;
}

async function runBlend(items, rank) {
  const r = await postJSON("/api/blend", { items, rank });
  const rep = r.report;
  $("#blend-status").textContent = rep.rank === null ? "exact blend (no approximation error)"
    : `rank ${rep.rank}: relative error ${(100 * rep.overall_relative_error).toFixed(2)}% overall, ` +
      `${(100 * rep.max_module_relative_error).toFixed(2)}% worst module`;
  addResult(r);
  const card = el("div", { class: "card" }, el("h3", { tabindex: "-1", class: "blend-title" }, r.label),
    el("div", { class: "row" }, ...formatPicker(r),
      el("button", { class: "copy-tag", onclick: () => copyText(loraTag(r), loraTag(r)) }, "Copy <lora>")));
  $("#blend-result").replaceChildren(card);
  blendPreview.setLoRA(r);
  return card;
}

$("#blend-run").addEventListener("click", async () => {
  banner("");
  const rank = $("#blend-mode").value === "rank" ? Number($("#blend-rank").value) : null;
  try {
    const card = await runBlend(state.blend.map((b) => ({ source: b.source, id: b.id, weight: b.weight })), rank);
    keepFocus($("#blend-run"), $(".blend-title", card));
  } catch (err) { banner(err.message); }
});

function drawInterpolate() {  // defaults: from the second newest result to the newest, until the user picks
  const n = state.results.length;
  for (const [sel, back] of [["#interp-a", 2], ["#interp-b", 1]]) {
    const s = $(sel), old = s.value;
    s.replaceChildren(...state.results.map((r) => el("option", { value: r.id }, r.label)));
    if (s.dataset.chosen && old) s.value = old; else if (n >= back) s.value = state.results[n - back].id;
  }
  $("#interp-run").disabled = n < 2;
}
for (const sel of ["#interp-a", "#interp-b"]) $(sel).addEventListener("change", (e) => { e.target.dataset.chosen = "1"; });
function drawEditFrom() {
  const s = $("#edit-from"), old = s.value, usable = state.results.filter((r) => r.editable);  // in the model's latent space
  s.replaceChildren(...usable.slice().reverse().map((r) => el("option", { value: r.id }, r.label)));
  if (old && usable.some((r) => r.id === old) && s.dataset.chosen) s.value = old;
  $("#edit-run").disabled = !usable.length || !$("#edit-attr").options.length;
}
$("#edit-from").addEventListener("change", (e) => { e.target.dataset.chosen = "1"; });
$("#edit-strength").addEventListener("input", () => {
  const v = Number($("#edit-strength").value); $("#edit-strength-value").textContent = (v >= 0 ? "+" : "") + v.toFixed(2);
});
$("#edit-run").addEventListener("click", async () => {
  banner("");
  try {
    const r = await postJSON("/api/edit", { id: $("#edit-from").value, attribute: $("#edit-attr").value,
                                            strength: Number($("#edit-strength").value) });
    const card = addResult(r);
    synthPreview.setLoRA(r);
    $("#synth-status").textContent = `edited: ${r.label}`;
    if (card) $(".result-title", card).focus();
  } catch (err) { banner(err.message); }
});
async function loadAttributes() {  // the edit box shows only when the library has attributes to edit along
  if (!state.info.has_library) return;
  try {
    const r = await api("/api/attributes");
    $("#edit-attr").replaceChildren(...r.attributes.map((a) => el("option", { value: a }, a)));
    $("#edit-box").hidden = r.attributes.length === 0;
    drawEditFrom();
  } catch (err) { /* no attributes: no edit box */ }
}

$("#interp-t").addEventListener("input", () => { $("#interp-t-value").textContent = Number($("#interp-t").value).toFixed(2); });
$("#interp-run").addEventListener("click", async () => {
  banner("");
  const t = Number($("#interp-t").value);
  try {
    const card = await runBlend([{ source: "result", id: $("#interp-a").value, weight: 1 - t },
                                 { source: "result", id: $("#interp-b").value, weight: t }], null);
    $(".blend-title", card).focus();
  } catch (err) { banner(err.message); }
});

// ---------------------------------------------------------------------- library
async function loadLibrary() {
  if (!state.info.has_library) { $("#lib-status").textContent = "no library: start the server with --library"; return; }
  const q = encodeURIComponent($("#lib-q").value);
  try {
    const r = await api(`/api/library?q=${q}&limit=20&offset=${state.libOffset}`);
    if (!q) state.libTotal = r.total;
    $("#lib-status").textContent = `${r.total} entries` + (r.total ? `, showing ${r.offset + 1}–${r.offset + r.entries.length}` : "");
    const body = $("#lib-table tbody"); body.replaceChildren();
    for (const e of r.entries) body.append(el("tr", {}, el("td", {}, String(e.id)), el("td", {}, e.name),
      el("td", {}, e.source), el("td", {}, e.trainer),
      el("td", {}, el("button", { class: "lib-add", "aria-label": `add ${e.name} to the blend`,
        onclick: () => { addBlendItem("library", e.id, e.name); announce(`${e.name} added to the blend`); } }, "+ blend"))));
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
  const css = getComputedStyle(document.body);
  const xs = m.x.concat(m.marked ? [m.marked.xy[0]] : []), ys = m.y.concat(m.marked ? [m.marked.xy[1]] : []);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const px = (x) => 15 + (c.width - 30) * (x - x0) / ((x1 - x0) || 1);
  const py = (y) => c.height - 15 - (c.height - 30) * (y - y0) / ((y1 - y0) || 1);
  g.fillStyle = css.getPropertyValue("--card").trim() || "#fff"; g.fillRect(0, 0, c.width, c.height);
  g.fillStyle = css.getPropertyValue("--dots").trim() || "rgba(90,110,140,0.45)";
  for (let i = 0; i < m.x.length; i++) g.fillRect(px(m.x[i]) - 1.5, py(m.y[i]) - 1.5, 3, 3);
  if (m.marked) {
    g.fillStyle = "#d62828"; g.beginPath(); g.arc(px(m.marked.xy[0]), py(m.marked.xy[1]), 7, 0, 2 * Math.PI); g.fill();
  }
  const of = state.libTotal !== null ? ` of the library's ${state.libTotal} entries` : "";
  const text = `${m.x.length} LoRAs the model was trained on${of} (training rows only; 2-D PCA of their latents)` +
    (m.marked ? `; red: ${m.marked.label}` : m.note ? `; ${m.note}` : "; synthesize a face to mark it");
  $("#map-status").textContent = text;
  c.setAttribute("aria-label", "latent map: " + text);
}

$("#nearest-photo").addEventListener("change", async (e) => {
  if (!e.target.files.length) return;
  const form = new FormData(); form.append("image", e.target.files[0]); form.append("k", "5");
  const list = $("#nearest-list"); list.replaceChildren();
  try {
    const r = await api("/api/library/nearest", { method: "POST", body: form });
    for (const n of r.neighbours) list.append(el("li", {}, `${n.name} (id ${n.id}), cosine ${n.cosine.toFixed(3)}`));
    announce(`${r.neighbours.length} nearest identities listed`);
  } catch (err) { banner(photoError(err.message)); }
});

// ---------------------------------------------------------------------- start: restore the session
async function restore() {
  const r = await api("/api/loras");
  for (const item of r.loras) addResult(item);
  const synth = r.loras.filter((x) => x.kind === "synthesized"), blended = r.loras.filter((x) => x.kind === "blended");
  if (synth.length) { synthPreview.setLoRA(synth[synth.length - 1]); state.mark = synth[synth.length - 1].id; }
  if (blended.length) blendPreview.setLoRA(blended[blended.length - 1]);
  await refreshJobs();
  // re-attach each panel to the jobs this browser started that are still open
  const m = mine();
  for (const p of previews) {
    const open = (state.jobOrder || []).filter((id) => m[id] === p.name && isOpen(state.jobs.get(id)));
    if (open.length) p.attach(open);
  }
  if (r.loras.length) $("#synth-status").textContent = `${r.loras.length} LoRA(s) restored from this server's session`;
}

(async () => {
  try {
    state.info = await api("/api/info");
  } catch (err) { banner("cannot reach the server: " + err.message); return; }
  const info = state.info;
  for (const s of info.strategies) $("#strategy").append(el("option", { value: s }, s));
  $("#server-info").textContent = `model folder “${info.model}” · ${info.embedder} embeddings · ` +
    (info.has_base ? "previews on" : "no base model") + (info.base_is_random_weights ? " (random-weight demo model)" : "");
  synthPreview.init(info); blendPreview.init(info);
  updateSynthButton();
  try { await restore(); } catch (err) { banner(err.message); }
  await loadAttributes();
  // after Back / a reload the browser may keep the chosen file: use it, so the page and the file box agree
  const kept = $("#photo").files;
  if (kept && kept.length) usePhoto(kept[0]);
  document.body.dataset.ready = "1";
})();
