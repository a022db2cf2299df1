// retfm screening page: uploads go to /v1/predict (one image) or /v1/batch (several, or zips).
// File names stay in this page: the service never receives them back, and never returns them.
"use strict";

const keyStore = "retfm-api-key";
const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(keyStore) || "";

function say(message) {
  $("status").textContent = message;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function fixed(value, digits = 3) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { "X-API-Key": apiKey, ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

async function loadModel() {
  const card = await call("/v1/model");
  $("model-name").textContent = `${card.name} (${card.label}: ${card.classes.join(", ")})`;
  const facts = $("model-facts");
  facts.replaceChildren();
  const auroc = card.evaluation && card.evaluation.metrics && card.evaluation.metrics.auroc;
  const rows = [
    ["Threshold", card.threshold === null ? "most probable class" : fixed(card.threshold, 4)],
    ["Test AUROC", auroc && auroc.value !== null
      ? `${fixed(auroc.value)} (95% CI ${auroc.ci ? auroc.ci.map((v) => fixed(v)).join("-") : "-"})` : "-"],
    ["Test images", card.evaluation ? card.evaluation.test_images ?? "-" : "-"],
    ["Licence", card.licence || "-"],
    ["Intended use", card.intended_use],
    ["Limits", card.limits],
  ];
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    facts.append(dt, dd);
  }
  $("model").hidden = false;
}

function showPrediction(result, file) {
  $("triage").hidden = true;
  const section = $("result");
  section.hidden = false;
  const verdict = $("verdict");
  verdict.className = `verdict ${result.verdict}`;
  if (result.verdict === "ungradable") {
    verdict.textContent = `Ungradable: ${result.reasons.join("; ")}. No findings are given; retake the photograph.`;
  } else {
    const finding = result.positive === null ? `prediction ${result.prediction}`
      : result.positive ? `${result.label} = ${result.prediction}: refer` : `no ${result.label} finding`;
    verdict.textContent = `Gradable. ${finding} (risk ${fixed(result.risk)})`;
  }

  const probabilities = $("probabilities").querySelector("tbody");
  probabilities.replaceChildren();
  for (const entry of result.probabilities || []) {
    const row = probabilities.insertRow();
    cell(row, entry.class);
    cell(row, fixed(entry.probability));
  }
  $("probabilities").hidden = !result.probabilities;
  $("decision").textContent = result.decision_rule ? `Decision: ${result.decision_rule}.` : "";

  const quality = $("quality").querySelector("tbody");
  quality.replaceChildren();
  for (const [name, value] of Object.entries(result.quality || {})) {
    const row = quality.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = name.replace("quality_", "").replace("_", " ");
    row.appendChild(th);
    cell(row, fixed(value));
  }

  const photo = $("photo");
  photo.src = URL.createObjectURL(file);
  const heatmap = $("heatmap");
  if (result.heatmap) {
    heatmap.src = `data:image/png;base64,${result.heatmap.png_base64}`;
    heatmap.alt = `${result.heatmap.method} heatmap for class ${result.heatmap.class}, over the field of view`;
    $("heatmap-note").textContent = "Where the model looked, not where disease is.";
  }
  $("show-heatmap").disabled = !result.heatmap;
  toggleHeatmap();

  const cases = $("cases");
  cases.hidden = !result.similar_cases;
  const body = cases.querySelector("tbody");
  body.replaceChildren();
  (result.similar_cases || []).forEach((item, rank) => {
    const row = body.insertRow();
    [rank + 1, item.image_id, item.label ?? "-", item.site ?? "-", fixed(item.similarity)].forEach((v) => cell(row, v));
  });
  section.focus();
}

function toggleHeatmap() {
  const overlay = $("show-heatmap").checked && !$("show-heatmap").disabled;
  $("heatmap").hidden = !overlay;
  $("photo").hidden = overlay;
}

function showTriage(result, files) {
  $("result").hidden = true;
  const section = $("triage");
  section.hidden = false;
  const counts = result.counts;
  $("triage-summary").textContent =
    `${counts.gradable} gradable, ${counts.ungradable} ungradable, ${counts.rejected} rejected.`;
  const body = section.querySelector("tbody");
  body.replaceChildren();
  result.items.forEach((item, rank) => {
    const row = body.insertRow();
    const name = item.zip_entry === null ? files[item.item] && files[item.item].name : `zip entry ${item.zip_entry + 1}`;
    const verdict = item.verdict === "gradable" && item.positive ? "gradable: refer" : item.verdict;
    [rank + 1, name || `image ${item.item + 1}`, verdict, item.risk === undefined ? "-" : fixed(item.risk),
      item.prediction ?? "-", item.quality && item.quality.quality !== undefined ? fixed(item.quality.quality) : "-",
      (item.reasons || []).join("; ")].forEach((v) => cell(row, v));
    row.className = item.verdict;
  });
  section.focus();
}

async function upload(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  if (!apiKey) {
    say("Enter the API key first.");
    $("api-key").focus();
    return;
  }
  const single = files.length === 1 && !/\.zip$/i.test(files[0].name) && files[0].type !== "application/zip";
  const form = new FormData();
  // Neutral names: the original file names never leave this page.
  files.forEach((file, i) => form.append(single ? "file" : "files", file, `upload-${i}`));
  say(single ? "Screening the photograph..." : `Screening ${files.length} file(s)...`);
  try {
    const result = await call(single ? "/v1/predict" : "/v1/batch", { method: "POST", body: form });
    say(single ? "Done." : `Done: ${result.items.length} image(s) triaged.`);
    if (single) showPrediction(result, files[0]);
    else showTriage(result, files);
  } catch (error) {
    say(`Not screened: ${error.message}`);
  }
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem(keyStore, apiKey);
  try {
    await loadModel();
    say("Key accepted.");
  } catch (error) {
    say(`Key not accepted: ${error.message}`);
  }
});

const zone = $("drop-zone");
// A real button: Enter and Space click it, so the keyboard opens the file chooser as a mouse does.
zone.addEventListener("click", () => $("file-input").click());
zone.addEventListener("dragover", (event) => {
  event.preventDefault();
  zone.classList.add("over");
});
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  upload(event.dataTransfer.files);
});
$("file-input").addEventListener("change", (event) => upload(event.target.files));
$("show-heatmap").addEventListener("change", toggleHeatmap);

if (apiKey) {
  $("api-key").value = apiKey;
  loadModel().catch(() => say("The saved key was not accepted; enter it again."));
}
