// The drawing page. It only draws and shows answers: the picture is sent as a PNG to the
// service's API, which does all the preprocessing (there is no second copy of it here).
"use strict";

const pad = document.getElementById("pad");
const cursor = document.getElementById("cursor");
const wrap = document.getElementById("canvas-wrap");
const ctx = pad.getContext("2d");
const cursorCtx = cursor.getContext("2d");
const multi = document.getElementById("multi");
const explain = document.getElementById("explain");
const statusLine = document.getElementById("status");

// A pen about as wide, relative to the box, as the strokes of MNIST digits.
const PEN_WIDTH = 20;
const KEY_STEP = 10;
const DEBOUNCE_MS = 120;

// The drawing's own size: what is sent (a 280x280 PNG, 840x280 for a line of digits), and the
// units of every stroke. The canvases' pixels are their size on the screen times the device's
// pixel ratio instead, so that the ink is sharp on a phone or a high-density screen.
const units = { width: 280, height: 280 };
let strokes = []; // each stroke: an array of [x, y] in drawing units
let current = null; // the stroke being drawn, if any
// The keyboard's pen: where it is, and the stroke it draws while it is down (null: lifted).
// Its own stroke, not the last one: undo, clear or a mouse stroke in between must not make
// the arrows extend some other stroke.
let keyPen = { x: units.width / 2, y: units.height / 2, stroke: null, shown: false };

// ---- drawing -------------------------------------------------------------------------

function drawStroke(context, points) {
  context.beginPath();
  context.moveTo(points[0][0], points[0][1]);
  // A single point is drawn as a dot: a tap must leave a mark.
  if (points.length === 1) context.lineTo(points[0][0] + 0.1, points[0][1]);
  for (const [x, y] of points.slice(1)) context.lineTo(x, y);
  context.stroke();
}

// The strokes onto a canvas, scaled from drawing units to its pixels.
function paint(context) {
  const canvas = context.canvas;
  // Transparent background, dark ink: what a drawing app exports.
  context.setTransform(1, 0, 0, 1, 0, 0);
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.setTransform(canvas.width / units.width, 0, 0, canvas.height / units.height, 0, 0);
  context.lineWidth = PEN_WIDTH;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.strokeStyle = "#000";
  for (const s of strokes) drawStroke(context, s);
}

function redraw() {
  paint(ctx);
  drawCursor();
}

// The canvases' pixels to their size on the screen (device pixels): called when the layout or
// the pixel ratio changes (zoom, a window moved to another screen).
function fit() {
  const r = pad.getBoundingClientRect();
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(r.width * ratio));
  const height = Math.max(1, Math.round(r.height * ratio));
  if (pad.width === width && pad.height === height) return;
  pad.width = cursor.width = width;
  pad.height = cursor.height = height;
  redraw();
}
new ResizeObserver(fit).observe(wrap);
window.addEventListener("resize", fit);

function drawCursor() {
  cursorCtx.setTransform(1, 0, 0, 1, 0, 0);
  cursorCtx.clearRect(0, 0, cursor.width, cursor.height);
  if (!keyPen.shown) return;
  cursorCtx.setTransform(cursor.width / units.width, 0, 0, cursor.height / units.height, 0, 0);
  cursorCtx.strokeStyle = keyPen.stroke ? "#c22" : "#2457c5";
  cursorCtx.lineWidth = 2;
  cursorCtx.beginPath();
  cursorCtx.arc(keyPen.x, keyPen.y, PEN_WIDTH / 2, 0, 2 * Math.PI);
  cursorCtx.stroke();
}

function toCanvas(event) {
  const r = pad.getBoundingClientRect();
  return [
    ((event.clientX - r.left) * units.width) / r.width,
    ((event.clientY - r.top) * units.height) / r.height,
  ];
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0 && event.pointerType === "mouse") return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  current = [toCanvas(event)];
  strokes.push(current);
  liftKeyPen();
  redraw();
  changed();
});

pad.addEventListener("pointermove", (event) => {
  if (!current) return;
  // Coalesced events keep fast pen and finger strokes smooth.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) current.push(toCanvas(e));
  redraw();
  changed();
});

function endStroke() {
  if (!current) return;
  current = null;
  changed();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function liftKeyPen() {
  keyPen.stroke = null;
}

function undo() {
  strokes.pop();
  current = null;
  liftKeyPen(); // its stroke may be the one undone
  redraw();
  changed();
}

function clearAll() {
  strokes = [];
  current = null;
  liftKeyPen();
  redraw();
  changed();
}

document.getElementById("undo").addEventListener("click", undo);
document.getElementById("clear").addEventListener("click", clearAll);

document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
    event.preventDefault();
    undo();
  }
});

// Drawing with the keyboard: arrows move the pen, Space (or Enter) lowers or lifts it, Escape
// lifts it.
pad.addEventListener("keydown", (event) => {
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  if (event.key in moves) {
    event.preventDefault();
    const [dx, dy] = moves[event.key];
    keyPen.x = Math.min(units.width, Math.max(0, keyPen.x + dx * KEY_STEP));
    keyPen.y = Math.min(units.height, Math.max(0, keyPen.y + dy * KEY_STEP));
    keyPen.shown = true;
    if (keyPen.stroke) {
      keyPen.stroke.push([keyPen.x, keyPen.y]);
      changed();
    }
    redraw();
  } else if (event.key === " " || event.key === "Enter") {
    event.preventDefault();
    keyPen.shown = true;
    if (keyPen.stroke) {
      liftKeyPen();
    } else {
      keyPen.stroke = [[keyPen.x, keyPen.y]];
      strokes.push(keyPen.stroke);
      changed();
    }
    redraw();
  } else if (event.key === "Backspace") {
    event.preventDefault();
    undo();
  } else if (event.key === "Delete") {
    event.preventDefault();
    clearAll();
  } else if (event.key === "Escape") {
    liftKeyPen();
    drawCursor();
  }
});
pad.addEventListener("blur", () => {
  liftKeyPen();
  keyPen.shown = false;
  drawCursor();
});

multi.addEventListener("change", () => {
  // A line of digits needs a wide canvas; the old drawing does not fit it.
  units.width = multi.checked ? 840 : 280;
  wrap.classList.toggle("wide", multi.checked);
  document.getElementById("single").hidden = multi.checked;
  document.getElementById("line").hidden = !multi.checked;
  keyPen.x = units.width / 2;
  fit();
  clearAll();
});
explain.addEventListener("change", changed);

// ---- asking the service --------------------------------------------------------------

let timer = null;
let inFlight = false;
let dirty = false;

function changed() {
  dirty = true;
  clearTimeout(timer);
  timer = setTimeout(send, DEBOUNCE_MS);
}

// What is sent: the drawing at its own size, whatever the screen (the service's figures are
// for these pictures; a phone's would be several times larger, for nothing).
function picture() {
  const out = document.createElement("canvas");
  out.width = units.width;
  out.height = units.height;
  paint(out.getContext("2d"));
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function post(path, blob) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "image/png" },
    body: blob,
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function send() {
  // One request at a time; whatever changed meanwhile is sent when it returns.
  if (inFlight) return;
  if (!dirty) return;
  dirty = false;
  inFlight = true;
  try {
    if (strokes.length === 0) {
      showEmpty();
      return;
    }
    const blob = await picture();
    const wantsExplain = explain.checked && !multi.checked;
    let found = true;
    if (multi.checked) {
      showLine(await post("/v1/read?include_input=true", blob));
    } else {
      const answer = await post("/v1/predict?include_input=true", blob);
      showSingle(answer);
      found = answer.reason !== "no digit found";
    }
    if (wantsExplain && found) showExplanation(await post("/v1/explain", blob));
    else document.getElementById("explanation").hidden = true;
    statusLine.textContent = "";
  } catch (error) {
    statusLine.textContent = `Could not read the drawing: ${error.message}`;
  } finally {
    inFlight = false;
    if (dirty) send();
  }
}

// ---- showing answers -----------------------------------------------------------------

const bars = document.getElementById("bars");
for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.innerHTML = `<span>${d}</span><span class="bar"><span></span></span><span class="p">0%</span>`;
  bars.appendChild(li);
}

function percent(p) {
  return `${(100 * p).toFixed(p > 0.995 || p < 0.005 ? 0 : 1)}%`;
}

function showEmpty() {
  document.getElementById("digit").textContent = "–";
  document.getElementById("confidence").textContent = "Draw a digit to start.";
  document.getElementById("model-input").hidden = true;
  document.getElementById("text").textContent = "–";
  document.getElementById("digits").replaceChildren();
  document.getElementById("explanation").hidden = true;
  setBars(new Array(10).fill(0), -1);
}

function setBars(probabilities, best) {
  [...bars.children].forEach((li, d) => {
    const p = probabilities[d] || 0;
    li.querySelector(".bar > span").style.width = `${100 * p}%`;
    li.querySelector(".p").textContent = percent(p);
    li.classList.toggle("best", d === best);
    li.setAttribute("aria-label", `${d}: ${percent(p)}`);
  });
}

function showSingle(answer) {
  const digit = document.getElementById("digit");
  const confidence = document.getElementById("confidence");
  if (answer.reason === "no digit found") {
    digit.textContent = "–";
    confidence.textContent = "No digit found.";
  } else if (answer.digit === null) {
    digit.textContent = "?";
    confidence.textContent = `Unsure: perhaps ${answer.best_guess} (${percent(answer.confidence)})`;
  } else {
    digit.textContent = String(answer.digit);
    confidence.textContent = `${percent(answer.confidence)} sure`;
  }
  const seen = document.getElementById("model-input");
  seen.hidden = !answer.input;
  if (answer.input) seen.src = answer.input;
  const best = answer.digit ?? answer.best_guess ?? -1;
  setBars(answer.probabilities, best);
}

function showLine(reading) {
  document.getElementById("text").textContent =
    reading.text ?? (reading.digits.length ? "?" : "–");
  const list = document.getElementById("digits");
  list.replaceChildren(
    ...reading.digits.map((d) => {
      const li = document.createElement("li");
      const shown = d.digit ?? `?${d.best_guess}`;
      li.innerHTML = `<b>${shown}</b>${percent(d.confidence)}`;
      if (d.input) {
        const img = document.createElement("img");
        img.src = d.input;
        img.width = img.height = 56;
        img.alt = `the 28 by 28 image of digit ${shown}`;
        li.prepend(img);
      }
      return li;
    }),
  );
}

// The answer of /v1/explain (the JSON of `lenet explain --json`): each picture a PNG at its
// true size, enlarged by the browser without smoothing.
function showExplanation(result) {
  const png = (b64) => `data:image/png;base64,${b64}`;
  const sections = [
    ["What the model saw (28×28)", [result.input.png]],
    ["Saliency: the pixels that drove the answer", [result.saliency.png]],
  ];
  if (result.filters) sections.push([`First-layer filters (${result.filters.layer})`, result.filters.png]);
  for (const layer of result.layers) {
    sections.push([`${layer.description}: ${layer.shape.join("×")} ${layer.kind} maps`, layer.png]);
  }
  const box = document.getElementById("explanation");
  box.hidden = false;
  box.replaceChildren(
    ...sections.map(([title, images]) => {
      const section = document.createElement("div");
      const heading = document.createElement("h3");
      heading.textContent = title;
      const maps = document.createElement("div");
      maps.className = "maps";
      for (const b64 of images) {
        const img = document.createElement("img");
        img.src = png(b64);
        img.alt = title;
        maps.appendChild(img);
      }
      section.append(heading, maps);
      return section;
    }),
  );
}

fetch("/v1/models")
  .then((r) => r.json())
  .then((m) => {
    document.getElementById("model").textContent = `model: ${m.loaded} (${m.backend})`;
  })
  .catch(() => {});

redraw();
