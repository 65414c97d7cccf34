"use strict";
// nanoseek web chat. Conversations live in localStorage; answers stream from /v1/chat/completions (SSE read
// with fetch), the thought (reasoning_content) in a collapsible block above the answer. Markdown is rendered by
// the small renderer below: the text is HTML-escaped first, so only the tags written here reach innerHTML.

const $ = (id) => document.getElementById(id);
const STORE = "nanoseek.chat.v1";
const SETTINGS = "nanoseek.settings.v1";
const FIELDS = ["temperature", "top_p", "top_k", "max_tokens", "seed", "api_key", "system"];

let state = load(STORE, { conversations: [], current: null });
let controller = null; // the running request's AbortController
let modelName = null;
const shown = new Map(); // message object -> its element, for the conversation on screen

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(state, (k, v) => (k === "streaming" ? undefined : v)));
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
    box.append(el("div", "content", msg.content));
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

async function send(text) {
  const conv = current() || newConversation();
  // A question whose answer failed (e.g. a 401) is not sent again as history: the retry asks it afresh.
  const answered = (m, i, all) => m.role === "user" ? !all[i + 1]?.error : !m.error && m.content;
  const history = conv.messages.filter(answered).map((m) => ({ role: m.role, content: m.content }));
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.slice(0, 40);
  const reply = { role: "assistant", content: "", reasoning: "", streaming: true };
  conv.messages.push(reply);
  save();
  renderAll();

  const s = settings();
  const body = {
    stream: true,
    messages: [...(s.system ? [{ role: "system", content: s.system }] : []), ...history,
               { role: "user", content: text }],
    thinking: { type: $("thinking").checked ? "enabled" : "disabled" },
  };
  if (modelName) body.model = modelName;
  for (const k of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    if (s[k] !== undefined && !Number.isNaN(s[k])) body[k] = s[k];
  }

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
    if (!text || controller) return;
    input.value = "";
    send(text);
  });
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

async function fetchModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) return;
    modelName = (await res.json()).data[0]?.id ?? null;
    if (modelName) $("model-name").textContent = modelName;
  } catch { /* the page still works; requests name no model */ }
}

init();
