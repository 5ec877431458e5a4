// medrefine UI, the correction panel: after /segment the user accepts the mask, or corrects it (box refine from
// app.js, lesion/background clicks through /refine, a brush and an eraser for the last pixels) and saves it with
// POST /feedback/segmentation (image, mask PNG 0/255, model version, seconds, prompt count) for training.
// Uses app.js's globals (state, $, render, refine, authHeaders, toImage). The working mask is state.user (the
// last refine's answer, or a copy of the automatic mask once the brush touches it); #mask-layer holds it as
// 0/255 pixels and is exactly what is uploaded.
"use strict";

const feedback = (() => {
  const session = { started: null, prompts: 0, model: null, strokes: 0, painting: false };

  function working() {
    // The mask being corrected; the brush starts from the automatic mask when nothing was refined yet.
    if (!state.user && state.refined) state.user = Uint8Array.from(state.refined);
    return state.user;
  }

  function syncMaskLayer() {
    // #mask-layer: the working mask at the image's size, gray 0/255, opaque (its PNG is what /feedback gets).
    const canvas = $("mask-layer");
    const mask = state.user || state.refined;
    if (!state.size || !mask) return;
    const [h, w] = state.size;
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d");
    const data = ctx.createImageData(w, h);
    for (let i = 0; i < mask.length; i++) {
      const v = mask[i] ? 255 : 0;
      data.data[4 * i] = v; data.data[4 * i + 1] = v; data.data[4 * i + 2] = v; data.data[4 * i + 3] = 255;
    }
    ctx.putImageData(data, 0, 0);
    let lesion = 0;
    for (const v of mask) lesion += v;
    canvas.dataset.lesion = String(lesion);
  }

  function say(text, kind) {
    $("fb-status").textContent = text;
    document.body.dataset.feedback = kind;
  }

  function segmented(result) {
    session.started = performance.now();
    session.prompts = 0; session.strokes = 0;
    session.model = result.model ? result.model.version : null;
    $("feedback-panel").hidden = false;
    syncMaskLayer();
    say("Accept the mask, or correct it and save.", "ready");
  }

  function refined() {
    session.prompts += 1;  // a box or a click sent to /refine
    syncMaskLayer();
  }

  function paint(event) {
    // A filled disc of the brush radius (image pixels) set to 1 (brush) or 0 (eraser): pixel-exact, no
    // anti-aliasing, so the saved PNG holds 0 and 255 only.
    const mask = working();
    const [h, w] = state.size;
    const [cx, cy] = toImage(event);
    const r = Math.max(0.5, Number($("fb-brush").value) || 4);
    const value = state.tool === "brush" ? 1 : 0;
    for (let y = Math.max(0, Math.floor(cy - r)); y <= Math.min(h - 1, Math.ceil(cy + r)); y++) {
      for (let x = Math.max(0, Math.floor(cx - r)); x <= Math.min(w - 1, Math.ceil(cx + r)); x++) {
        if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r) mask[y * w + x] = value;
      }
    }
    render();
  }

  async function click(event) {
    const [x, y] = toImage(event);
    state.points.push([x, y]);
    state.pointLabels.push(state.tool === "point+" ? 1 : 0);
    await refine(state.userBox, state.points, state.pointLabels);
  }

  async function save(accepted) {
    if (!state.file || !state.size) return;
    if (accepted) {  // the automatic mask as it is: no prompts, no edits
      state.user = null; state.userBox = null; state.points = []; state.pointLabels = [];
      session.prompts = 0;
      render();
    }
    syncMaskLayer();
    const seconds = Math.max(0, (performance.now() - session.started) / 1000);
    const blob = await new Promise((resolve) => $("mask-layer").toBlob(resolve, "image/png"));
    const form = new FormData();
    form.append("image", state.file, state.file.name);
    form.append("mask", blob, "mask.png");
    form.append("model_version", session.model || "");
    form.append("seconds", seconds.toFixed(2));
    form.append("prompts", String(session.prompts));
    if ($("fb-dataset").value.trim()) form.append("dataset", $("fb-dataset").value.trim());
    const adminKey = $("fb-adminkey").value.trim();
    if (adminKey) sessionStorage.setItem("medrefine-admin-key", adminKey);
    const headers = adminKey ? { Authorization: "Bearer " + adminKey } : authHeaders();
    say("Saving …", "busy");
    try {
      const response = await fetch("/feedback/segmentation", { method: "POST", body: form, headers });
      const body = await response.json().catch(() => ({ error: response.statusText }));
      if (!response.ok) {
        throw new Error(response.status + ": " + (body.error || "request failed") +
                        (body.field ? " (field " + body.field + ")" : ""));
      }
      $("feedback-panel").dataset.saved = body.id;
      say("Saved to '" + body.dataset + "' (" + body.prompts + " prompt(s), " + Math.round(body.seconds) +
          " s, " + body.details.mask_pixels + " lesion pixels).", "saved");
    } catch (err) {
      say(err.message, "error");
    }
  }

  function wire() {
    $("fb-adminkey").value = sessionStorage.getItem("medrefine-admin-key") || "";
    for (const input of document.querySelectorAll("input[name=fb-tool]")) {
      input.addEventListener("change", () => { state.tool = input.value; });
    }
    const overlay = $("overlay-layer");
    overlay.addEventListener("mousedown", (event) => {
      if (!state.size || !state.file || state.tool === "box") return;
      if (state.tool === "brush" || state.tool === "eraser") {
        session.painting = true; session.strokes += 1;
        paint(event);
      } else {
        click(event);
      }
    });
    overlay.addEventListener("mousemove", (event) => { if (session.painting) paint(event); });
    window.addEventListener("mouseup", () => {
      if (!session.painting) return;
      session.painting = false;
      syncMaskLayer();
    });
    $("fb-accept").addEventListener("click", () => save(true));
    $("fb-save").addEventListener("click", () => save(false));
  }

  wire();
  return { segmented, refined };
})();
window.feedback = feedback;
