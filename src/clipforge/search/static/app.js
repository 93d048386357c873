// The clipforge search page: talks to the JSON API of `clipforge serve` (see README, "Search a collection").
// The query lives in the page URL (?q=…&k=… or ?id=…) so a search can be shared; an uploaded image cannot be.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, classifyImage: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

function showImage(blob) {
  state.image = blob;
  const shown = blob !== null;
  $("query-image").hidden = !shown;
  if (shown) $("query-image-preview").src = URL.createObjectURL(blob);
  if (shown) showClassify(blob);
}

function showClassify(blob) {
  state.classifyImage = blob;
  $("classify").hidden = false;
  $("classify-preview").src = URL.createObjectURL(blob);
  $("classify-results").replaceChildren();
}

function card(hit) {
  const item = document.createElement("article");
  item.className = "card";
  item.dataset.id = hit.id;
  item.title = "Find images like this one";
  const img = document.createElement("img");
  img.src = hit.image_url;
  img.alt = hit.caption || hit.key || `image ${hit.id}`;
  img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const caption = document.createElement("div");
  caption.className = "caption";
  caption.textContent = hit.caption || "";
  const key = document.createElement("div");
  key.className = "key";
  key.textContent = hit.key || `#${hit.id}`;
  meta.append(score, caption, key);
  const classifyThis = document.createElement("button");
  classifyThis.type = "button";
  classifyThis.className = "classify-this";
  classifyThis.textContent = "classify";
  classifyThis.addEventListener("click", async (event) => {
    event.stopPropagation();
    const response = await fetch(hit.image_url);
    if (response.ok) showClassify(await response.blob());
    $("classify").scrollIntoView({ behavior: "smooth" });
  });
  item.append(img, meta, classifyThis);
  item.addEventListener("click", () => run({ id: hit.id }, true));
  return item;
}

function render(answer, label) {
  const grid = $("results");
  grid.replaceChildren(...answer.results.map(card));
  const notice = $("no-match");
  notice.hidden = !answer.no_good_match;
  if (answer.no_good_match) {
    const best = answer.results.length ? answer.results[0].score.toFixed(3) : "–";
    notice.textContent = `No good match: the best score ${best} is under this index's calibrated threshold ` +
      `${answer.threshold.toFixed(3)}. These are the closest images anyway.`;
  }
  setStatus(`${answer.results.length} results for ${label}`);
}

// Run a query {text, id, image} and, when `push`, record it in the URL.
async function run(query, push) {
  const k = $("k").value;
  let url = null;
  let options;
  let label;
  if (query.id !== undefined) {
    url = `/api/search?id=${encodeURIComponent(query.id)}&k=${k}`;
    label = `images like #${query.id}`;
  } else if (query.image) {
    const form = new FormData();
    form.append("image", query.image, "query-image");
    if (query.text) form.append("text", query.text);
    form.append("k", k);
    url = "/api/search";
    options = { method: "POST", body: form };
    label = query.text ? `the image + “${query.text}”` : "the image";
  } else if (query.text) {
    url = `/api/search?text=${encodeURIComponent(query.text)}&k=${k}`;
    label = `“${query.text}”`;
  } else {
    setStatus("Type a query, or drop, paste or pick an image.", true);
    return;
  }
  if (push) {
    const params = new URLSearchParams();
    if (query.id !== undefined) params.set("id", query.id);
    else if (query.text && !query.image) params.set("q", query.text);
    params.set("k", k);
    history.pushState(null, "", `?${params}`);
  }
  setStatus("searching…");
  try {
    render(await callApi(url, options), label);
  } catch (err) {
    $("results").replaceChildren();
    $("no-match").hidden = true;
    setStatus(err.message, true);
  }
}

// A shared URL may carry any k: offer it in the menu if it is not one of the usual values.
function setK(value) {
  const select = $("k");
  if (![...select.options].some((o) => o.value === value)) select.add(new Option(value, value));
  select.value = value;
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.has("k")) setK(params.get("k"));
  if (params.has("id")) {
    $("query").value = "";
    run({ id: params.get("id") }, false);
  } else if (params.has("q")) {
    $("query").value = params.get("q");
    showImage(null);
    run({ text: params.get("q") }, false);
  }
}

function takeFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus(`${file.name || "that file"} is not an image`, true);
    return;
  }
  showImage(file);
  run({ image: file, text: $("query").value.trim() }, true);
}

async function classify() {
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
  if (!state.classifyImage || labels.length === 0) {
    setStatus("Type some labels, comma-separated.", true);
    return;
  }
  const form = new FormData();
  form.append("image", state.classifyImage, "image");
  form.append("labels", JSON.stringify(labels));
  try {
    const answer = await callApi("/api/classify", { method: "POST", body: form });
    $("classify-results").replaceChildren(...answer.labels.map((row) => {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = row.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.style.width = `${(100 * row.probability).toFixed(1)}%`;
      bar.append(fill);
      const value = document.createElement("span");
      value.textContent = `${(100 * row.probability).toFixed(1)}%`;
      li.append(name, bar, value);
      return li;
    }));
    setStatus("classified");
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function loadInfo() {
  try {
    const info = await callApi("/api/info");
    const parts = [`${info.images.toLocaleString()} images`, `${info.dim}-d`, info.kind];
    if (info.model) parts.push(`model ${info.model}`);
    if (info.threshold && info.threshold.score !== null) {
      parts.push(`no-good-match threshold ${info.threshold.score.toFixed(3)}`);
    } else if (info.threshold) {
      parts.push("no no-good-match threshold (matched and unmatched captions score alike here)");
    }
    $("info").textContent = parts.filter(Boolean).join(" · ");
  } catch (err) {
    $("info").textContent = `index info unavailable: ${err.message}`;
  }
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    run(state.image ? { image: state.image, text } : { text }, true);
  });
  $("file-input").addEventListener("change", (event) => takeFile(event.target.files[0]));
  $("clear-image").addEventListener("click", () => {
    showImage(null);
    $("file-input").value = "";
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    takeFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) {
      event.preventDefault();
      takeFile(item.getAsFile());
    }
  });
  $("classify-button").addEventListener("click", classify);
  $("labels").addEventListener("keydown", (event) => { if (event.key === "Enter") classify(); });
  window.addEventListener("popstate", fromUrl);
}

wire();
loadInfo();
fromUrl();
