// The page of `maskrcnn serve`: one request per image (POST v1/predict, everything scoring above the slider's
// lowest value), then every change of the slider or of a class toggle is drawn here, from the answer's RLE or
// polygon masks, without asking the server again. No libraries, no network but this server.
"use strict";

const LOWEST_SCORE = 0.05;   // the slider's minimum: what the page asks the server for
const FILL_ALPHA = 0.45;

const $ = (id) => document.getElementById(id);
const state = {model: null, image: null, answer: null, masks: [], hidden: new Set(), owner: null, fileName: ""};

// ------------------------------------------------------------------------------------------- masks

// COCO's compressed RLE string -> run lengths (pycocotools' rleFrString).
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// One mask as a row-major Uint8Array of width*height (1 inside).
function decodeRle(segmentation, width, height) {
  const mask = new Uint8Array(width * height);
  const counts = typeof segmentation.counts === "string" ? rleCounts(segmentation.counts) : segmentation.counts;
  let index = 0;  // column-major position, as COCO counts run down the columns
  counts.forEach((run, i) => {
    if (i % 2 === 1) {
      for (let j = index; j < index + run; j++) {
        mask[(j % height) * width + Math.floor(j / height)] = 1;
      }
    }
    index += run;
  });
  return mask;
}

function decodePolygons(polygons, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  for (const polygon of polygons) {
    context.beginPath();
    // COCO polygon points are pixel centres; canvas pixel i spans [i, i+1).
    for (let i = 0; i < polygon.length; i += 2) context.lineTo(polygon[i], polygon[i + 1]);
    context.closePath();
    context.fill();
  }
  const pixels = context.getImageData(0, 0, width, height).data;
  const mask = new Uint8Array(width * height);
  for (let i = 0; i < mask.length; i++) mask[i] = pixels[4 * i + 3] > 127 ? 1 : 0;
  return mask;
}

function decodeMask(instance, width, height) {
  const segmentation = instance.segmentation;
  if (!segmentation) return null;
  return Array.isArray(segmentation) ? decodePolygons(segmentation, width, height)
    : decodeRle(segmentation, width, height);
}

// ------------------------------------------------------------------------------------------- drawing

function visible() {
  const threshold = Number($("score").value);
  return state.answer.instances
    .map((instance, i) => ({instance, i}))
    .filter(({instance}) => instance.score > threshold && !state.hidden.has(instance.category_name));
}

function classColor(name) {
  const index = state.model.class_names.indexOf(name);
  return index >= 0 ? state.model.class_colors[index] : [255, 255, 255];
}

function draw() {
  const {width, height} = state.answer;
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  context.drawImage(state.image, 0, 0, width, height);
  const shown = visible();
  // Lowest score first, so the best object is on top where masks overlap (as in the server's overlays).
  const order = shown.slice().sort((a, b) => a.instance.score - b.instance.score);
  const owner = new Int32Array(width * height).fill(-1);
  for (const {i} of order) {
    const mask = state.masks[i];
    if (!mask) continue;
    for (let p = 0; p < mask.length; p++) if (mask[p]) owner[p] = i;
  }
  const frame = context.getImageData(0, 0, width, height);
  const pixels = frame.data;
  for (let p = 0; p < owner.length; p++) {
    const i = owner[p];
    if (i < 0) continue;
    const color = classColor(state.answer.instances[i].category_name);
    const x = p % width, y = (p - x) / width;
    const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 || owner[p - 1] !== i ||
      owner[p + 1] !== i || owner[p - width] !== i || owner[p + width] !== i;
    const alpha = edge ? 1 : FILL_ALPHA;
    for (let c = 0; c < 3; c++) pixels[4 * p + c] = Math.round(pixels[4 * p + c] * (1 - alpha) + color[c] * alpha);
  }
  context.putImageData(frame, 0, 0);
  context.lineWidth = Math.max(1, Math.round(Math.max(width, height) / 400));
  for (const {instance} of shown) {
    const [x, y, w, h] = instance.bbox;
    context.strokeStyle = `rgb(${classColor(instance.category_name).join(",")})`;
    context.strokeRect(x, y, w, h);
  }
  state.owner = owner;
  legend(shown);
  document.body.dataset.state = "drawn";
}

function legend(shown) {
  const perClass = new Map();
  for (const instance of state.answer.instances) {
    if (instance.score > Number($("score").value)) {
      perClass.set(instance.category_name, (perClass.get(instance.category_name) || 0) + 1);
    }
  }
  const names = [...new Set(state.answer.instances.map((d) => d.category_name))].sort((a, b) =>
    (perClass.get(b) || 0) - (perClass.get(a) || 0) || a.localeCompare(b));
  const shownPerClass = names.filter((n) => !state.hidden.has(n) && perClass.get(n));
  const total = shown.length;
  const parts = shownPerClass.map((n) => `${perClass.get(n)} ${n}`);
  const summary = $("summary");
  summary.textContent = `${total} object${total === 1 ? "" : "s"}${parts.length ? ": " + parts.join(", ") : ""}`;
  summary.dataset.total = String(total);
  const list = $("classes");
  list.replaceChildren(...names.map((name) => {
    const item = document.createElement("li");
    item.dataset.class = name;
    item.dataset.count = String(perClass.get(name) || 0);
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.checked = !state.hidden.has(name);
    toggle.setAttribute("aria-label", `show ${name}`);
    toggle.addEventListener("change", () => {
      if (toggle.checked) state.hidden.delete(name); else state.hidden.add(name);
      draw();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${classColor(name).join(",")})`;
    const label = document.createElement("label");
    label.append(toggle, swatch, document.createTextNode(` ${name}`));
    const count = document.createElement("span");
    count.className = "count";
    count.textContent = item.dataset.count;
    item.append(label, count);
    return item;
  }));
}

// ------------------------------------------------------------------------------------------- hover

function hover(event) {
  const tip = $("tip");
  if (!state.owner) return;
  const canvas = $("canvas");
  const box = canvas.getBoundingClientRect();
  const x = Math.floor((event.clientX - box.left) * canvas.width / box.width);
  const y = Math.floor((event.clientY - box.top) * canvas.height / box.height);
  const i = x >= 0 && y >= 0 && x < canvas.width && y < canvas.height ? state.owner[y * canvas.width + x] : -1;
  if (i < 0) {
    tip.hidden = true;
    return;
  }
  const instance = state.answer.instances[i];
  tip.textContent = `${instance.category_name} ${instance.score.toFixed(2)}`;
  tip.style.left = `${event.clientX - box.left + 12}px`;
  tip.style.top = `${event.clientY - box.top + 12}px`;
  tip.hidden = false;
}

// ------------------------------------------------------------------------------------------- requests

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModel() {
  const response = await fetch("v1/model");
  const body = await response.json();
  if (!response.ok) {
    setStatus(body.error || `the server answered ${response.status}`, true);
    setTimeout(loadModel, 1000);
    return;
  }
  state.model = body;
  const names = body.class_names.filter((n) => n !== "__background__");
  $("model-line").textContent = `${names.length} classes, ${body.precision} on ${body.device}`;
  $("score").value = Math.max(LOWEST_SCORE, body.defaults.score_thresh);
  $("score-value").textContent = Number($("score").value).toFixed(2);
  setStatus("");
}

async function segment(file) {
  if (!state.model) return setStatus("the model is not loaded yet", true);
  document.body.dataset.state = "busy";
  state.fileName = file.name || "image";
  setStatus(`segmenting ${state.fileName}…`);
  const form = new FormData();
  form.append("image", file);
  const response = await fetch(`v1/predict?score_thresh=${LOWEST_SCORE}`, {method: "POST", body: form});
  const body = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
  if (!response.ok) {
    document.body.dataset.state = "error";
    return setStatus(body.error, true);
  }
  const image = new Image();
  image.src = URL.createObjectURL(file);
  await image.decode();
  state.image = image;
  state.answer = body;
  state.hidden.clear();
  state.masks = body.instances.map((d) => decodeMask(d, body.width, body.height));
  $("canvas").width = body.width;
  $("canvas").height = body.height;
  $("stage").hidden = false;
  $("panel").hidden = false;
  $("drop").classList.add("small");
  $("timing").textContent = `${body.instances.length} found above ${LOWEST_SCORE} in ${Math.round(body.timing_ms.total)} ms`;
  setStatus("");
  fitCanvas();
  draw();
}

// The picture as large as the column and the window allow (small photos are scaled up, large ones down).
function fitCanvas() {
  if (!state.answer) return;
  const {width, height} = state.answer;
  const room = $("viewer").clientWidth;
  const tall = Math.max(window.innerHeight - 150, 300);
  const scale = Math.min(room / width, tall / height);
  $("canvas").style.width = `${Math.floor(width * scale)}px`;
}

function download() {
  const blob = new Blob([JSON.stringify(state.answer, null, 2)], {type: "application/json"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = state.fileName.replace(/\.[^.]*$/, "") + ".json";
  link.click();
  URL.revokeObjectURL(link.href);
}

function start() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => e.target.files[0] && segment(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) segment(e.dataTransfer.files[0]);
  });
  $("score").addEventListener("input", () => {
    $("score-value").textContent = Number($("score").value).toFixed(2);
    if (state.answer) draw();
  });
  $("canvas").addEventListener("mousemove", hover);
  $("canvas").addEventListener("mouseleave", () => { $("tip").hidden = true; });
  $("download").addEventListener("click", download);
  window.addEventListener("resize", fitCanvas);
  $("other").addEventListener("click", () => $("file").click());
  loadModel().catch((error) => setStatus(`cannot reach the server: ${error}`, true));
}

start();
