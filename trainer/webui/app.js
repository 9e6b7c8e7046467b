// hublab trainer WebUI: plain JS, no dependencies. Every action calls the JSON API of hublab.trainer.webui.
"use strict";
const $ = (id) => document.getElementById(id);
let INFO = null, DATASETS = [], currentRun = null, runSource = null, expSource = null;

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

async function api(method, path, body, raw) {
  const opts = { method, headers: { "X-Hublab": "1" } };
  if (raw !== undefined) opts.body = raw;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

// kind: true (done), "hint", "busy", or anything else: an error
function say(id, text, kind) {
  const m = $(id); m.textContent = text;
  m.className = "msg " + (kind === true ? "ok" : kind === "hint" || kind === "busy" ? kind : "err");
}

// ---- tabs -----------------------------------------------------------------------------------------
function show(view) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("on", b.dataset.view === view));
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("on", v.id === "view-" + view));
  if (view === "runs") { loadRuns(); redrawPlots(); }
  if (view === "export") loadFiles();
  if (view === "train") planTraining();
  if (view === "chat" || view === "evaluate") loadModels().catch((e) => say("chat-msg", e.message));
  location.hash = view;
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));

// ---- datasets -------------------------------------------------------------------------------------
async function loadDatasets() {
  DATASETS = await api("GET", "/api/datasets");
  const body = $("dataset-table").querySelector("tbody");
  body.replaceChildren();
  const box = $("train-data");
  const was = Object.fromEntries([...box.querySelectorAll("input[type=checkbox]")].map((c) => [c.value, c.checked]));
  box.replaceChildren();
  DATASETS.forEach((d, i) => {
    body.append(el("tr", {}, el("td", {}, el("input", { type: "checkbox", class: "mix-check", value: i })),
      el("td", { text: d.label + (d.local ? "" : " (hub: not local)") }), el("td", { class: "num", text: fmtBytes(d.size) }),
      el("td", {}, el("input", { type: "number", class: "mix-ratio", value: "1", step: "0.1", min: "0", size: "4" })),
      el("td", {}, el("button", { text: "Inspect", class: "inspect", onclick: () => inspect(d) }))));
    if (!d.local) return;
    const cb = el("input", { type: "checkbox", value: d.label, "data-i": i, onchange: planTraining });
    if (was[d.label]) cb.checked = true;
    const ratio = el("input", { type: "number", value: "1", step: "0.1", min: "0", class: "ratio", onchange: planTraining });
    ratio.style.width = "5em";
    box.append(el("div", { class: "row" }, el("label", {}, cb, " " + d.label), el("label", {}, "ratio ", ratio)));
  });
  const list = $("exp-sources");
  list.replaceChildren(...DATASETS.map((d) => el("option", { value: d.path })));
}
function fmtBytes(n) { return n > 1e6 ? (n / 1e6).toFixed(1) + " MB" : n > 1e3 ? (n / 1e3).toFixed(1) + " kB" : n + " B"; }

$("upload-btn").addEventListener("click", async () => {
  const f = $("upload-file").files[0];
  if (!f) return say("upload-msg", "choose a file first");
  if (INFO && f.size > INFO.max_upload) return say("upload-msg", `${f.name}: ${f.size} bytes is over the upload limit of ${INFO.max_upload}`);
  const q = new URLSearchParams({ file: f.name, folder: $("upload-folder").value.trim(), format: $("upload-format").value });
  try {
    const r = await api("PUT", "/api/datasets?" + q, undefined, f);
    say("upload-msg", `saved ${r.path}` + (r.records !== null ? `: ${r.records} records (${r.format})` : ""), true);
    await loadDatasets();
  } catch (e) { say("upload-msg", e.message); }
});

let inspected = null;
async function inspect(d) {
  inspected = d;
  $("inspect-card").hidden = false;
  $("inspect-name").textContent = d.label;
  const q = new URLSearchParams({ path: d.path, name: d.name, base: $("inspect-base").value.trim(),
    template: $("inspect-template").value });
  const out = $("inspect-out");
  out.textContent = "reading…";
  try {
    const r = await api("GET", "/api/inspect?" + q);
    out.replaceChildren();
    out.append(el("div", { class: "stats", id: "inspect-stats" },
      el("span", { text: `${r.records} records` }), el("span", { text: `format ${r.format}` }),
      el("span", { text: Object.entries(r.kinds).map(([k, v]) => `${v} ${k}`).join(", ") }),
      el("span", { text: r.length ? `${r.unit}: ${r.length.min}–${r.length.max}, mean ${r.length.mean}` : "" }),
      el("span", { text: `${r.duplicate_count} duplicates` })));
    const hist = el("div", { class: "hist", id: "inspect-hist" });
    const top = Math.max(1, ...r.histogram.map((b) => b.count));
    r.histogram.forEach((b) => { const bar = el("div", { title: `${b.from}–${b.to} ${r.unit}: ${b.count}` }); bar.style.height = (100 * b.count / top) + "%"; hist.append(bar); });
    out.append(el("h3", { text: `length histogram (${r.unit})` }), hist);
    if (r.problems.length) out.append(el("h3", { text: "problems" }), el("pre", { id: "inspect-problems", text: r.problems.join("\n") }));
    if (r.duplicates.length) out.append(el("h3", { text: "duplicates" }),
      el("div", { class: "hint", text: r.duplicates.slice(0, 30).map((x) => `row ${x.row} = row ${x.same_as}`).join(", ") }));
    const base = $("inspect-base").value.trim();
    out.append(el("h3", { id: "inspect-template-used", text: base ? `as training on ${base} renders them (${r.template} template)`
      : `as the ${r.template} template renders them (no base given)` }));
    r.preview.forEach((p) => out.append(el("div", { class: "hint", text: p.source }), el("pre", { class: "preview", text: p.rendered })));
  } catch (e) { out.textContent = ""; out.append(el("div", { class: "msg err", text: e.message })); }
}
$("inspect-btn").addEventListener("click", () => inspected && inspect(inspected));

$("mix-btn").addEventListener("click", async () => {
  const rows = [...$("dataset-table").querySelectorAll("tbody tr")];
  const parts = rows.filter((r) => r.querySelector(".mix-check").checked).map((r) => {
    const d = DATASETS[+r.querySelector(".mix-check").value];
    return { path: d.path, name: d.name, ratio: +r.querySelector(".mix-ratio").value };
  });
  try {
    const r = await api("POST", "/api/mix", { name: $("mix-name").value.trim() || "mix.jsonl", parts, total: +$("mix-total").value });
    say("mix-msg", `wrote ${r.path}: ${r.records} examples`, true);
    loadDatasets();
  } catch (e) { say("mix-msg", e.message); }
});

$("gen-btn").addEventListener("click", async () => {
  say("gen-msg", "reading this machine's documentation…", true);
  try {
    const r = await api("POST", "/api/generate", { domain: $("gen-domain").value, name: $("gen-name").value.trim(), limit: +$("gen-limit").value });
    say("gen-msg", `wrote ${r.path}: ${r.records} question/answer pairs`, true);
    loadDatasets();
  } catch (e) { say("gen-msg", e.message); }
});

// ---- train ----------------------------------------------------------------------------------------
function buildFields() {
  for (const [sec, box] of [["train", "train-fields"], ["lora", "lora-fields"]]) {
    const grid = $(box);
    for (const [key, s] of Object.entries(INFO.schema[sec])) {
      if (key === "output") continue;
      let input;
      if (key === "template") {
        input = el("select", {}); INFO.templates.forEach((t) => input.append(el("option", { text: t })));
      } else if (s.choices) {
        input = el("select", {}); s.choices.forEach((t) => input.append(el("option", { text: t })));
      } else if (s.type === "bool") {
        input = el("input", { type: "checkbox" }); input.checked = !!s.default;
      } else {
        input = el("input", { type: s.type === "str" || s.type === "list" ? "text" : "number",
          step: s.type === "float" ? "any" : "1" });
      }
      if (s.type !== "bool") input.value = Array.isArray(s.default) ? s.default.join(",") : s.default;
      input.id = `f-${sec}-${key}`; input.dataset.sec = sec; input.dataset.key = key; input.dataset.type = s.type;
      input.addEventListener("change", planTraining);
      grid.append(el("label", { title: s.help }, `${key}`, input));
    }
  }
}
function trainForm() {
  const form = { name: $("run-name").value.trim(), nproc: +$("run-nproc").value, train: {}, lora: {}, data: [] };
  document.querySelectorAll("#train-fields [data-key], #lora-fields [data-key]").forEach((i) => {
    let v = i.type === "checkbox" ? i.checked : i.value;
    if (i.dataset.type === "int" || i.dataset.type === "float") v = Number(v);
    form[i.dataset.sec][i.dataset.key] = v;
  });
  $("train-data").querySelectorAll(".row").forEach((r) => {
    const cb = r.querySelector("input[type=checkbox]");
    if (!cb.checked) return;
    const d = DATASETS[+cb.dataset.i];
    form.data.push({ path: d.path, name: d.name, ratio: +r.querySelector(".ratio").value });
  });
  if ($("run-export").value.trim()) form.export = { adapter: $("run-export").value.trim(), outtype: "q8_0" };
  return form;
}
let planTimer = null;
function planTraining() {
  clearTimeout(planTimer);
  planTimer = setTimeout(async () => {
    try {
      const p = await api("POST", "/api/train/plan", trainForm());
      $("train-toml").textContent = p.toml; $("train-command").textContent = p.command; say("train-msg", "", true);
    } catch (e) { say("train-msg", e.message); }
  }, 150);
}
["run-name", "run-nproc", "run-export"].forEach((id) => $(id).addEventListener("change", planTraining));
document.querySelectorAll("button.copy").forEach((b) => b.addEventListener("click", async () => {
  const text = $(b.dataset.copy).textContent;
  try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; }
  catch (e) { const r = document.createRange(); r.selectNodeContents($(b.dataset.copy)); getSelection().removeAllRanges(); getSelection().addRange(r); b.textContent = "Selected"; }
  setTimeout(() => (b.textContent = "Copy"), 1500);
}));
$("train-start").addEventListener("click", async () => {
  try {
    const job = await api("POST", "/api/train", trainForm());
    show("runs"); openRun(job.id);
  } catch (e) { say("train-msg", e.message); }
});

// ---- runs -----------------------------------------------------------------------------------------
async function loadRuns() {
  const jobs = await api("GET", "/api/jobs?kind=train");
  const body = $("runs-table").querySelector("tbody");
  body.replaceChildren();
  for (const j of jobs) {
    const last = j.steps[j.steps.length - 1] || {};
    const ev = j.steps.filter((s) => s.eval_loss !== undefined).pop() || {};
    body.append(el("tr", { "data-id": j.id }, el("td", {}, el("input", { type: "checkbox", class: "cmp", value: j.id })),
      el("td", {}, el("a", { href: "#runs", text: `${j.name} (${j.id})`, onclick: (e) => { e.preventDefault(); openRun(j.id); } })),
      el("td", {}, el("span", { class: "badge " + j.status, text: j.status })),
      el("td", { class: "num step", text: `${last.step || 0}/${j.total || "?"}` }), el("td", { class: "num loss", text: last.loss ?? "" }),
      el("td", { class: "num eval", text: ev.eval_loss ?? "" }), el("td", { class: "num toks", text: last.tok_s ?? "" })));
  }
}
// the open run's pushes keep its row in the table current too
function updateRunRow(p) {
  const row = $("runs-table").querySelector(`tr[data-id="${p.id}"]`);
  if (!row) return;
  const last = p.steps[p.steps.length - 1] || {};
  const ev = p.steps.filter((s) => s.eval_loss !== undefined).pop() || {};
  const badge = row.querySelector(".badge"); badge.textContent = p.status; badge.className = "badge " + p.status;
  row.querySelector(".step").textContent = `${last.step || 0}/${p.total || "?"}`;
  row.querySelector(".loss").textContent = last.loss ?? "";
  row.querySelector(".eval").textContent = ev.eval_loss ?? "";
  row.querySelector(".toks").textContent = last.tok_s ?? "";
}
// other running jobs (another tab, a resumed run) are polled while the Runs view shows
setInterval(() => {
  if ($("view-runs").classList.contains("on") && $("runs-table").querySelector(".badge.running")) loadRuns();
}, 3000);
function openRun(id) {
  $("run-card").hidden = false;
  if (runSource) runSource.close();
  currentRun = id;
  $("run-title").textContent = id;
  runSource = new EventSource(`/api/jobs/${id}/events`);
  runSource.onmessage = (m) => renderRun(JSON.parse(m.data));
  runSource.addEventListener("end", () => { runSource.close(); runSource = null; loadRuns(); });
  loadRuns();
}
function fmtS(s) { if (s == null) return "–"; s = Math.round(s); return s >= 3600 ? `${Math.floor(s / 3600)}h${Math.floor(s % 3600 / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m${s % 60}s` : `${s}s`; }
function renderRun(p) {
  const st = $("run-status"); st.textContent = p.status; st.className = "badge " + p.status;
  const last = p.steps[p.steps.length - 1] || {};
  $("run-stats").replaceChildren(el("span", { id: "run-step", text: `step ${last.step || 0}/${p.total || "?"}` }),
    el("span", { text: `loss ${last.loss ?? "–"}` }), el("span", { id: "run-toks", text: `${p.tok_s ?? "–"} tok/s` }),
    el("span", { id: "run-eta", text: `ETA ${fmtS(p.eta_s)}` }), el("span", { text: `elapsed ${fmtS(p.elapsed_s)}` }));
  $("run-command").textContent = p.commands.map((c) => c.map(q).join(" ")).join("\n");
  const log = $("run-log"); log.textContent = p.log.join("\n"); log.scrollTop = log.scrollHeight;
  plot($("loss-plot"), [{ name: p.name, steps: p.steps }]);
  updateRunRow(p);
}
function q(a) { return /^[\w@%+=:,./-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\\''") + "'"; }
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
function plot(canvas, runs) {
  // drawn at the size it is shown (and the screen's pixel ratio): text stays 12 px on a phone
  const dpr = window.devicePixelRatio || 1, W = Math.max(240, Math.round(canvas.clientWidth || 640));
  const H = Math.round(Math.min(260, Math.max(180, W * 0.45))), L = 46, B = 24;
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.height = H + "px";
  const ctx = canvas.getContext("2d"); ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  canvas.runs = runs;  // redrawn at the new width when the window changes (a phone turned, a window resized)
  ctx.clearRect(0, 0, W, H);
  const pts = runs.flatMap((r) => r.steps.flatMap((s) => [s.loss, s.eval_loss].filter((v) => v !== undefined && isFinite(v))));
  const maxStep = Math.max(1, ...runs.flatMap((r) => r.steps.map((s) => s.step)));
  canvas.dataset.points = runs.reduce((n, r) => n + r.steps.length, 0);
  ctx.fillStyle = "#374151"; ctx.font = "12px sans-serif";
  if (!pts.length) { ctx.fillText("waiting for the first step…", L, H / 2); return; }
  let lo = Math.min(...pts), hi = Math.max(...pts); if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
  const x = (s) => L + (W - L - 10) * s / maxStep, y = (v) => 8 + (H - B - 8) * (hi - v) / (hi - lo);
  ctx.strokeStyle = "#e5e7eb";
  for (let i = 0; i <= 4; i++) { const v = lo + (hi - lo) * i / 4; ctx.beginPath(); ctx.moveTo(L, y(v)); ctx.lineTo(W, y(v)); ctx.stroke(); ctx.fillText(v.toFixed(2), 2, y(v) + 4); }
  ctx.textAlign = "right"; ctx.fillText("step " + maxStep, W - 4, H - 6); ctx.textAlign = "left"; ctx.fillText("0", L, H - 6);
  runs.forEach((r, k) => {
    const c = COLORS[k % COLORS.length];
    const tr = r.steps.filter((s) => isFinite(s.loss)), ev = r.steps.filter((s) => s.eval_loss !== undefined);
    ctx.strokeStyle = c; ctx.lineWidth = 1.3; ctx.beginPath();
    tr.forEach((s, i) => (i ? ctx.lineTo(x(s.step), y(s.loss)) : ctx.moveTo(x(s.step), y(s.loss)))); ctx.stroke();
    ctx.fillStyle = c; ctx.setLineDash([4, 3]); ctx.beginPath();
    ev.forEach((s, i) => (i ? ctx.lineTo(x(s.step), y(s.eval_loss)) : ctx.moveTo(x(s.step), y(s.eval_loss)))); ctx.stroke(); ctx.setLineDash([]);
    ev.forEach((s) => { ctx.beginPath(); ctx.arc(x(s.step), y(s.eval_loss), 3, 0, 7); ctx.fill(); });
    ctx.fillText(`${r.name}: train — eval ●`, L + 8, 16 + 13 * k);
  });
}
// a plot is redrawn at its new width when the window changes (a phone turned) or its view shows again
function redrawPlots() { document.querySelectorAll("canvas").forEach((c) => c.runs && c.clientWidth && plot(c, c.runs)); }
let resizeTimer = null;
window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(redrawPlots, 100); });
$("run-stop").addEventListener("click", async () => { if (currentRun) { await api("POST", `/api/jobs/${currentRun}/stop`, {}); } });
$("run-resume").addEventListener("click", async () => {
  if (!currentRun) return;
  try { const j = await api("POST", `/api/jobs/${currentRun}/resume`, { max_steps: +$("resume-steps").value }); openRun(j.id); loadRuns(); }
  catch (e) { $("run-log").textContent = e.message; }
});
$("compare-btn").addEventListener("click", async () => {
  const ids = [...document.querySelectorAll(".cmp:checked")].map((c) => c.value);
  const runs = await Promise.all(ids.map((id) => api("GET", `/api/jobs/${id}?lines=0`)));
  const out = $("compare-out"); out.replaceChildren();
  const cv = el("canvas", { width: 640, height: 260, id: "compare-plot" }); out.append(cv);
  plot(cv, runs.map((r) => ({ name: r.name, steps: r.steps })));
  const keys = new Set(runs.flatMap((r) => Object.entries({ ...(r.config.train || {}), ...(r.config.lora || {}) }).map(([k]) => k)));
  const flat = (r) => ({ ...(r.config.train || {}), ...(r.config.lora || {}), processes: r.config.nproc });
  const diff = [...keys, "processes"].filter((k) => new Set(runs.map((r) => JSON.stringify(flat(r)[k]))).size > 1);
  const t = el("table", {}, el("tr", {}, el("th", { text: "" }), ...runs.map((r) => el("th", { text: r.name }))));
  const best = (r) => Math.min(...r.steps.filter((s) => s.eval_loss !== undefined).map((s) => s.eval_loss));
  for (const [label, f] of [["status", (r) => r.status], ["steps", (r) => (r.steps.at(-1) || {}).step],
    ["last loss", (r) => (r.steps.at(-1) || {}).loss], ["best eval", best], ["tok/s", (r) => r.tok_s],
    ...diff.map((k) => [k, (r) => JSON.stringify(flat(r)[k])])]) {
    t.append(el("tr", {}, el("td", { text: label }), ...runs.map((r) => el("td", { text: String(f(r)) }))));
  }
  out.append(t);
});

// ---- export ---------------------------------------------------------------------------------------
function expForm() {
  const kind = $("exp-kind").value;
  return { kind, source: $("exp-source").value.trim(), out: $("exp-out").value.trim(), outtype: $("exp-outtype").value,
    base_gguf: $("exp-base-gguf").value.trim(), dtype: $("exp-dtype").value, calibration: $("exp-cal").value.trim(),
    model_dir: $("exp-model-dir").value.trim(), name: $("exp-pkg-name").value.trim(), version: $("exp-pkg-version").value.trim(),
    license: $("exp-pkg-license").value.trim(), unsigned: $("exp-unsigned").checked, publish: $("exp-publish").checked,
    registry: $("exp-registry").value.trim(),
    types: [...document.querySelectorAll("#exp-types input:checked")].map((c) => c.value),
    profiles: [...document.querySelectorAll("#exp-profiles input:checked")].map((c) => c.value) };
}
function expKind() {
  const kind = $("exp-kind").value;
  document.querySelectorAll("#exp-card [class*='k-']").forEach((e) => (e.hidden = !e.classList.contains("k-" + kind)));
  const types = kind === "gguf" ? ["f16", "f32", "bf16", "q8_0"] : ["q8_0", "f16", "f32"];
  $("exp-outtype").replaceChildren(...types.map((t) => el("option", { text: t })));
  planExport();
}
let expTimer = null;
function planExport() {
  clearTimeout(expTimer);
  expTimer = setTimeout(async () => {
    if (!$("exp-source").value.trim()) {  // nothing typed yet: say what goes there, not an error
      $("exp-plan").textContent = "";
      return say("exp-msg", "choose a source: a run's adapter (runs/NAME/out/adapter), an HF model dir or a GGUF under exports/", "hint");
    }
    try { const p = await api("POST", "/api/export/plan", expForm()); $("exp-plan").textContent = p.commands.join("\n"); say("exp-msg", "", true); }
    catch (e) { $("exp-plan").textContent = ""; say("exp-msg", e.message); }
  }, 150);
}
$("exp-kind").addEventListener("change", expKind);
document.querySelectorAll("#exp-card input, #exp-card select").forEach((i) => i.addEventListener("change", planExport));
$("exp-start").addEventListener("click", async () => {
  try {
    const job = await api("POST", "/api/export", expForm());
    $("exp-job").hidden = false; $("exp-job-title").textContent = job.id;
    if (expSource) expSource.close();
    expSource = new EventSource(`/api/jobs/${job.id}/events`);
    let last = job;
    expSource.onmessage = (m) => { const p = last = JSON.parse(m.data); const s = $("exp-status"); s.textContent = p.status; s.className = "badge " + p.status; $("exp-log").textContent = p.log.join("\n"); };
    expSource.addEventListener("end", async () => {
      expSource.close(); await loadFiles();
      // a finished adapter export offers the next step: make it an expert
      if (last.status === "done" && last.config.kind === "adapter" && last.outputs.length) openInstall(last.outputs[0]);
    });
  } catch (e) { say("exp-msg", e.message); }
});
async function loadFiles() {
  const files = await api("GET", "/api/files?path=exports");
  $("exp-files").replaceChildren(...files.map((f) => el("li", {}, el("a", { href: "/files/" + f.path.split("/").map(encodeURIComponent).join("/"), download: "", text: f.path }), ` ${fmtBytes(f.size)} `,
    ...(f.adapter ? [el("button", { class: "install", text: "Install as expert", onclick: () => openInstall(f.path) })] : []))));
  const runs = await api("GET", "/api/jobs?kind=train");
  const list = $("exp-sources");
  for (const r of runs) list.append(el("option", { value: `runs/${r.name}/out/adapter` }));
  for (const f of files) list.append(el("option", { value: f.path }));
  const done = runs.filter((r) => r.status === "done");
  if (!$("exp-source").value.trim() && done.length) { $("exp-source").value = `runs/${done[0].name}/out/adapter`; planExport(); }
}

// ---- install as expert ----------------------------------------------------------------------------
function instForm() {
  return { adapter: $("inst-adapter").value, name: $("inst-name").value.trim(), base: $("inst-base").value,
    chat_format: $("inst-format").value, description: $("inst-desc").value.trim(), examples: $("inst-examples").value,
    replace: $("inst-replace").checked, run: $("inst-adapter").dataset.run || "" };
}
async function openInstall(adapter) {
  const card = $("install-card"); card.hidden = false; $("inst-chat").hidden = true;
  try {
    const d = await api("GET", "/api/install?" + new URLSearchParams({ adapter }));
    $("inst-adapter").value = d.adapter; $("inst-adapter").dataset.run = d.run; $("inst-adapter-name").textContent = d.adapter;
    $("inst-dir").textContent = d.dir; $("inst-name").value = d.name; $("inst-desc").value = d.description;
    $("inst-examples").value = d.examples.join("\n");
    $("inst-base").replaceChildren(el("option", { value: "", text: "(choose the base it was trained on)" }),
      ...d.bases.map((b) => el("option", { value: b.value, text: b.label })));
    $("inst-base").value = d.base;
    $("inst-format").replaceChildren(...INFO.templates.map((t) => el("option", { text: t })));
    $("inst-format").value = d.chat_format;
    planInstall();
  } catch (e) { say("inst-msg", e.message); }
  card.scrollIntoView({ block: "nearest" });
}
let instTimer = null;
function planInstall() {
  clearTimeout(instTimer);
  instTimer = setTimeout(async () => {
    try {
      const p = await api("POST", "/api/install/plan", instForm());
      $("inst-toml").textContent = (p.base_toml ? `# also writes ${p.base_toml}: base ${p.base}, the workspace's GGUF\n` : "")
        + `# ${p.path}\n${p.toml}`;
      say("inst-msg", p.exists ? `${p.name} is installed already: tick replace to overwrite it` :
        p.shadows ? `${p.name} takes the place of the model of that name` : "", p.exists || p.shadows ? "hint" : true);
    } catch (e) { $("inst-toml").textContent = ""; say("inst-msg", e.message); }
  }, 150);
}
document.querySelectorAll("#install-card input, #install-card select, #install-card textarea").forEach((i) => i.addEventListener("change", planInstall));
$("inst-btn").addEventListener("click", async () => {
  try {
    const r = await api("POST", "/api/install", instForm());
    say("inst-msg", `installed ${r.name} (${r.path}): Chat and Evaluate list it now`, true);
    await loadModels(r.name);
    $("inst-chat").hidden = false; $("inst-chat").dataset.model = r.name;
  } catch (e) { say("inst-msg", e.message); }
});
$("inst-chat").addEventListener("click", () => { show("chat"); $("chat-model").value = $("inst-chat").dataset.model; });

// ---- evaluate and chat ----------------------------------------------------------------------------
// the shell's models: experts first; a base is labelled as one (untuned, it may wander or loop)
async function loadModels(select) {
  const r = await api("GET", "/api/models");
  const experts = r.models.filter((m) => m.expert), bases = r.models.filter((m) => !m.expert);
  const label = (m) => m.name + (m.description ? ` — ${m.description}` : "");
  const keep = $("chat-model").value;
  $("chat-model").replaceChildren(el("optgroup", { label: "Experts" }, ...experts.map((m) => el("option", { value: m.name, text: label(m) }))),
    el("optgroup", { label: "Base models (untuned: may ramble or loop)" }, ...bases.map((m) => el("option", { value: m.name, text: `${m.name} (base model)` }))));
  $("chat-model").value = select || keep || (experts[0] || bases[0] || {}).name || "";
  const keepB = $("bench-expert").value;
  $("bench-expert").replaceChildren(...experts.map((m) => el("option", { value: m.name, text: label(m) })));
  $("bench-expert").value = select || keepB || (experts[0] || {}).name || "";
  const problems = r.errors.length ? `\n${r.errors.length} model file(s) did not load: ${r.errors.join("; ")}` : "";
  if (!experts.length) say("bench-msg", "no experts yet: train one, export its adapter and press Install as expert" + problems, "hint");
  else say("bench-msg", problems.trim(), problems ? "" : "hint");
  if (problems) say("chat-msg", problems.trim());
}
$("bench-start").addEventListener("click", async () => {
  try {
    const job = await api("POST", "/api/bench", { expert: $("bench-expert").value, questions: $("bench-questions").value.trim(), max_tokens: +$("bench-max").value });
    const log = $("bench-log"); log.hidden = false;
    const src = new EventSource(`/api/jobs/${job.id}/events`);
    src.onmessage = (m) => { const p = JSON.parse(m.data); log.textContent = `[${p.status}]\n` + p.log.join("\n"); };
    src.addEventListener("end", async () => { src.close(); renderBench(await api("GET", `/api/jobs/${job.id}/bench`)); });
  } catch (e) { say("bench-msg", e.message); }
});
function renderBench(r) {
  const out = $("bench-out"); out.replaceChildren();
  if (r.summary) out.append(el("div", { class: "stats", id: "bench-summary" },
    el("span", { text: `base ${r.summary.base.model}: hit rate ${r.summary.base.hit_rate}, ${r.summary.base.tokens_per_s} tok/s` }),
    el("span", { text: `expert ${r.summary.expert.model}: hit rate ${r.summary.expert.hit_rate}, ${r.summary.expert.tokens_per_s} tok/s` }),
    el("span", { text: `gain ${r.summary.hit_rate_gain}` })));
  for (const row of r.rows) {
    const side = (s) => { const a = row[s] || {}; const d = el("div", {}, el("b", { text: s + (a.hit ? " ✓ key term" : "") }), "\n" + (a.answer || ""));
      if (a.degenerate) d.append(el("div", { class: "bad", text: "degenerate: " + a.degenerate })); return d; };
    out.append(el("h3", { text: row.question }), el("div", { class: "side bench-row" }, side("base"), side("expert")));
  }
}
let chatMessages = [], chatBusy = false;
async function sendChat() {
  const input = $("chat-input"), text = input.value.trim();
  if (!text || chatBusy) return;
  const model = $("chat-model").value;
  if (!model) return say("chat-msg", "model: choose one (no models found; see Evaluate for why)");
  chatBusy = true; $("chat-send").disabled = true;
  chatMessages.push({ role: "user", content: text }); input.value = ""; renderChat(true);
  say("chat-msg", `${model} is answering…`, "busy");
  try {
    const r = await api("POST", "/api/chat", { model, messages: chatMessages, max_tokens: +$("chat-max").value });
    chatMessages.push({ role: "assistant", content: r.text }); renderChat(); say("chat-msg", `${r.tokens} tokens, ${r.tokens_per_s} tok/s`, true);
  } catch (e) {  // the question goes back into the box, so nothing typed is lost
    chatMessages.pop(); renderChat(); say("chat-msg", e.message);
    if (!input.value.trim()) input.value = text;
  } finally { chatBusy = false; $("chat-send").disabled = false; input.focus(); }
}
$("chat-send").addEventListener("click", sendChat);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendChat(); }
});
$("chat-clear").addEventListener("click", () => { chatMessages = []; renderChat(); });
function renderChat(pending) {
  $("chat-log").replaceChildren(...chatMessages.map((m) => el("div", { class: m.role, text: m.content })),
    ...(pending ? [el("div", { class: "assistant pending", text: "answering…" })] : []));
}

// ---- start ----------------------------------------------------------------------------------------
(async function init() {
  INFO = await api("GET", "/api/info");
  $("upload-format").replaceChildren(...INFO.formats.map((f) => el("option", { text: f })));
  $("inspect-template").replaceChildren(...INFO.templates.map((f) => el("option", { text: f })));

  $("gen-domain").replaceChildren(...INFO.domains.map((f) => el("option", { text: f })));
  $("exp-types").replaceChildren(...INFO.quant_types.map((t) => el("label", {}, el("input", { type: "checkbox", value: t }),
    " " + t + (INFO.needs_imatrix.includes(t) ? " (imatrix)" : ""))));
  $("exp-profiles").replaceChildren(...INFO.profiles.map((t) => el("label", {}, el("input", { type: "checkbox", value: t }), " " + t)));
  $("exp-registry").placeholder = INFO.registry || "configured registry";
  document.querySelectorAll("#exp-types input, #exp-profiles input").forEach((i) => i.addEventListener("change", planExport));
  $("train-bases").replaceChildren(...INFO.bases.map((b) => el("option", { value: b.value, label: b.label })));
  buildFields();
  $("f-train-base").setAttribute("list", "train-bases");
  // Inspect renders with what the run will use: the Train tab's base and template
  const follow = () => { $("inspect-base").value = $("f-train-base").value.trim(); $("inspect-template").value = $("f-train-template").value; };
  follow();
  ["f-train-base", "f-train-template"].forEach((id) => $(id).addEventListener("change", follow));
  await loadDatasets();
  expKind();
  loadModels().catch((e) => { say("chat-msg", e.message); say("bench-msg", e.message); });
  const view = location.hash.slice(1);
  if (view && $("view-" + view)) show(view);
})();
