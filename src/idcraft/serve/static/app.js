// The idcraft page: pick or upload a reference, generate, show the images with seed, time and cache.
// Plain JS against the server's own API; nothing is fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { reference: null, models: {} };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = $("token").value || sessionStorage.getItem("idcraft-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) $("token-row").classList.add("shown");
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function pick(id, img) {
  state.reference = id;
  document.querySelectorAll(".examples img, #ref-preview").forEach((el) => el.classList.remove("picked"));
  if (img) img.classList.add("picked");
}

async function loadModels() {
  const models = await api("/v1/models", { headers: headers(false) });
  const select = $("method");
  select.innerHTML = "";
  for (const m of models.data) {
    state.models[m.id] = m;
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id + (m.needs_face ? " (face)" : "");
    select.appendChild(option);
  }
  showDefaults();
}

function showDefaults() {
  const m = state.models[$("method").value];
  if (!m) return;
  $("scale").placeholder = `default ${m.defaults.scale}`;
  $("steps").placeholder = `default ${m.defaults.steps}`;
}

async function loadExamples() {
  const examples = await api("/v1/examples", { headers: headers(false) });
  const box = $("examples");
  box.innerHTML = "";
  for (const e of examples.data) {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + e.b64_json;
    img.title = e.name;
    img.alt = e.name;
    img.dataset.id = e.id;
    img.addEventListener("click", () => pick(e.id, img));
    box.appendChild(img);
  }
  if (examples.data.length) {
    $("world-note").textContent = "Pick a character below or upload your own image.";
    pick(examples.data[0].id, box.firstChild);
  }
}

async function upload(file) {
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = reject;
    reader.readAsDataURL(file);
  });
  setStatus("Uploading the reference...");
  const ref = await api("/v1/references", {
    method: "POST",
    headers: headers(true),
    body: JSON.stringify({ image: data }),
  });
  const preview = $("ref-preview");
  preview.src = data;
  preview.hidden = false;
  pick(ref.id, preview);
  setStatus(`Reference uploaded (${ref.width}x${ref.height}).`);
}

function number(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

async function generate(event) {
  event.preventDefault();
  if (!state.reference) return setStatus("Pick or upload a reference first.", true);
  const body = {
    prompt: $("prompt").value,
    method: $("method").value,
    references: [state.reference],
    scale: number("scale"),
    seed: number("seed"),
    steps: number("steps"),
    n: 1,
    response_format: "b64_json",
  };
  $("generate").disabled = true;
  setStatus("Generating...");
  const t0 = performance.now();
  try {
    const out = await api("/v1/images/generations", {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(body),
    });
    const seconds = (performance.now() - t0) / 1000;
    for (const item of out.data) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.className = "result";
      img.src = "data:image/png;base64," + item.b64_json;
      img.alt = body.prompt;
      const caption = document.createElement("figcaption");
      caption.innerHTML =
        `<b>${out.method}</b> · seed <code class="seed">${out.seed}</code><br>` +
        `${seconds.toFixed(2)} s (encode ${out.timings.encode_s.toFixed(2)} s, generate ${out.timings.generate_s.toFixed(2)} s)<br>` +
        `identity cache: <span class="cache ${out.cache}">${out.cache}</span>`;
      caption.appendChild(document.createElement("br"));
      caption.appendChild(document.createTextNode(body.prompt));
      figure.append(img, caption);
      $("results").prepend(figure);
    }
    setStatus(out.warnings.length ? "Warning: " + out.warnings.join(" ") : `Done in ${seconds.toFixed(2)} s.`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("generate").disabled = false;
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("method").addEventListener("change", showDefaults);
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) upload(e.target.files[0]).catch((err) => setStatus(err.message, true));
  });
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("idcraft-token", $("token").value);
    init2();
  });
  await init2();
}

async function init2() {
  try {
    await loadModels();
    await loadExamples();
    setStatus("Ready.");
  } catch (error) {
    setStatus(error.message, true);
  }
}

init();
