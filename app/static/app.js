// The page: plain JavaScript against the service's own API (same origin, nothing from elsewhere).
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (text) => String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
  '"': "&quot;", "'": "&#39;"}[c]));
let variants = [];
let chosenFiles = [];

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadVariants() {
  const response = await fetch("/variants", { headers: headers() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    setStatus(`variants unavailable: ${body.detail || response.status}`, true);
    if (response.status === 503) setTimeout(loadVariants, 2000);  // still loading: try again
    return;
  }
  const table = await response.json();
  variants = table.variants;
  if (!$("tta").dataset.chosen) $("tta").value = String(table.tta);  // the served level, until one is picked
  fillKeeps();
  const rows = variants.map((v) => {
    const one = v.latency.batch_1 ? v.latency.batch_1.p50_ms.toFixed(1) : "–";
    const many = v.latency.batch_64 ? Math.round(v.latency.batch_64.images_per_s) : "–";
    return `<tr data-name="${esc(v.name)}"><td>${esc(v.name)}</td><td>${v.granularity}</td><td>${v.keep}</td>` +
      `<td>${v.test_acc_mean.toFixed(2)}</td><td>${v.drop.toFixed(2)}</td><td>${one}</td><td>${many}</td></tr>`;
  });
  document.querySelector("#variants tbody").innerHTML = rows.join("");
  $("plot").src = "/variants/plot";
}

function fillKeeps() {
  const granularity = $("granularity").value;
  const keeps = variants.filter((v) => v.granularity === granularity).map((v) => v.keep);
  $("keep").innerHTML = keeps.map((k) => `<option value="${k}">keep ${k}</option>`).join("");
}

function useFiles(files) {
  chosenFiles = [...files].filter((f) => f.type.startsWith("image/") || f.name);
  $("classify").disabled = chosenFiles.length === 0;
  setStatus(chosenFiles.length ? `${chosenFiles.length} image(s) ready` : "");
}

async function classify(event) {
  event.preventDefault();
  if (!chosenFiles.length) return;
  const params = new URLSearchParams({ top_k: "5" });
  if (document.querySelector("input[name=mode]:checked").value === "auto") {
    params.set("keep", "auto");
    params.set("max_drop", $("max-drop").value || "0");
  } else {
    params.set("keep", $("keep").value);
    params.set("granularity", $("granularity").value);
    params.set("tta", $("tta").value);  // auto chooses by the served level's figures, so only here
  }
  const form = new FormData();
  chosenFiles.forEach((f) => form.append("files", f, f.name));
  setStatus("classifying…");
  const started = performance.now();
  const response = await fetch(`/predict?${params}`, { method: "POST", body: form, headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    setStatus(`error ${response.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`,
              true);
    return;
  }
  const roundTrip = performance.now() - started;
  setStatus(`${body.variant.name} (TTA ${body.tta}) answered: ${body.inference_ms.toFixed(1)} ms on the server, ` +
            `${roundTrip.toFixed(0)} ms round trip`);
  document.querySelectorAll("#variants tr").forEach((tr) =>
    tr.classList.toggle("chosen", tr.dataset.name === body.variant.name));
  $("results").innerHTML = body.predictions.map((p, i) => {
    const url = URL.createObjectURL(chosenFiles[i]);
    const items = p.top_k.map((t) => `<li><span class="label">${esc(t.class)}</span> ` +
      `<span class="prob">${(100 * t.probability).toFixed(1)}%</span>` +
      `<span class="bar" style="width:${Math.round(120 * t.probability)}px"></span></li>`).join("");
    return `<div class="card"><img src="${url}" alt="${esc(p.file)}"><div><strong class="top">${esc(p.class)}</strong>` +
      ` <small>(${esc(p.file)}, variant ${esc(body.variant.name)})</small><ol>${items}</ol></div></div>`;
  }).join("");
}

$("files").addEventListener("change", (e) => useFiles(e.target.files));
$("granularity").addEventListener("change", fillKeeps);
$("tta").addEventListener("change", () => { $("tta").dataset.chosen = "1"; });
$("choice").addEventListener("submit", classify);
$("api-key").addEventListener("change", loadVariants);
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => useFiles(e.dataTransfer.files));
loadVariants();
