"use strict";
// nanoseek web chat. Conversations live in localStorage; answers stream from /v1/chat/completions (SSE read
// with fetch), the thought (reasoning_content) in a collapsible block above the answer. Markdown is rendered by
// the small renderer below: the text is HTML-escaped first, so only the tags written here reach innerHTML.
// Images (button, paste, drop) go with a message as OpenAI image_url parts holding data: URLs, when the served
// model reads images (GET /v1/models says so, with the server's limits, which are checked here first).

const $ = (id) => document.getElementById(id);
const STORE = "nanoseek.chat.v1";
const SETTINGS = "nanoseek.settings.v1";
const FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "seed", "api_key", "system"];

let state = load(STORE, { conversations: [], current: null });
let controller = null; // the running request's AbortController
let modelName = null;
// What /v1/models said about images: null until it answered; then { images: bool, limits }.
let vision = null;
let visionProblem = ""; // why the page does not know yet (e.g. the API key is missing)
let attached = []; // images waiting to go with the next message: { url (a data: URL), name }
const shown = new Map(); // message object -> its element, for the conversation on screen

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() {
  // Images make conversations large: when the browser's storage is full, the oldest images give up their
  // data (shown as "image not kept", never sent again) until the rest fits.
  for (;;) {
    try {
      localStorage.setItem(STORE, JSON.stringify(state, (k, v) => (k === "streaming" ? undefined : v)));
      return;
    } catch (e) {
      if (!dropOldestImage()) throw e;
    }
  }
}

function dropOldestImage() {
  for (const conv of [...state.conversations].reverse()) { // the newest conversation is first
    for (const msg of conv.messages) {
      const img = msg.images?.find((i) => i.url);
      if (img) { img.url = null; return true; }
    }
  }
  return false;
}

// ------------------------------------------------------------------------------------------------ Markdown
const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
function escapeHtml(s) { return s.replace(/[&<>"']/g, (c) => ESC[c]); }

function inline(text) {
  const codes = [];
  let s = text.replace(/`([^`\n]+)`/g, (_, c) => { codes.push(c); return `\u0000${codes.length - 1}\u0000`; });
  s = escapeHtml(s);
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
    (_, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`);
  s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*([^*\s][^*\n]*)\*(?!\w)/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${escapeHtml(codes[+i])}</code>`);
}

function markdown(src) {
  const lines = src.replace(/\u0000/g, "").split("\n");
  const out = [];
  let para = [];
  let list = null;
  const flushPara = () => { if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`); para = []; };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    let m;
    if ((m = line.match(/^\s*```\s*([\w+#.-]*)\s*$/))) { // a fenced block; unclosed while it streams
      flushPara(); flushList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const lang = m[1] ? ` class="language-${escapeHtml(m[1])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara(); flushList();
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flushPara(); flushList();
      out.push("<hr>");
    } else if ((m = line.match(/^>\s?(.*)$/))) {
      flushPara(); flushList();
      out.push(`<blockquote>${inline(m[1])}</blockquote>`);
    } else if ((m = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/))) {
      const tag = m[1] ? "ol" : "ul";
      flushPara();
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push(m[2]);
    } else if (!line.trim()) {
      flushPara(); flushList();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara(); flushList();
  return out.join("");
}

// --------------------------------------------------------------------------------------------- rendering
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function current() { return state.conversations.find((c) => c.id === state.current) || null; }

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const conv of state.conversations) {
    const li = el("li", conv.id === state.current ? "active" : "");
    const del = el("button", "", "×");
    del.title = "Delete";
    del.addEventListener("click", (e) => { e.stopPropagation(); removeConversation(conv.id); });
    li.append(el("span", "", conv.title), del);
    li.addEventListener("click", () => { state.current = conv.id; save(); renderAll(); });
    ul.append(li);
  }
}

function renderMessage(msg) {
  const box = shown.get(msg);
  if (!box) return; // not on screen
  box.className = `message ${msg.role}`;
  box.replaceChildren();
  if (msg.role === "user") {
    if (msg.images?.length) {
      const strip = el("div", "images");
      for (const img of msg.images) strip.append(thumbnail(img));
      box.append(strip);
    }
    if (msg.content || !msg.images?.length) box.append(el("div", "content", msg.content));
    if (msg.note) box.append(el("div", "status", msg.note));
    return;
  }
  if (msg.reasoning) {
    const details = el("details", "thinking");
    details.open = msg.thinkingOpen ?? true;
    const thinkingNow = msg.streaming && !msg.content;
    details.append(el("summary", "", thinkingNow ? "Thinking…"
      : `Thought${msg.thoughtSeconds ? ` for ${msg.thoughtSeconds} s` : ""}`), el("div", "reasoning", msg.reasoning));
    details.addEventListener("toggle", () => { msg.thinkingOpen = details.open; });
    box.append(details);
  }
  const content = el("div", "content");
  content.innerHTML = markdown(msg.content || "");
  if (msg.streaming) content.classList.add("cursor");
  box.append(content);
  if (msg.error) box.append(el("div", "status error", msg.error));
  else if (msg.stopped) box.append(el("div", "status", "Stopped"));
  else if (msg.finish === "length") box.append(el("div", "status", "Stopped at the token limit"));
}

function thumbnail(img) {
  if (!img.url) {
    const gone = el("span", "thumb missing", "image not kept (browser storage full)");
    gone.title = img.name;
    return gone;
  }
  const e = el("img", "thumb");
  e.src = img.url; // a data: URL (the page's CSP allows data: images and nothing else outside)
  e.alt = img.name;
  e.title = img.name;
  return e;
}

function renderAll() {
  renderList();
  const list = $("messages");
  list.replaceChildren();
  shown.clear();
  for (const msg of current()?.messages ?? []) {
    const box = el("div");
    list.append(box);
    shown.set(msg, box);
    renderMessage(msg);
  }
  list.scrollTop = list.scrollHeight;
}

let pending = null;
function renderSoon(msg) { // at most one repaint per frame while tokens stream
  if (pending) return;
  pending = requestAnimationFrame(() => {
    pending = null;
    const list = $("messages");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    renderMessage(msg);
    if (atBottom) list.scrollTop = list.scrollHeight;
  });
}

// --------------------------------------------------------------------------------------- conversations
function newConversation() {
  const conv = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: "New chat", messages: [] };
  state.conversations.unshift(conv);
  state.current = conv.id;
  save();
  renderAll();
  return conv;
}

function removeConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.conversations[0]?.id ?? null;
  save();
  renderAll();
}

// -------------------------------------------------------------------------------------------- settings
function settings() {
  const s = load(SETTINGS, {});
  const num = (k) => (s[k] === undefined || s[k] === "" ? undefined : Number(s[k]));
  return { temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
           max_tokens: num("max_tokens"), seed: num("seed"), api_key: s.api_key || "", system: s.system || "" };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = settings().api_key;
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// ------------------------------------------------------------------------------------------- streaming
function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// A user message as the API takes it: its text alone, or its images (those in `sent`) then the text.
function apiContent(msg, sent) {
  const images = (msg.images ?? []).filter((img) => sent.has(img));
  if (!images.length) return msg.content;
  const parts = images.map((img) => ({ type: "image_url", image_url: { url: img.url } }));
  if (msg.content) parts.push({ type: "text", text: msg.content });
  return parts;
}

// Which images a request carries: all of the new message's, then earlier ones, newest first, while the
// server's limits (images per request, body bytes) allow; an earlier image left out is not sent again.
function imagesToSend(history, message, bodyBytes) {
  const sent = new Set(message.images ?? []);
  const limits = vision?.limits;
  if (!limits) return sent; // a text-only model: no image reaches here
  let count = sent.size;
  let size = bodyBytes;
  for (const img of sent) size += img.url.length;
  for (const msg of [...history].reverse()) {
    for (const img of [...(msg.images ?? [])].reverse()) {
      if (!img.url) continue;
      if (count + 1 > limits.max_images_per_request || size + img.url.length > limits.max_body_bytes) continue;
      sent.add(img);
      count += 1;
      size += img.url.length;
    }
  }
  return sent;
}

async function send(text, images = []) {
  const conv = current() || newConversation();
  // A question whose answer failed (e.g. a 401) is not sent again as history: the retry asks it afresh.
  const answered = (m, i, all) => m.role === "user" ? !all[i + 1]?.error : !m.error && m.content;
  const history = conv.messages.filter(answered);
  const message = { role: "user", content: text };
  if (images.length) message.images = images;
  conv.messages.push(message);
  if (conv.title === "New chat") conv.title = (text || `Image: ${images[0].name}`).slice(0, 40);
  const reply = { role: "assistant", content: "", reasoning: "", streaming: true };
  conv.messages.push(reply);

  const s = settings();
  const textOnly = (m) => ({ role: m.role, content: m.content });
  const body = {
    stream: true,
    messages: [...(s.system ? [{ role: "system", content: s.system }] : []), ...history.map(textOnly),
               textOnly(message)],
    thinking: { type: $("thinking").checked ? "enabled" : "disabled" },
  };
  if (modelName) body.model = modelName;
  for (const k of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    if (s[k] !== undefined && !Number.isNaN(s[k])) body[k] = s[k];
  }
  // the body without images, plus a margin for the parts' JSON around each URL
  const base = new TextEncoder().encode(JSON.stringify(body)).length + 64 * (history.length + 1);
  const sent = imagesToSend(history, message, base);
  const earlier = history.flatMap((m) => m.images ?? []).filter((img) => img.url);
  const left = earlier.filter((img) => !sent.has(img)).length;
  if (left) {
    const limits = vision?.limits;
    const plural = left > 1 ? "s" : "";
    message.note = !limits ? `${left} earlier image${plural} not sent: this model reads text only`
      : `${left} earlier image${plural} not sent again: this server takes at most ` +
        `${limits.max_images_per_request} image${limits.max_images_per_request > 1 ? "s" : ""} and ` +
        `${bytes(limits.max_body_bytes)} per request`;
  }
  const offset = s.system ? 1 : 0;
  [...history, message].forEach((m, i) => {
    if (m.role === "user") body.messages[offset + i].content = apiContent(m, sent);
  });
  save();
  renderAll();

  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => null);
      const hint = res.status === 401 ? " (set the API key in Settings)" : "";
      throw new Error(`${res.status}: ${err?.error?.message ?? res.statusText}${hint}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue; // ": keep-alive" comments
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices) {
            const d = choice.delta || {};
            if (d.reasoning_content) reply.reasoning += d.reasoning_content;
            if (d.content) {
              if (!reply.content && reply.reasoning) {
                reply.thoughtSeconds = ((performance.now() - started) / 1000).toFixed(1);
              }
              reply.content += d.content;
            }
            if (choice.finish_reason) reply.finish = choice.finish_reason;
          }
        }
      }
      renderSoon(reply);
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = String(e.message || e);
  } finally {
    controller = null;
    reply.streaming = false;
    setBusy(false);
    renderMessage(reply);
    save();
  }
}

// ----------------------------------------------------------------------------------------------- wiring
function init() {
  const stored = load(SETTINGS, {});
  for (const k of FIELDS) {
    const input = $(k);
    if (stored[k] !== undefined) input.value = stored[k];
    input.addEventListener("change", () => {
      const s = load(SETTINGS, {});
      s[k] = input.value;
      localStorage.setItem(SETTINGS, JSON.stringify(s));
      if (k === "api_key") fetchModel();
    });
  }
  $("settings-toggle").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("new-chat").addEventListener("click", () => { if (!controller) newConversation(); });
  $("stop").addEventListener("click", () => controller?.abort());
  const input = $("input");
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if ((!text && !attached.length) || controller) return;
    const problem = attachedProblem();
    if (problem) { note(problem); return; }
    input.value = "";
    const images = attached;
    attached = [];
    renderAttached();
    note("");
    send(text, images);
  });
  wireImages();
  input.addEventListener("keydown", (e) => { // Enter sends, Shift+Enter breaks the line; never mid-IME
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  renderAll();
  fetchModel();
  input.focus();
}

let modelRetry = null;
async function fetchModel() {
  clearTimeout(modelRetry);
  let loading = false;
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.ok) {
      const card = (await res.json()).data[0];
      modelName = card?.id ?? null;
      if (modelName) $("model-name").textContent = modelName;
      if (card?.input_modalities) {
        const limits = card.image_limits ?? null;
        vision = { images: card.input_modalities.includes("image") && limits !== null, limits };
        visionProblem = "";
      } else {
        loading = true; // the checkpoint is still loading
      }
    } else if (res.status === 401) {
      visionProblem = "Set the API key in Settings: without it the page cannot ask whether this model reads images";
    } else {
      loading = res.status === 503;
      visionProblem = `The server did not say whether this model reads images (${res.status})`;
    }
  } catch { /* the page still works; requests name no model */ }
  if (loading) modelRetry = setTimeout(fetchModel, 1000);
  updateAttach();
}

// ------------------------------------------------------------------------------------------------ images
function bytes(n) {
  return n >= 1 << 20 ? `${+(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${+(n / 1024).toFixed(1)} KiB` : `${n} bytes`;
}
const FORMAT_NAMES = { "image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WebP",
                       "image/bmp": "BMP" };
function formatList(types) { return types.map((t) => FORMAT_NAMES[t] ?? t).join(", "); }

function updateAttach() {
  const button = $("attach");
  button.disabled = !vision?.images;
  if (vision?.images) {
    const l = vision.limits;
    button.title = `Attach images (${formatList(l.formats)}; up to ${l.max_images_per_request} per message, ` +
      `${l.max_image_pixels} pixels each); you can also paste or drop them here`;
  } else if (vision) {
    button.title = "This model reads text only: it cannot take images";
  } else {
    button.title = visionProblem || "Checking whether this model reads images…";
  }
  $("attach-tip").title = button.title; // some browsers show no tooltip on a disabled button
}

function note(text) {
  const p = $("attach-note");
  p.textContent = text;
  p.hidden = !text;
}

function renderAttached() {
  const tray = $("attachments");
  tray.replaceChildren();
  for (const img of attached) {
    const fig = el("figure");
    const remove = el("button", "", "×");
    remove.type = "button";
    remove.title = `Remove ${img.name}`;
    remove.setAttribute("aria-label", `Remove ${img.name}`);
    remove.addEventListener("click", () => {
      attached = attached.filter((a) => a !== img);
      renderAttached();
    });
    fig.append(thumbnail(img), remove);
    tray.append(fig);
  }
  tray.hidden = !attached.length;
}

// The attached images together, under the server's limits (each was checked alone when attached).
function attachedProblem() {
  if (!attached.length) return "";
  if (!vision?.images) return vision ? "This model reads text only: remove the images to send" : "";
  const l = vision.limits;
  const total = attached.reduce((n, img) => n + img.url.length, 0);
  if (total > l.max_body_bytes - 4096) {
    return `These images are ${bytes(total)} as base64 together, and this server takes requests of up to ` +
      `${bytes(l.max_body_bytes)}: remove some`;
  }
  return "";
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function imageSize(url) { // { width, height }, or null when the browser cannot decode it
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

// An image file's problem under the server's limits (its format, bytes, the request body), or "" when it may
// go as it is. The server checks again (and decodes: a corrupt file the browser cannot judge is sent, and the
// server's 400 says what is wrong with it).
function fileProblem(file, l) {
  const name = file.name || "the pasted image";
  if (!l.formats.includes(file.type)) {
    return `${name}: ${file.type} is not a format this server reads (${formatList(l.formats)})`;
  }
  if (file.size > l.max_image_bytes) {
    return `${name} is too large: ${bytes(file.size)}, over the server's limit of ${bytes(l.max_image_bytes)}`;
  }
  const encoded = 4 * Math.ceil(file.size / 3) + file.type.length + 13;
  if (encoded > l.max_body_bytes - 4096) {
    return `${name} is too large to send: ${bytes(encoded)} as base64, and this server takes requests of up to ` +
      `${bytes(l.max_body_bytes)} (nanoseek serve --max-body-bytes)`;
  }
  return "";
}

// An image over the server's limits (pixels, bytes, the request body) or in a format it does not read, redrawn
// to fit: on a canvas at the largest size within the pixel limit, as PNG, or as JPEG when the PNG has too many
// bytes; smaller again while neither fits. Transparency goes onto white, as the server flattens it.
// -> { url, width, height, kind }, or null when nothing fits.
async function redraw(url, size, l) {
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
  } catch {
    return null; // the browser read its size but cannot draw it: the file's own problem is shown
  }
  const longest = Math.min(l.max_image_bytes * 4 / 3, l.max_body_bytes - 4096); // data URL characters
  const kinds = ["image/png", "image/jpeg"].filter((k) => l.formats.includes(k));
  let scale = Math.min(1, Math.sqrt(l.max_image_pixels / (size.width * size.height)));
  for (let tries = 0; tries < 8; tries++, scale *= 0.75) {
    const width = Math.max(1, Math.floor(size.width * scale));
    const height = Math.max(1, Math.floor(size.height * scale));
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const g = canvas.getContext("2d");
    g.fillStyle = "#fff";
    g.fillRect(0, 0, width, height);
    g.drawImage(img, 0, 0, width, height);
    for (const kind of kinds) {
      const out = canvas.toDataURL(kind, 0.9);
      if (out.length <= longest && out.startsWith(`data:${kind};`)) return { url: out, width, height, kind };
    }
  }
  return null;
}

async function addFiles(files) {
  files = [...files];
  if (!files.length) return;
  if (!vision?.images) {
    note(vision ? "This model reads text only: it cannot take images" : (visionProblem ||
      "The server has not said yet whether this model reads images"));
    return;
  }
  const l = vision.limits;
  const problems = [];
  for (const file of files) {
    const name = file.name || "the pasted image";
    if (!file.type.startsWith("image/")) {
      problems.push(`${name} is not an image (${file.type || "unknown type"})`);
      continue;
    }
    if (attached.length >= l.max_images_per_request) {
      problems.push(`${name} not attached: this server takes at most ${l.max_images_per_request} images per message`);
      continue;
    }
    const url = await readDataUrl(file);
    const size = await imageSize(url);
    let problem = fileProblem(file, l);
    if (!problem && size && size.width * size.height > l.max_image_pixels) {
      problem = `${name} is too large: ${size.width}×${size.height} = ${size.width * size.height} pixels, over ` +
        `the server's limit of ${l.max_image_pixels}`;
    }
    if (problem && size) { // the browser can draw it: redrawn to fit, and the note says how
      const fit = await redraw(url, size, l);
      if (fit) {
        const how = fit.width < size.width || fit.height < size.height
          ? `scaled down from ${size.width}×${size.height} to ${fit.width}×${fit.height}` : "re-encoded";
        problems.push(`${name} was ${how} (${FORMAT_NAMES[fit.kind]}) to fit this server's limits`);
        attached.push({ url: fit.url, name: file.name || "pasted image" });
        continue;
      }
    }
    if (problem) { problems.push(problem); continue; }
    attached.push({ url, name: file.name || "pasted image" });
  }
  note(problems.join("; "));
  renderAttached();
}

function wireImages() {
  const picker = $("attach-input");
  $("attach").addEventListener("click", () => picker.click());
  picker.addEventListener("change", () => { addFiles(picker.files); picker.value = ""; });
  $("input").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files ?? [])];
    if (!files.length) return; // text pastes as text
    e.preventDefault();
    addFiles(files);
  });
  // Files dropped anywhere on the page attach (the composer lights up); the browser never navigates to them.
  const composer = $("composer");
  const hasFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = vision?.images ? "copy" : "none";
    composer.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) composer.classList.remove("dragging"); // left the window
  });
  document.addEventListener("drop", (e) => {
    composer.classList.remove("dragging");
    if (!e.dataTransfer?.files?.length) return;
    e.preventDefault();
    addFiles(e.dataTransfer.files);
  });
}

init();
