// The idcraft page: pick or upload a reference (or none: text only), set the prompt and the method's
// settings, generate, watch the progress, keep the results in a gallery with a download link each.
// Plain JS against the server's own API; nothing is fetched from elsewhere.
//
// Progress: POST /v1/jobs, then GET /v1/jobs/{id} every 400 ms (fetch can send the bearer token,
// EventSource cannot) for step / total_steps; Cancel sends DELETE /v1/jobs/{id}. A server without the
// jobs API (404) gets the plain POST /v1/images/generations and an indeterminate bar.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { reference: null, models: {}, job: null, jobsApi: true };
const POLL_MS = 400;
const TEXT_ONLY = "none";

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = $("token").value || sessionStorage.getItem("idcraft-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

// Seeds are up to 2**64-1, past what a JS number holds exactly: read them from the text as written.
const SEED = /"seed":\s*(\d+)/;

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  let body = {};
  try {
    body = JSON.parse(text);
  } catch (error) {
    body = {};
  }
  const seed = text.match(SEED);
  if (seed && body && typeof body === "object") body.seed_text = seed[1];
  if (response.status === 401) $("token-row").classList.add("shown");
  if (!response.ok) {
    const message = (body.error && body.error.message) || response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function setWarnings(warnings) {
  const list = $("warnings");
  list.innerHTML = "";
  for (const w of warnings || []) {
    const item = document.createElement("li");
    item.textContent = w;
    list.appendChild(item);
  }
}

function pick(id, img) {
  state.reference = id;
  document.querySelectorAll(".examples img, #ref-preview").forEach((el) => el.classList.remove("picked"));
  if (img) img.classList.add("picked");
}

// ------------------------------------------------------------------ models and their settings
async function loadModels() {
  const models = await api("/v1/models", { headers: headers(false) });
  const select = $("method");
  const previous = select.value;
  select.innerHTML = "";
  for (const m of models.data) {
    state.models[m.id] = m;
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id === TEXT_ONLY ? "none (text only, no reference)" : m.id + (m.needs_face ? " (face)" : "");
    select.appendChild(option);
  }
  if (previous && state.models[previous]) select.value = previous;
  showSettings();
}

function strengthLabel(m) {
  if (m.family === "instantid") return ["Identity scale", "IP-Adapter strength of the face"];
  if (m.family === "faceid") return ["FaceID scale", "how strongly the face is kept"];
  if (m.family === "instantcharacter") return ["Subject scale", "how strongly the subject is kept"];
  return ["IP-Adapter scale", "how strongly the reference is kept"];
}

function showSettings() {
  const m = state.models[$("method").value];
  if (!m) return;
  const textOnly = m.id === TEXT_ONLY;
  $("reference").classList.toggle("unused", textOnly);
  $("reference-hint").textContent = textOnly ? "not used: the base model draws the prompt alone" : "pick one or upload your own";
  $("scale-row").hidden = textOnly;
  const [label, hint] = strengthLabel(m);
  $("scale-label").textContent = label;
  $("scale-hint").textContent = `${hint}; default ${m.defaults.scale}`;
  $("scale").placeholder = m.defaults.scale ?? "";
  if ($("scale").value === "") $("scale-range").value = m.defaults.scale ?? 1;
  $("identitynet-row").hidden = !(m.options || []).includes("identitynet_scale");
  $("guidance").placeholder = `default ${m.defaults.guidance}`;
  $("steps").placeholder = `default ${m.defaults.steps}`;
  showSizes(m);
}

function showSizes(m) {
  const select = $("size");
  const previous = select.value;
  select.innerHTML = "";
  const sizes = m.sizes || {};
  const add = (value, text) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.appendChild(option);
  };
  add("", sizes.native ? `${sizes.native} (native)` : "default");
  if (sizes.native) {
    const side = (s) => parseInt(s.split("x")[0], 10);
    const [low, native, high, step] = [side(sizes.min), side(sizes.native), side(sizes.max), sizes.multiple_of];
    const between = Math.round((native * 1.5) / step) * step;
    for (const s of [low, between, high]) if (s !== native && s >= low && s <= high) add(`${s}x${s}`, `${s}x${s}`);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

function linkSlider(range, number) {
  $(range).addEventListener("input", () => ($(number).value = $(range).value));
  $(number).addEventListener("input", () => {
    if ($(number).value !== "") $(range).value = $(number).value;
  });
}

// ------------------------------------------------------------------ examples and vocabulary
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
    $("world-note").textContent = "Pick a character or upload your own image.";
    pick(examples.data[0].id, box.firstChild);
  }
  showPrompts(examples.prompts || []);
  showVocabulary(examples.vocabulary);
}

function showPrompts(prompts) {
  const box = $("prompt-examples");
  box.innerHTML = "";
  for (const p of prompts) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.textContent = p;
    chip.addEventListener("click", () => ($("prompt").value = p));
    box.appendChild(chip);
  }
  if (prompts.length && !$("prompt").dataset.edited) $("prompt").value = prompts[0];
}

function showVocabulary(v) {
  if (!v) return;
  const list = $("vocabulary-list");
  list.innerHTML = "";
  const rows = [
    ["backgrounds", Object.values(v.backgrounds || {})],
    ["positions", Object.values(v.positions || {})],
    ["sizes", Object.values(v.sizes || {}).flat()],
    ["poses", Object.values(v.poses || {})],
    ["shapes", Object.values(v.shapes || {})],
    ["colours", v.colours || []],
  ];
  for (const [name, words] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = words.join(", ");
    list.append(dt, dd);
  }
  $("vocabulary").hidden = false;
}

// ------------------------------------------------------------------ references
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

// ------------------------------------------------------------------ generation and progress
function number(id) {
  const v = $(id).value;
  return v === "" ? undefined : Number(v);
}

function requestBody() {
  const method = $("method").value;
  const m = state.models[method] || {};
  const textOnly = method === TEXT_ONLY;
  return {
    prompt: $("prompt").value,
    method,
    references: textOnly ? [] : [state.reference],
    negative_prompt: $("negative").value || undefined,
    scale: textOnly ? undefined : number("scale"),
    identitynet_scale: (m.options || []).includes("identitynet_scale") ? number("identitynet") : undefined,
    guidance: number("guidance"),
    steps: number("steps"),
    size: $("size").value || undefined,
    seed: $("seed").value.trim() === "" ? undefined : SEED_SLOT,
    n: Number($("n").value),
    response_format: "b64_json",
  };
}

// The request as JSON, the seed written as typed (a JS number would round a seed past 2**53).
const SEED_SLOT = "__seed__";
function toJson(body) {
  const seed = $("seed").value.trim();
  const json = JSON.stringify(body);
  if (body.seed !== SEED_SLOT) return json;
  if (!/^\d+$/.test(seed)) throw new Error("The seed must be a whole number, 0 or more.");
  return json.replace(`"${SEED_SLOT}"`, seed);
}

function showProgress(text, step, total) {
  $("progress-box").classList.add("shown");
  const bar = $("progress");
  if (total) {
    bar.max = total;
    bar.value = step;
  } else {
    bar.removeAttribute("value"); // indeterminate
  }
  $("progress-text").textContent = text;
}

function hideProgress() {
  $("progress-box").classList.remove("shown");
  $("cancel").hidden = true;
  state.job = null;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The job's result, or null when this server has no jobs API (then the caller falls back).
async function runJob(body) {
  if (!state.jobsApi) return null;
  let job;
  try {
    job = await api("/v1/jobs", { method: "POST", headers: headers(true), body: toJson(body) });
  } catch (error) {
    if (error.status === 404 || error.status === 405) {
      state.jobsApi = false;
      return null;
    }
    throw error;
  }
  state.job = job.id;
  $("cancel").hidden = false;
  for (;;) {
    if (job.state === "queued") showProgress(`Queued (position ${job.queue_position ?? 0})...`, 0, 0);
    else if (job.state === "running") showProgress(`Step ${job.step} of ${job.total_steps}`, job.step, job.total_steps);
    if (job.state === "succeeded") return { ...job.result, seed_text: job.seed_text };
    if (job.state === "failed") throw new Error((job.error && job.error.message) || "the job failed.");
    if (job.state === "cancelled") throw new Error("Cancelled.");
    await sleep(POLL_MS);
    job = await api(`/v1/jobs/${encodeURIComponent(job.id)}`, { headers: headers(false) });
  }
}

async function runPlain(body) {
  showProgress("Generating...", 0, 0);
  return api("/v1/images/generations", { method: "POST", headers: headers(true), body: toJson(body) });
}

async function cancel() {
  if (!state.job) return;
  try {
    await api(`/v1/jobs/${encodeURIComponent(state.job)}`, { method: "DELETE", headers: headers(false) });
    setStatus("Cancelling...");
  } catch (error) {
    setStatus(error.message, true);
  }
}

function addToGallery(out, body, seconds) {
  const seed = out.seed_text || String(out.seed);
  // newest answer first, its images in their order
  [...out.data].reverse().forEach((item, reversed) => {
    const index = out.data.length - 1 - reversed;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.className = "result";
    img.src = "data:image/png;base64," + item.b64_json;
    img.alt = body.prompt;
    const caption = document.createElement("figcaption");
    const cache = out.cache ? `identity cache: <span class="cache ${out.cache}">${out.cache}</span>` : "no reference";
    caption.innerHTML =
      `<b class="method"></b> · seed <code class="seed">${seed}</code> · ${out.size || ""}<br>` +
      `${seconds.toFixed(2)} s (generate ${out.timings.generate_s.toFixed(2)} s) · ${cache}<br>`;
    caption.querySelector(".method").textContent = out.method;
    caption.appendChild(document.createTextNode(body.prompt));
    const link = document.createElement("a");
    link.className = "download";
    link.href = img.src;
    link.download = `idcraft-${out.method}-${seed}-${index}.png`;
    link.textContent = "Download";
    caption.appendChild(document.createElement("br"));
    caption.appendChild(link);
    figure.append(img, caption);
    $("results").prepend(figure);
  });
}

async function generate(event) {
  event.preventDefault();
  const body = requestBody();
  if (body.method !== TEXT_ONLY && !state.reference) {
    return setStatus("Pick or upload a reference first (or choose method none for text only).", true);
  }
  $("generate").disabled = true;
  setStatus("");
  setWarnings([]);
  const t0 = performance.now();
  try {
    const out = (await runJob(body)) || (await runPlain(body));
    const seconds = (performance.now() - t0) / 1000;
    addToGallery(out, body, seconds);
    setWarnings(out.warnings);
    setStatus(`Done in ${seconds.toFixed(2)} s.` + (out.warnings.length ? " See the warnings below." : ""));
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    hideProgress();
    $("generate").disabled = false;
  }
}

// ------------------------------------------------------------------ start
async function init() {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("method").addEventListener("change", showSettings);
  $("prompt").addEventListener("input", () => ($("prompt").dataset.edited = "1"));
  linkSlider("scale-range", "scale");
  linkSlider("identitynet-range", "identitynet");
  $("file").addEventListener("change", (e) => {
    if (e.target.files.length) upload(e.target.files[0]).catch((err) => setStatus(err.message, true));
  });
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("idcraft-token", $("token").value);
    load();
  });
  await load();
}

async function load() {
  try {
    await loadModels();
    await loadExamples();
    setStatus("Ready.");
  } catch (error) {
    setStatus(error.message, true);
  }
}

init();
