// The clipforge search page: talks to the JSON API of `clipforge serve` (see README, "Search a collection").
// The query lives in the page URL (?q=…&k=…[&dedup=…][&modality=text][&under=…][&index=…] or ?id=…) so a search can be shared; an
// uploaded image cannot be. A server with several indices offers them in a menu (index: null = its default).
"use strict";

const $ = (id) => document.getElementById(id);
// dedup: the cosine of the "hide near-duplicates" toggle (the server's, from /api/info, unless the URL gives one)
const state = { image: null, classifyImage: null, dedup: 0.95, dedupFromUrl: false, index: null, indices: [] };

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

// Cards show a WebP preview (GET /api/image/N?size=…) instead of the file, which may be a 12-megapixel photo:
// wide enough for the card on this screen, in steps of 128 px so that previews are shared between screens.
const PREVIEW_SIZE = Math.min(1024, 128 * Math.ceil(2.5 * (window.devicePixelRatio || 1)));

function previewUrl(imageUrl) {
  return `${imageUrl}${imageUrl.includes("?") ? "&" : "?"}size=${PREVIEW_SIZE}`;
}

function card(hit) {
  const item = document.createElement("article");
  item.className = "card";
  item.dataset.id = hit.id;
  item.title = "Find images like this one (Shift: add it to the query; Alt: push the query away from it)";
  const img = document.createElement("img");
  img.src = previewUrl(hit.image_url);
  img.alt = hit.caption || hit.key || `image ${hit.id}`;
  img.loading = "lazy";
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  if (hit.duplicates && hit.duplicates.length) {
    const dups = document.createElement("span");
    dups.className = "dups";
    dups.textContent = `+${hit.duplicates.length}`;
    dups.title = `${hit.duplicates.length} near-duplicate(s) hidden: ${hit.duplicates.map((i) => `#${i}`).join(" ")}`;
    score.append(dups);
  }
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
  item.tabIndex = 0;  // reachable by Tab; Enter or Space searches by it, as a click does
  item.addEventListener("click", (event) => {
    if (event.shiftKey || event.altKey) addToQuery(hit.id, event.altKey ? "-" : "+");
    else run({ id: hit.id }, true);
  });
  item.addEventListener("keydown", (event) => {
    if (event.target === item && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      run({ id: hit.id }, true);
    }
  });
  return item;
}

// Shift-click adds a result to the query as `+ #id` (Alt-click: `- #id`), the query language's image of the index,
// and searches again: refine a text search by examples.
function addToQuery(id, sign) {
  const box = $("query");
  const current = box.value.trim();
  box.value = current ? `${current} ${sign} #${id}` : `${sign === "-" ? "- " : ""}#${id}`;
  const text = box.value;
  run(state.image ? { image: state.image, text } : { text }, true);
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
  const hidden = answer.hidden ? ` (${answer.hidden} near-duplicates hidden)` : "";
  const against = answer.modality === "text" ? ", matched against captions" : "";
  const under = answer.under ? ` under ${answer.under.join(", ")}` : "";
  setStatus(`${answer.results.length} results for ${label}${under}${against}${hidden}`);
  offerDownload(answer);
}

// The answer as a JSON file, exactly as the API gave it (a data: URL: the page's CSP lets it be saved, and
// nothing has to be revoked).
function offerDownload(answer) {
  $("download").hidden = !answer;
  if (answer) {
    $("download").href = `data:application/json;charset=utf-8,${encodeURIComponent(JSON.stringify(answer, null, 2))}`;
  } else {
    $("download").removeAttribute("href");
  }
}

// Run a query {text, id, image} and, when `push`, record it in the URL.
async function run(query, push) {
  const k = $("k").value;
  const dedup = $("dedup").checked ? String(state.dedup) : null;
  let extra = dedup === null ? "" : `&dedup=${encodeURIComponent(dedup)}`;
  const captions = $("captions").checked;
  if (captions) extra += "&modality=text";
  const under = $("under").value.trim();
  if (under) extra += `&under=${encodeURIComponent(under)}`;
  if (state.index !== null) extra += `&index=${encodeURIComponent(state.index)}`;
  let url = null;
  let options;
  let label;
  if (query.id !== undefined) {
    url = `/api/search?id=${encodeURIComponent(query.id)}&k=${k}${extra}`;
    label = `images like #${query.id}`;
  } else if (query.image) {
    const form = new FormData();
    form.append("image", query.image, "query-image");
    if (query.text) form.append("text", query.text);
    form.append("k", k);
    if (dedup !== null) form.append("dedup", dedup);
    if (state.index !== null) form.append("index", state.index);
    if (captions) form.append("modality", "text");
    if (under) form.append("under", under);
    url = "/api/search";
    options = { method: "POST", body: form };
    label = query.text ? `the image + “${query.text}”` : "the image";
  } else if (query.text) {
    url = `/api/search?text=${encodeURIComponent(query.text)}&k=${k}${extra}`;
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
    if (dedup !== null) params.set("dedup", dedup);
    if (captions) params.set("modality", "text");
    if (under) params.set("under", under);
    if (state.index !== null) params.set("index", state.index);
    history.pushState(null, "", `?${params}`);
  }
  setStatus("searching…");
  try {
    render(await callApi(url, options), label);
  } catch (err) {
    $("results").replaceChildren();
    $("no-match").hidden = true;
    offerDownload(null);
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
  $("dedup").checked = params.has("dedup");
  $("captions").checked = params.get("modality") === "text";
  $("under").value = params.get("under") || "";
  state.index = params.get("index");
  if (state.indices.length) showIndex();
  if (params.has("dedup")) {
    state.dedup = params.get("dedup");
    state.dedupFromUrl = true;
  }
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
  if (state.index !== null) form.append("index", state.index);
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

// The info line of the chosen index (and the menu's choice, when there are several).
function showIndex() {
  const chosen = state.indices.find((i) => i.name === state.index) || state.indices[0];
  if (state.indices.length > 1) $("index").value = chosen.name;
  describe(chosen);
}

function describe(info) {
  const parts = [`${info.images.toLocaleString()} images`, `${info.dim}-d`, info.kind];
  if (info.model) parts.push(`model ${info.model}`);
  if (info.threshold && info.threshold.score !== null) {
    parts.push(`no-good-match threshold ${info.threshold.score.toFixed(3)}`);
  } else if (info.threshold) {
    parts.push("no no-good-match threshold (matched and unmatched captions score alike here)");
  }
  if (state.indices.length > 1) parts.unshift(info.name);
  $("info").textContent = parts.filter(Boolean).join(" · ");
}

async function loadInfo() {
  try {
    const answer = await callApi("/api/indices");
    state.indices = answer.indices;
    if (state.indices.length > 1) {
      $("index").replaceChildren(...state.indices.map((i) => new Option(`${i.name} (${i.images.toLocaleString()})`, i.name)));
      $("index").hidden = false;
    }
    showIndex();
    const first = state.indices[0];
    if (typeof first.dedup === "number" && !state.dedupFromUrl) state.dedup = first.dedup;
    $("dedup-label").title = `Show one image of each group whose cosine similarity is at least ${state.dedup}`;
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
  const rerun = () => {  // the same query again, after a toggle changed
    const text = $("query").value.trim();
    const params = new URLSearchParams(location.search);
    if (state.image) run({ image: state.image, text }, true);
    else if (params.has("id")) run({ id: params.get("id") }, true);
    else if (text) run({ text }, true);
  };
  $("captions").addEventListener("change", rerun);
  $("dedup").addEventListener("change", rerun);
  $("under").addEventListener("keydown", (event) => {  // Enter reruns what is shown (a search by id too)
    if (event.key !== "Enter") return;
    event.preventDefault();
    rerun();
  });
  $("index").addEventListener("change", () => {
    state.index = $("index").value === state.indices[0].name ? null : $("index").value;
    showIndex();
    // ids belong to an index: a search by id has no meaning in another, so only text and image queries rerun
    const text = $("query").value.trim();
    if (state.image) run({ image: state.image, text }, true);
    else if (text) run({ text }, true);
    else {
      $("results").replaceChildren();
      $("no-match").hidden = true;
      offerDownload(null);
      setStatus("");
      history.pushState(null, "", state.index === null ? location.pathname : `?index=${encodeURIComponent(state.index)}`);
    }
  });
  $("classify-button").addEventListener("click", classify);
  $("labels").addEventListener("keydown", (event) => { if (event.key === "Enter") classify(); });
  window.addEventListener("popstate", fromUrl);
}

wire();
loadInfo();
fromUrl();
