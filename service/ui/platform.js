// medrefine platform pages: datasets (drag-and-drop ZIP upload, verdict, thumbnails), jobs (train, live progress
// from the event stream, cancel), models (versions and metrics side by side, Promote -> `production`).
// Plain browser JavaScript, same origin only. Keys live in sessionStorage, never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const METRICS = ["dice", "iou", "precision", "recall", "hd95", "val_dice", "threshold", "n_cases"];
const FINISHED = ["succeeded", "failed", "cancelled"];
const streams = new Map();  // job id -> AbortController of its open event stream

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.kind = kind || "";
}

// -- keys and requests --------------------------------------------------------------------------------------

function keyHeaders(admin) {
  // Reads send the API key (or the admin key when only that one is given); changes send the admin key.
  const api = $("apikey").value.trim(), adminKey = $("adminkey").value.trim();
  sessionStorage.setItem("medrefine-api-key", api);
  sessionStorage.setItem("medrefine-admin-key", adminKey);
  const key = admin ? (adminKey || api) : (api || adminKey);
  return key ? { Authorization: "Bearer " + key } : {};
}

function errorText(status, body) {
  const field = body && body.field ? " (field " + body.field + ")" : "";
  return status + ": " + ((body && body.error) || "request failed") + field;
}

async function api(path, { method = "GET", json, admin = false } = {}) {
  const headers = keyHeaders(admin || method !== "GET");
  const init = { method, headers };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (!response.ok) throw new Error(errorText(response.status, body));
  return body;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "—" : String(text);
  if (className) td.className = className;
  return td;
}

function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : value;
}

// -- datasets -----------------------------------------------------------------------------------------------

function upload(file) {
  // XMLHttpRequest, not fetch: it reports upload progress.
  const form = new FormData();
  form.append("file", file, file.name);
  const name = $("dataset-name").value.trim();
  if (name) form.append("name", name);
  const bar = $("upload-progress"), verdict = $("upload-verdict");
  bar.hidden = false; bar.value = 0;
  verdict.replaceChildren();
  document.body.dataset.upload = "busy";
  setStatus("Uploading " + file.name + " …");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/datasets");
  for (const [key, value] of Object.entries(keyHeaders(true))) xhr.setRequestHeader(key, value);
  xhr.upload.onprogress = (event) => { if (event.lengthComputable) bar.value = event.loaded / event.total; };
  xhr.upload.onload = () => { bar.value = 1; setStatus("Uploaded; the server checks every pair …"); };
  xhr.onerror = () => { showVerdict(null, "network error: the upload did not reach the server"); };
  xhr.onload = () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (e) { body = { error: xhr.statusText }; }
    if (xhr.status >= 400) showVerdict(null, errorText(xhr.status, body));
    else showVerdict(body, null);
    loadDatasets();
  };
  xhr.send(form);
}

function showVerdict(dataset, failure) {
  // The server's verdict: ready (pairs), or error with each file at fault and why.
  const verdict = $("upload-verdict");
  verdict.replaceChildren();
  const head = document.createElement("p");
  if (failure) {
    head.textContent = "Refused: " + failure;
    head.className = "bad";
    document.body.dataset.upload = "refused";
  } else if (dataset.status === "ready") {
    head.textContent = "Ready: " + dataset.name + ", " + dataset.stats.pairs + " image/mask pairs.";
    head.className = "good";
    document.body.dataset.upload = "ready";
  } else {
    head.textContent = "Error: " + dataset.name + " is not usable. Files at fault:";
    head.className = "bad";
    document.body.dataset.upload = "error";
  }
  verdict.append(head);
  if (dataset && dataset.error) verdict.append(faultList(dataset.error));
  setStatus(head.textContent);
}

function faultList(error) {
  const list = document.createElement("ul");
  list.className = "faults";
  for (const [path, reason] of Object.entries(error.files || {})) {
    const item = document.createElement("li");
    const code = document.createElement("code");
    code.textContent = path;
    item.append(code, ": " + reason);
    list.append(item);
  }
  for (const problem of error.problems || []) {
    const item = document.createElement("li");
    item.textContent = problem;
    list.append(item);
  }
  return list;
}

async function loadDatasets() {
  const rows = await api("/datasets");
  const body = $("dataset-table").tBodies[0];
  body.replaceChildren();
  const select = $("job-dataset"), chosen = select.value;
  select.replaceChildren(...rows.filter((d) => d.status === "ready")
    .map((d) => new Option(d.name + " (" + d.stats.pairs + " pairs)", d.id)));
  if (chosen) select.value = chosen;
  for (const dataset of rows) {
    const row = body.insertRow();
    row.dataset.id = dataset.id;
    row.dataset.status = dataset.status;
    cell(row, dataset.name);
    cell(row, dataset.status, dataset.status === "ready" ? "good" : "bad");
    const stats = dataset.stats || {};
    cell(row, stats.pairs, "pairs");
    cell(row, stats.max_hw ? stats.max_hw.join("×") : null);
    cell(row, new Date(dataset.created_at).toLocaleString());
    cell(row, dataset.id.slice(0, 8), "mono");
    const samples = row.insertCell();
    if (dataset.status === "ready") showThumbnails(dataset.id, samples);
    else if (dataset.error) samples.append(faultList(dataset.error));
  }
  $("dataset-table").dataset.count = String(rows.length);
}

async function showThumbnails(id, into) {
  const detail = await api("/datasets/" + encodeURIComponent(id) + "?thumbnails=4&size=64");
  into.replaceChildren(...detail.thumbnails.map((thumb) => {
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = thumb.name;
    img.title = thumb.name;
    img.src = "data:image/png;base64," + thumb.png;
    return img;
  }));
}

function wireDropzone() {
  const zone = $("dropzone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) upload(file);
  });
  $("dataset-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) upload(file);
    event.target.value = "";
  });
}

// -- jobs ---------------------------------------------------------------------------------------------------

async function submitJob(event) {
  event.preventDefault();
  const number = (id) => ($(id).value.trim() === "" ? undefined : Number($(id).value));
  const hyperparameters = { preset: $("job-preset").value, epochs: number("job-epochs"),
                            learning_rate: number("job-lr"), batch_size: number("job-batch") };
  for (const key of Object.keys(hyperparameters)) if (hyperparameters[key] === undefined) delete hyperparameters[key];
  try {
    const job = await api("/jobs", { method: "POST", json: { kind: "train", dataset: $("job-dataset").value,
                                                             recipe: $("job-recipe").value.trim(), hyperparameters } });
    setStatus("Job " + job.id.slice(0, 8) + " queued.");
    await loadJobs();
  } catch (err) {
    setStatus(err.message, "error");
  }
}

function jobRow(job) {
  const body = $("job-table").tBodies[0];
  let row = body.querySelector("tr[data-id='" + job.id + "']");
  if (!row) {
    row = body.insertRow(0);
    row.dataset.id = job.id;
    row.dataset.events = "0";
  }
  return row;
}

function showJob(job) {
  const row = jobRow(job);
  const progress = job.progress || {};
  row.dataset.status = job.status;
  row.replaceChildren();
  cell(row, job.id.slice(0, 8) + " " + job.kind, "mono");
  cell(row, job.recipe);
  cell(row, job.status, "status " + job.status);
  cell(row, progress.phase ? progress.phase + (progress.phases ? " (" + progress.phases.join(" → ") + ")" : "") : null,
       "phase");
  cell(row, progress.epochs ? progress.epoch + "/" + progress.epochs : null, "epoch");
  cell(row, fixed(progress.train_loss, 4), "loss");
  cell(row, fixed(progress.val_dice, 3), "val-dice");
  const result = job.result && job.result.version !== undefined
    ? job.result.model + ":" + job.result.version + " (Dice " + fixed(job.result.metrics && job.result.metrics.dice, 3) + ")"
    : job.error;
  cell(row, result, "result");
  const actions = row.insertCell();
  if (!FINISHED.includes(job.status)) {
    const cancel = document.createElement("button");
    cancel.textContent = "Cancel";
    cancel.className = "cancel";
    cancel.addEventListener("click", () => cancelJob(job.id));
    actions.append(cancel);
  }
}

async function cancelJob(id) {
  try {
    showJob(await api("/jobs/" + encodeURIComponent(id), { method: "DELETE" }));
    setStatus("Cancel requested for job " + id.slice(0, 8) + ".");
  } catch (err) {
    setStatus(err.message, "error");
  }
}

async function follow(id) {
  // The job's server-sent events read through fetch (EventSource cannot send the Authorization header);
  // reconnects after an `event: timeout` or a dropped connection until the job finished.
  if (streams.has(id)) return;
  const controller = new AbortController();
  streams.set(id, controller);
  try {
    for (let attempt = 0; attempt < 100; attempt++) {
      const response = await fetch("/jobs/" + encodeURIComponent(id) + "/events",
                                   { headers: keyHeaders(false), signal: controller.signal });
      if (!response.ok) throw new Error("events of job " + id.slice(0, 8) + ": " + response.status);
      if (await readEvents(id, response.body)) return;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  } catch (err) {
    if (err.name !== "AbortError") setStatus(err.message, "error");
  } finally {
    streams.delete(id);
  }
}

async function readEvents(id, stream) {
  // True once `event: end` arrived. Events are separated by a blank line; `:` lines are keep-alives.
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value;
    let split;
    while ((split = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, split);
      buffer = buffer.slice(split + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (event === "job") {
        const job = JSON.parse(data.join("\n"));
        showJob(job);
        const row = jobRow(job);
        row.dataset.events = String(Number(row.dataset.events) + 1);
      } else if (event === "end") {
        if (JSON.parse(data.join("\n")).status === "succeeded") loadModels().catch(() => {});  // a new version
        return true;
      } else if (event === "error") {
        return true;
      }
    }
  }
}

async function loadJobs() {
  const jobs = await api("/jobs?limit=50");
  for (const job of jobs.slice().reverse()) {
    showJob(job);
    if (!FINISHED.includes(job.status)) follow(job.id);
  }
}

// -- models -------------------------------------------------------------------------------------------------

async function loadModels() {
  const models = await api("/models");
  const tables = await Promise.all(models.map(async (model) => {
    const versions = await api("/models/" + encodeURIComponent(model.name) + "/versions");
    return modelTable(model, versions);
  }));
  $("model-list").replaceChildren(...tables);
}

function modelTable(model, versions) {
  // One row per version, its metrics in columns: the comparison; the best Dice is marked.
  const box = document.createElement("div");
  box.className = "model";
  box.dataset.name = model.name;
  const title = document.createElement("h3");
  const aliases = Object.entries(model.aliases).map(([alias, v]) => alias + " → " + v).join(", ");
  title.textContent = model.name + (aliases ? " · " + aliases : "");
  const table = document.createElement("table");
  table.className = "grid";
  const head = table.createTHead().insertRow();
  for (const name of ["version", "aliases", ...METRICS, "dataset", "job", "created", ""]) {
    const th = document.createElement("th");
    th.textContent = name === "val_dice" ? "val Dice" : name === "dice" ? "Dice" : name;
    head.append(th);
  }
  const dices = versions.map((v) => v.metrics.dice).filter((d) => typeof d === "number");
  const best = dices.length ? Math.max(...dices) : null;
  const body = table.createTBody();
  for (const info of versions.slice().sort((a, b) => b.version - a.version)) {
    const row = body.insertRow();
    row.dataset.version = String(info.version);
    cell(row, model.name + ":" + info.version, "mono");
    cell(row, info.aliases.join(", ") || "", "aliases");
    for (const name of METRICS) {
      const value = info.metrics[name];
      const td = cell(row, name === "n_cases" ? value : fixed(value, name === "hd95" ? 1 : 3), "metric " + name);
      if (name === "dice" && value === best && versions.length > 1) td.classList.add("best");
    }
    cell(row, info.dataset_id ? info.dataset_id.slice(0, 8) : null, "mono");
    cell(row, info.job_id ? info.job_id.slice(0, 8) : null, "mono");
    cell(row, new Date(info.created_at).toLocaleString());
    const actions = row.insertCell();
    if (!info.aliases.includes("production")) {
      const promote = document.createElement("button");
      promote.textContent = "Promote";
      promote.className = "promote";
      promote.addEventListener("click", () => promoteVersion(model.name, info.version));
      actions.append(promote);
    }
  }
  box.append(title, table);
  return box;
}

async function promoteVersion(name, version) {
  try {
    await api("/models/" + encodeURIComponent(name) + "/aliases/production", { method: "PUT", json: { version } });
    setStatus(name + ":" + version + " is now production.");
    await loadModels();
  } catch (err) {
    setStatus(err.message, "error");
  }
}

// -- tabs and start -----------------------------------------------------------------------------------------

function showTab() {
  const tab = (location.hash || "#datasets").slice(1);
  for (const page of document.querySelectorAll(".tab-page")) page.hidden = page.id !== tab;
  for (const link of document.querySelectorAll("nav a[data-tab]")) link.classList.toggle("active", link.dataset.tab === tab);
  document.body.dataset.tab = tab;
}

async function refresh() {
  try {
    await Promise.all([loadDatasets(), loadJobs(), loadModels()]);
    document.body.dataset.loaded = "yes";
  } catch (err) {
    setStatus(err.message, "error");
  }
}

function wire() {
  $("apikey").value = sessionStorage.getItem("medrefine-api-key") || "";
  $("adminkey").value = sessionStorage.getItem("medrefine-admin-key") || "";
  for (const id of ["apikey", "adminkey"]) $(id).addEventListener("change", refresh);
  window.addEventListener("hashchange", showTab);
  $("job-form").addEventListener("submit", submitJob);
  wireDropzone();
  showTab();
  refresh();
}

wire();
