// adaptkit playground: the bare backbone and every matching adapter, side by side.
//
// Plain JavaScript, no build step, nothing loaded from elsewhere. Every piece of data goes into the DOM as
// textContent (never innerHTML). The page itself holds no data and needs no key; every call it makes sends the
// key typed in above (kept in sessionStorage: this tab only, gone when it closes).
"use strict";

(() => {
  const KEY_STORE = "adaptkit.apiKey";
  // a stream refused for one of these reasons is asked again without streaming
  const NO_STREAM = new Set(["streams_busy", "stream_unsupported", "stream_one_greedy_prompt", "bad_stream_request"]);
  const $ = (id) => document.getElementById(id);
  const state = { adapters: [], abort: null };

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // -- the key --------------------------------------------------------------------------------------------
  function storedKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch (e) {
      return "";
    }
  }

  function setKey(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORE, value);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) {
      /* storage disabled: the key lasts until the page is reloaded */
      state.memoryKey = value;
    }
    showKeyNote();
  }

  const currentKey = () => storedKey() || state.memoryKey || "";

  function showKeyNote(text, bad) {
    const note = $("key-note");
    note.textContent = text || (currentKey() ? "a key is in use (kept for this tab only)" : "");
    note.classList.toggle("bad", Boolean(bad));
  }

  // -- calls ----------------------------------------------------------------------------------------------
  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = currentKey();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function errorFrom(status, body) {
    const error = body && typeof body === "object" ? body.error : null;
    if (error && typeof error === "object") {
      return new ApiError(status, String(error.code || "http_" + status), String(error.message || ""));
    }
    return new ApiError(status, "http_" + status, "the service answered " + status);
  }

  async function errorOf(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      /* not JSON */
    }
    return errorFrom(response.status, body);
  }

  async function call(path, body, signal) {
    const init = { method: body === undefined ? "GET" : "POST", headers: headers(body !== undefined), signal,
                   cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    return { name, data: data.length ? JSON.parse(data.join("\n")) : null };
  }

  // POST /v1/generate with stream: true; fetch + ReadableStream, as EventSource cannot POST
  async function stream(body, onPiece, signal) {
    const response = await fetch("v1/generate", { method: "POST", headers: headers(true), signal, cache: "no-store",
                                                  body: JSON.stringify({ ...body, stream: true }) });
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = null;
    for (;;) {
      const { value, done: end } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(0), { stream: !end });
      buffer = buffer.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (event.name === "error") throw errorFrom(500, event.data);
        if (event.name === "done") done = event.data;
        else if (event.data && typeof event.data.text === "string") onPiece(event.data.text);
      }
      if (end) break;
    }
    if (!done) throw new ApiError(0, "stream_cut", "the stream ended before its last event");
    return done;
  }

  // -- the adapters table ---------------------------------------------------------------------------------
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function bytes(n) {
    if (typeof n !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function number(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "";
  }

  function metricText(metrics) {
    if (!metrics || typeof metrics !== "object") return "";
    const parts = [];
    const walk = (value, prefix) => {
      if (value && typeof value === "object" && !Array.isArray(value)) {
        for (const [k, v] of Object.entries(value)) walk(v, prefix ? prefix + "." + k : k);
      } else if (typeof value === "number") {
        parts.push(prefix + " " + (Number.isInteger(value) ? value : value.toFixed(2)));
      } else {
        parts.push(prefix + " " + (typeof value === "string" ? value : JSON.stringify(value)));
      }
    };
    walk(metrics, "");
    return parts.join(" · ");
  }

  function fill(listId, values) {
    const list = $(listId);
    list.replaceChildren(...[...new Set(values.filter(Boolean))].sort().map((v) => {
      const option = document.createElement("option");
      option.value = v;
      return option;
    }));
  }

  function renderAdapters() {
    const wanted = matching();
    const rows = state.adapters.map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.name = a.name;
      if (a.error) tr.className = "broken";
      else if (wanted.includes(a)) tr.className = "match";
      const pair = a.src_lang || a.tgt_lang ? (a.src_lang || "?") + " → " + (a.tgt_lang || "?") : "";
      tr.append(el("td", a.name), el("td", a.method || ""), el("td", pair), el("td", a.domain || "any"),
                el("td", a.task || ""), el("td", number(a.num_parameters), "num"), el("td", bytes(a.file_bytes), "num"),
                el("td", a.error ? "cannot be loaded: " + a.error : metricText(a.metrics), "metrics"),
                el("td", a.resident ? "yes" : "no"));
      return tr;
    });
    $("adapters").tBodies[0].replaceChildren(...rows);
    fill("langs", state.adapters.flatMap((a) => [a.src_lang, a.tgt_lang]));
    fill("domains", state.adapters.map((a) => a.domain));
  }

  async function loadAdapters() {
    const note = $("adapters-note");
    try {
      const listing = await call("v1/adapters");
      state.adapters = Array.isArray(listing.adapters) ? listing.adapters : [];
      note.textContent = state.adapters.length + " adapter" + (state.adapters.length === 1 ? "" : "s") + " in the store"
        + (listing.max_resident ? ", at most " + listing.max_resident + " in memory at once" : "")
        + "; those that match the languages and domain above are marked";
      note.classList.remove("bad");
      showKeyNote();
    } catch (error) {
      state.adapters = [];
      showError(note, error);
      if (error.code === "unauthorized") {
        showKeyNote(currentKey() ? "that key was refused" : "this service needs an API key: enter it here", true);
        $("key").focus();
      }
    }
    renderAdapters();
  }

  // -- translating ----------------------------------------------------------------------------------------
  function form() {
    const maxNew = parseInt($("max-new").value, 10);
    return { text: $("source").value, src: $("src").value.trim(), tgt: $("tgt").value.trim(),
             domain: $("domain").value.trim(), maxNew: maxNew > 0 ? maxNew : null, stream: $("stream").checked };
  }

  // the adapters for this pair (and domain: an adapter without one serves any domain of its pair)
  function matching() {
    const f = form();
    return state.adapters.filter((a) => !a.error && (a.task === null || a.task === undefined || a.task === "translate")
      && a.src_lang === f.src && a.tgt_lang === f.tgt && (!f.domain || !a.domain || a.domain === f.domain));
  }

  function showError(node, error) {
    if (error instanceof ApiError) node.textContent = (error.status ? error.status + " " : "") + error.code + ": " + error.message;
    else node.textContent = "the service could not be reached: " + (error && error.message ? error.message : error);
    node.classList.add("bad");
  }

  function card(adapter) {
    const node = el("article", null, "card" + (adapter ? "" : " bare"));
    node.dataset.adapter = adapter ? adapter.name : "";
    node.dataset.state = "running";
    const title = el("h3", adapter ? adapter.name : "bare backbone");
    title.append(el("small", adapter ? [adapter.method, adapter.domain].filter(Boolean).join(" · ") : "no adapter"));
    const output = el("div", "", "output");
    const meta = el("div", "", "meta");
    node.append(title, output, meta);
    return { node, output, meta };
  }

  async function runCard(c, adapter, f, signal) {
    const generate = { prompts: [f.text], adapter: adapter ? adapter.name : null, task: "translate",
                       src_lang: f.src, tgt_lang: f.tgt };
    if (f.maxNew) generate.max_new_tokens = f.maxNew;
    let result = null;
    let note = "";
    try {
      if (f.stream) {
        let text = "";
        try {
          const done = await stream(generate, (piece) => {
            text += piece;
            c.output.textContent = text;
            c.node.dataset.state = "streaming";
          }, signal);
          const t = done.timings || {};
          result = { output: done.output, via: "stream", meta: "streamed · first piece "
                     + Math.round(t.first_piece_ms || 0) + " ms · " + Math.round(t.total_ms || 0) + " ms" };
        } catch (error) {
          if (!(error instanceof ApiError) || !NO_STREAM.has(error.code)) throw error;
          note = " · not streamed (" + error.code + ")";
          c.output.textContent = "";
        }
      }
      if (!result) {
        let answer;
        let output;
        if (adapter) {
          const body = { texts: [f.text], src_lang: f.src, tgt_lang: f.tgt, adapter: adapter.name };
          if (f.maxNew) body.max_new_tokens = f.maxNew;
          answer = await call("v1/translate", body, signal);
          output = answer.translations[0];
        } else {
          answer = await call("v1/generate", generate, signal);
          output = answer.outputs[0];
        }
        result = { output, via: adapter ? "translate" : "generate",
                   meta: Math.round((answer.timings || {}).total_ms || 0) + " ms" + note };
      }
      c.output.textContent = result.output;
      c.meta.textContent = result.meta;
      c.node.dataset.via = result.via;
      c.node.dataset.state = "done";
    } catch (error) {
      if (signal.aborted) return;
      const line = el("div", "", "error");
      showError(line, error);
      c.node.append(line);
      c.node.dataset.state = "error";
    }
  }

  async function translate(event) {
    event.preventDefault();
    const f = form();
    const status = $("status");
    status.classList.remove("bad");
    if (!f.text.trim() || !f.src || !f.tgt) {
      status.textContent = "give a source text and both languages";
      status.classList.add("bad");
      return;
    }
    if (state.abort) state.abort.abort();
    const controller = new AbortController();
    state.abort = controller;
    const adapters = matching();
    renderAdapters();
    const cards = [null, ...adapters].map((a) => [card(a), a]);
    $("outputs").replaceChildren(...cards.map(([c]) => c.node));
    status.textContent = adapters.length
      ? "the bare backbone and " + adapters.length + " adapter" + (adapters.length === 1 ? "" : "s") + " for "
        + f.src + " → " + f.tgt + (f.domain ? " (" + f.domain + ")" : "")
      : "no adapter in the store translates " + f.src + " → " + f.tgt + (f.domain ? " (" + f.domain + ")" : "")
        + ": the bare backbone only";
    $("outputs").dataset.state = "running";
    await Promise.all(cards.map(([c, a]) => runCard(c, a, f, controller.signal)));
    if (state.abort === controller) {
      $("outputs").dataset.state = "done";
      state.abort = null;
      loadAdapters(); // residency changed
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key").value.trim();
      $("key").value = "";
      setKey(value);
      loadAdapters();
    });
    $("key-forget").addEventListener("click", () => {
      $("key").value = "";
      setKey("");
      loadAdapters();
    });
    $("sample").addEventListener("change", () => {
      if ($("sample").value) $("source").value = $("sample").value;
    });
    for (const id of ["src", "tgt", "domain"]) $(id).addEventListener("input", renderAdapters);
    $("translate-form").addEventListener("submit", translate);
    $("refresh").addEventListener("click", loadAdapters);
    showKeyNote();
    loadAdapters();
  });
})();
