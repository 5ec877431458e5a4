// medrefine UI: upload an image, show coarse vs refined contours and the gate heat map, drag a box to refine.
// Plain browser JavaScript, no build step. Talks to POST /segment and POST /refine (multipart), POST /generate
// (JSON; the panel shows only when the server serves generators; each image rated 1-5 through POST
// /feedback/generation) and GET /readyz. Accepting, correcting (clicks, brush, eraser) and saving a mask for
// training: feedback.js.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null,          // the File the user chose (sent again with /refine)
  size: null,          // [H, W] of the decoded image
  image: null,         // ImageBitmap/HTMLImageElement of the decoded gray image
  coarse: null,        // Uint8Array H*W masks (0/1)
  refined: null,
  user: null,          // mask from the last box refine
  gate: null,          // Uint8ClampedArray H*W (0..255)
  gateFlat: false,     // the gate has one value everywhere: a fixed blend, not an uncertainty map
  box: null,           // prompt box of the automatic pipeline [x0, y0, x1, y1]
  userBox: null,       // box the user dragged
  drag: null,
  tool: "box",         // what a press on the image does: box | point+ | point- | brush | eraser (feedback.js)
  points: [],          // click prompts [[x, y], ...] in image pixels, with pointLabels (1 lesion, 0 background)
  pointLabels: [],
};

function setStatus(text, kind) {
  $("status").textContent = text;
  document.body.dataset.state = kind;
}

function authHeaders() {
  const key = $("apikey").value.trim();
  if (key) sessionStorage.setItem("medrefine-api-key", key);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function postForm(path, form) {
  const response = await fetch(path, { method: "POST", body: form, headers: authHeaders() });
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (!response.ok) {
    const field = body && body.field ? " (field " + body.field + ")" : "";
    throw new Error(response.status + ": " + ((body && body.error) || "request failed") + field);
  }
  return body;
}

function loadImage(base64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot decode a PNG returned by the server"));
    img.src = "data:image/png;base64," + base64;
  });
}

async function pngPixels(base64, width, height) {
  // One channel (0..255) of a server PNG, resampled to width x height (masks come at image size already).
  const img = await loadImage(base64);
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, width, height);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const out = new Uint8ClampedArray(width * height);
  for (let i = 0; i < out.length; i++) out[i] = rgba[4 * i];
  return out;
}

async function maskFrom(base64) {
  const [h, w] = state.size;
  const values = await pngPixels(base64, w, h);
  const mask = new Uint8Array(w * h);
  for (let i = 0; i < mask.length; i++) mask[i] = values[i] > 127 ? 1 : 0;
  return mask;
}

function contourInto(rgba, mask, w, h, color, radius) {
  // Paint the boundary pixels of a 0/1 mask (a pixel inside with a 4-neighbour outside), thickened.
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!mask[i]) continue;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
      if (!edge) continue;
      for (let dy = -radius; dy <= radius; dy++) {
        for (let dx = -radius; dx <= radius; dx++) {
          const xx = x + dx, yy = y + dy;
          if (xx < 0 || yy < 0 || xx >= w || yy >= h) continue;
          const j = 4 * (yy * w + xx);
          rgba[j] = color[0]; rgba[j + 1] = color[1]; rgba[j + 2] = color[2]; rgba[j + 3] = 255;
        }
      }
    }
  }
}

function gateInto(rgba, gate) {
  // Blue (low gate: keep the coarse mask) to red (high gate: trust the refiner), half transparent.
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i] / 255;
    const j = 4 * i;
    rgba[j] = Math.round(255 * g); rgba[j + 1] = 48; rgba[j + 2] = Math.round(255 * (1 - g)); rgba[j + 3] = 110;
  }
}

function describeGate(gate) {
  // A gate with one value everywhere (gate_min == gate_max) is a fixed blend of coarse and refiner, not an
  // uncertainty map: say so in the legend rather than show a flat "heat map" as if it meant something.
  let lo = 255, hi = 0;
  for (const g of gate || []) { if (g < lo) lo = g; if (g > hi) hi = g; }
  state.gateFlat = Boolean(gate) && hi - lo <= 1;
  $("gate-legend").textContent = !gate ? "gate (low → high)"
    : state.gateFlat ? "gate: constant " + (lo / 255).toFixed(2) + " everywhere (fixed blend, no per-pixel uncertainty)"
    : "gate " + (lo / 255).toFixed(2) + " → " + (hi / 255).toFixed(2) + " (keep coarse → trust refiner)";
}

function drawBox(ctx, box, color, scale) {
  if (!box) return;
  ctx.save();
  ctx.strokeStyle = color; ctx.lineWidth = Math.max(1, scale);
  ctx.setLineDash([4 * scale, 3 * scale]);
  ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  ctx.restore();
}

function drawPoints(ctx, scale) {
  state.points.forEach(([x, y], i) => {
    ctx.beginPath();
    ctx.arc(x, y, 3 * scale, 0, 2 * Math.PI);
    ctx.fillStyle = state.pointLabels[i] ? "#39e07f" : "#ff6b6b";
    ctx.fill();
  });
}

function render() {
  if (!state.size) return;
  const [h, w] = state.size;
  const overlay = $("overlay-layer");
  overlay.width = w; overlay.height = h;
  const ctx = overlay.getContext("2d");
  const layer = ctx.createImageData(w, h);
  const radius = Math.max(0, Math.round(Math.max(w, h) / 512));
  if ($("show-gate").checked && state.gate) gateInto(layer.data, state.gate);
  if ($("show-coarse").checked && state.coarse) contourInto(layer.data, state.coarse, w, h, [255, 176, 32], radius);
  if ($("show-refined").checked && state.refined) contourInto(layer.data, state.refined, w, h, [57, 224, 127], radius);
  if (state.user) contourInto(layer.data, state.user, w, h, [53, 198, 255], radius);
  ctx.putImageData(layer, 0, 0);
  const scale = Math.max(1, Math.round(Math.max(w, h) / 512));
  if ($("show-box").checked) drawBox(ctx, state.box, "#ffffff", scale);
  drawBox(ctx, state.userBox, "#35c6ff", scale);
  drawPoints(ctx, scale);
  if (state.drag) drawBox(ctx, normalise(state.drag), "#35c6ff", scale);
  let painted = 0;
  for (let i = 3; i < layer.data.length; i += 4) if (layer.data[i]) painted++;
  overlay.dataset.painted = String(painted);
}

function showTable(result, extra) {
  const rows = {
    "area (px)": result.area_px,
    "area (mm²)": result.area_mm2 === null || result.area_mm2 === undefined ? "no spacing" : result.area_mm2.toFixed(2),
    "lesion found": result.lesion_found === undefined ? "" : (result.lesion_found ? "yes" : "no finding (empty mask)"),
    "predicted IoU": result.iou === undefined ? "" : Number(result.iou).toFixed(3),
    "needs review": result.needs_review === undefined ? "" : (result.needs_review ? "yes: check this mask" : "no"),
    "uncertainty": result.uncertainty === undefined ? "" : (state.gateFlat
      ? "none: constant gate " + Number(result.uncertainty).toFixed(2) : Number(result.uncertainty).toFixed(3)),
    "box (xyxy)": result.box ? result.box.map((v) => Math.round(v)).join(", ") : "none",
    ...extra,
  };
  for (const [stage, ms] of Object.entries(result.timings_ms || {})) rows["time " + stage + " (ms)"] = Number(ms).toFixed(1);
  const body = $("result-table").tBodies[0];
  body.replaceChildren();
  for (const [key, value] of Object.entries(rows)) {
    if (value === "" || value === undefined) continue;
    const tr = body.insertRow();
    tr.insertCell().textContent = key;
    tr.insertCell().textContent = String(value);
  }
}

async function segment(file) {
  state.file = file; state.user = null; state.userBox = null; state.points = []; state.pointLabels = [];
  setStatus("Segmenting " + file.name + " …", "busy");
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("outputs", "image,mask,coarse_mask,gate");
  appendModel(form);
  const threshold = $("threshold").value.trim();
  if (threshold) form.append("threshold", threshold);
  try {
    const result = await postForm("/segment", form);
    state.size = result.shape;
    const [h, w] = state.size;
    state.image = await loadImage(result.image_png_base64);
    const base = $("image-layer");
    base.width = w; base.height = h;
    base.getContext("2d").drawImage(state.image, 0, 0, w, h);
    state.refined = await maskFrom(result.mask_png_base64);
    state.coarse = result.coarse_mask_png_base64 ? await maskFrom(result.coarse_mask_png_base64) : null;
    state.gate = result.gate_png_base64 ? await pngPixels(result.gate_png_base64, w, h) : null;
    describeGate(state.gate);
    state.box = result.box;
    render();
    showTable(result, { model: modelLabel(result.model) });
    if (window.feedback) window.feedback.segmented(result);
    setStatus("Segmented " + w + "×" + h + " image. Drag a box to refine.", "segmented");
  } catch (err) {
    setStatus(err.message, "error");
  }
}

function toImage(event) {
  const overlay = $("overlay-layer");
  const rect = overlay.getBoundingClientRect();
  const [h, w] = state.size;
  const x = Math.min(w, Math.max(0, (event.clientX - rect.left) * w / rect.width));
  const y = Math.min(h, Math.max(0, (event.clientY - rect.top) * h / rect.height));
  return [x, y];
}

function normalise(drag) {
  return [Math.min(drag[0], drag[2]), Math.min(drag[1], drag[3]), Math.max(drag[0], drag[2]), Math.max(drag[1], drag[3])];
}

async function refine(box, points, labels) {
  // box: [x0, y0, x1, y1] or null; points/labels: click prompts (feedback.js), sent with the box when both exist.
  setStatus("Refining with your " + (box ? "box" : "clicks") + " …", "busy");
  const form = new FormData();
  const round = (v) => Math.round(v * 10) / 10;
  form.append("file", state.file, state.file.name);
  if (box) form.append("box", JSON.stringify(box.map(round)));
  if (points && points.length) {
    form.append("points", JSON.stringify(points.map((p) => p.map(round))));
    form.append("point_labels", JSON.stringify(labels));
  }
  form.append("outputs", "mask");
  appendModel(form);
  try {
    const result = await postForm("/refine", form);
    state.user = await maskFrom(result.mask_png_base64);
    state.userBox = box;
    if (window.feedback) window.feedback.refined();
    render();
    showTable(result, { "embedding cache": result.cache_hit ? "hit" : "miss", model: modelLabel(result.model) });
    setStatus("Refined with your " + (box ? "box" : "clicks") + " (embedding cache " +
              (result.cache_hit ? "hit" : "miss") + ").", "refined");
  } catch (err) {
    setStatus(err.message, "error");
  }
}

async function generate(event) {
  event.preventDefault();
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const body = {
    prompt: $("gen-prompt").value, modality: $("gen-modality").value,
    guidance_scale: number("gen-guidance"), steps: number("gen-steps"),
  };
  // "Keep the best": the images become best_of candidates, ranked by the selector or the reward model.
  const keep = $("gen-keep").value;
  if (keep) {
    body.best_of = number("gen-count");
    body.rank_by = keep;
  } else {
    body.num_images = number("gen-count");
  }
  if ($("gen-negative").value.trim()) body.negative_prompt = $("gen-negative").value;
  if (number("gen-seed") !== null) body.seed = number("gen-seed");
  $("gen-status").textContent = "Generating…";
  document.body.dataset.generate = "busy";
  try {
    const response = await fetch("/generate", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", ...authHeaders() },
    });
    const result = await response.json();
    if (!response.ok) {
      throw new Error(response.status + ": " + (result.error || "request failed") +
                      (result.field ? " (field " + result.field + ")" : ""));
    }
    const gallery = $("gen-gallery");
    gallery.replaceChildren(...result.images_png_base64.map((b64, index) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + b64;
      img.alt = result.modality + ": " + result.prompt;
      figure.append(img, ratingControl(generatedImage(body, result, index)));
      return figure;
    }));
    $("gen-seed").placeholder = "random (last: " + result.seed + ")";
    const ranker = { selector: "the selector", reward: "the reward model (predicted rating)" }[result.ranked_by];
    const kept = ranker
      ? "the best of " + body.best_of + " by " + ranker + ", score " + result.scores[0].toFixed(2)
      : result.images_png_base64.length + " image(s)";
    $("gen-status").textContent = kept + ", seed " + result.seed + ", " + Math.round(result.timings_ms.total) + " ms";
    document.body.dataset.generate = "done";
  } catch (err) {
    $("gen-status").textContent = err.message;
    document.body.dataset.generate = "error";
  }
}

// What regenerates image `index` of a /generate answer (medplatform.feedback.GeneratedImage): the request as
// sent, the seed and generator version the server answered.
function generatedImage(request, result, index) {
  const image = {
    prompt: result.prompt, modality: result.modality, seed: result.seed, steps: request.steps,
    guidance_scale: request.guidance_scale, generator_version: result.model.version, index,
    num_images: request.best_of !== undefined ? 1 : request.num_images,
  };
  if (request.best_of !== undefined) {
    image.best_of = request.best_of;
    image.rank_by = request.rank_by;
  }
  if (request.negative_prompt !== undefined) image.negative_prompt = request.negative_prompt;
  return image;
}

// Five buttons under a generated image; a click posts the rating and marks the saved one (aria-pressed).
function ratingControl(image) {
  const control = document.createElement("div");
  control.className = "rating";
  control.setAttribute("role", "group");
  control.setAttribute("aria-label", "rate image " + (image.index + 1) + " (1 = poor, 5 = good)");
  const note = document.createElement("span");
  note.className = "rating-note muted";
  const buttons = [1, 2, 3, 4, 5].map((value) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = String(value);
    button.dataset.rating = String(value);
    button.title = "rate " + value + " of 5";
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => rate(image, value, control, buttons, note));
    return button;
  });
  control.append(...buttons, note);
  return control;
}

async function rate(image, value, control, buttons, note) {
  const adminKey = $("gen-adminkey").value.trim();
  if (adminKey) sessionStorage.setItem("medrefine-admin-key", adminKey);
  const headers = { "Content-Type": "application/json",
                    ...(adminKey ? { Authorization: "Bearer " + adminKey } : authHeaders()) };
  const body = { image, rating: value };
  if ($("gen-rating-dataset").value.trim()) body.dataset = $("gen-rating-dataset").value.trim();
  note.textContent = "saving…";
  document.body.dataset.rating = "busy";
  try {
    const response = await fetch("/feedback/generation", { method: "POST", body: JSON.stringify(body), headers });
    let result = null;
    try { result = await response.json(); } catch (e) { result = { error: response.statusText }; }
    if (!response.ok) {
      throw new Error(response.status + ": " + (result.error || "request failed") +
                      (result.field ? " (field " + result.field + ")" : ""));
    }
    for (const button of buttons) button.setAttribute("aria-pressed", String(button === buttons[value - 1]));
    control.dataset.saved = result.id;
    control.dataset.rating = String(value);
    note.textContent = "saved: " + value + "/5";
    note.classList.remove("error");
    document.body.dataset.rating = "saved";
  } catch (err) {
    note.textContent = err.message;
    note.classList.add("error");
    document.body.dataset.rating = "error";
  }
}

function showGeneration(info) {
  const generation = info.generation;
  if (!generation || !generation.modalities || !generation.modalities.length) return;
  $("gen-modality").replaceChildren(...generation.modalities.map((name) => new Option(name, name)));
  if (generation.max_steps) $("gen-steps").max = generation.max_steps;
  if (generation.max_images) $("gen-count").max = generation.max_images;
  if ((generation.rank_by || []).includes("reward") && !$("gen-keep").querySelector("option[value='reward']")) {
    $("gen-keep").append(new Option("the best, by the reward model", "reward"));
  }
  $("generate-panel").hidden = false;
}

// The model picker: "name:version" of every registered version (GET /models + versions), aliases shown; its
// value goes out as the `model` form field of /segment and /refine ("" = the server's default).
async function fillModelPicker() {
  const pick = $("model-pick");
  try {
    const get = async (path) => {
      const response = await fetch(path, { headers: authHeaders() });
      if (!response.ok) throw new Error(path + ": " + response.status);
      return response.json();
    };
    const options = [new Option("server default (production)", "")];
    for (const model of await get("/models")) {
      for (const info of await get("/models/" + encodeURIComponent(model.name) + "/versions")) {
        const spec = model.name + ":" + info.version;
        const aliases = info.aliases.length ? " (" + info.aliases.join(", ") + ")" : "";
        options.push(new Option(spec + aliases, spec));
      }
    }
    const chosen = pick.value;
    pick.replaceChildren(...options);
    if (options.some((o) => o.value === chosen)) pick.value = chosen;
    pick.dataset.loaded = String(options.length - 1);
  } catch (err) {
    pick.title = "model list unavailable (" + err.message + ")";
  }
}

function appendModel(form) {
  if ($("model-pick").value) form.append("model", $("model-pick").value);
}

function modelLabel(model) {
  // A registry version ("name:3") in full; a bare artifact hash shortened.
  return (model.version.includes(":") ? model.version : model.version.slice(0, 12)) + " / " + model.backend;
}

function wire() {
  const saved = sessionStorage.getItem("medrefine-api-key");
  if (saved) $("apikey").value = saved;
  fillModelPicker();
  $("apikey").addEventListener("change", fillModelPicker);
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) segment(file);
  });
  for (const id of ["show-coarse", "show-refined", "show-gate", "show-box"]) $(id).addEventListener("change", render);
  $("generate-form").addEventListener("submit", generate);
  $("gen-adminkey").value = sessionStorage.getItem("medrefine-admin-key") || "";
  const overlay = $("overlay-layer");
  overlay.addEventListener("mousedown", (event) => {
    if (!state.size || !state.file || state.tool !== "box") return;  // other tools: feedback.js
    const [x, y] = toImage(event);
    state.drag = [x, y, x, y];
  });
  overlay.addEventListener("mousemove", (event) => {
    if (!state.drag) return;
    const [x, y] = toImage(event);
    state.drag[2] = x; state.drag[3] = y;
    render();
  });
  window.addEventListener("mouseup", () => {
    if (!state.drag) return;
    const box = normalise(state.drag);
    state.drag = null;
    if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) refine(box, state.points, state.pointLabels); else render();
  });
  fetch("/readyz").then((r) => r.json()).then((info) => {
    $("model").textContent = info.ready
      ? "model " + String(info.model_version).slice(0, 12) + " · " + info.backend
      : "server not ready: " + (info.reason || "starting");
    showGeneration(info);
  }).catch(() => { $("model").textContent = "server unreachable"; });
}

wire();
