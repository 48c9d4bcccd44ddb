// modelkernel dashboard: live over Server-Sent Events (/v1/events), polling as the fallback.
//
// Every string from the server goes into the page through textContent (never innerHTML), so
// a model id, URL or error message is always shown as text. The API key, when the server
// wants one, is kept in localStorage and sent as X-API-Key (and as ?api_key= to the event
// stream, because EventSource cannot send headers).
"use strict";

(() => {
  const KEY_STORAGE = "modelkernel.apiKey";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const ACTIVE_ACTIONS = new Set(["queued", "downloading", "paused", "creating_engine"]);
  const POLL_MS = 2000;
  const RECONNECT_MS = 5000;
  const CLUSTER_MS = 2000;

  const state = {
    downloads: new Map(), // model_id -> download object, in display order
    cards: new Map(), // model_id -> {root, fields...}
    showEnded: false,
    source: null,
    pollTimer: null,
    reconnectTimer: null,
    refreshing: false,
    refreshAgain: false,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // --- the API ------------------------------------------------------------------------------

  function apiKey() {
    try {
      return window.localStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";
    }
  }

  function setApiKey(value) {
    try {
      if (value) window.localStorage.setItem(KEY_STORAGE, value);
      else window.localStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      /* storage disabled: the key lasts until the page closes */
    }
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers["X-API-Key"] = key;
    const options = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (_) {
      setConn("offline", "server unreachable");
      throw new ApiError(0, "Cannot reach the server");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const error = data && data.error && typeof data.error.message === "string" ? data.error.message : "";
      const message = error || `HTTP ${response.status}`;
      if (response.status === 401) askForKey();
      throw new ApiError(response.status, message);
    }
    return data;
  }

  const downloadPath = (modelId) => `/v1/downloads/${encodeURIComponent(modelId)}`;

  // --- loading: one list, then events --------------------------------------------------------

  async function refresh() {
    if (state.refreshing) {
      state.refreshAgain = true;
      return;
    }
    state.refreshing = true;
    state.refreshAgain = false;
    try {
      const data = await api("GET", state.showEnded ? "/v1/downloads?status=all" : "/v1/downloads");
      state.downloads = new Map(data.active_downloads.map((d) => [d.model_id, d]));
      clearError();
      render();
    } catch (error) {
      showError(`Failed to fetch downloads: ${error.message}`);
    } finally {
      state.refreshing = false;
      if (state.refreshAgain) refresh();
    }
  }

  function onDownloadEvent(name, message) {
    let download;
    try {
      download = JSON.parse(message.data);
    } catch (_) {
      return;
    }
    if (!download || typeof download.model_id !== "string") return;
    const known = state.downloads.get(download.model_id);
    if (name === "download.progress") {
      // Progress never changes a status we know (an old event must not undo a pause).
      if (known && known.status !== download.status) return;
    } else if (state.refreshing) {
      state.refreshAgain = true; // the list in flight may predate this transition
    }
    if (TERMINAL.has(download.status) && !state.showEnded) {
      state.downloads.delete(download.model_id);
    } else {
      state.downloads.set(download.model_id, download);
    }
    render();
  }

  function connectEvents() {
    if (state.reconnectTimer) {
      clearTimeout(state.reconnectTimer);
      state.reconnectTimer = null;
    }
    if (state.source) state.source.close();
    state.source = null;
    if (!window.EventSource) {
      startPolling();
      return;
    }
    const key = apiKey();
    const source = new EventSource(`/v1/events${key ? `?api_key=${encodeURIComponent(key)}` : ""}`);
    state.source = source;
    source.onopen = () => {
      setConn("live", "live (Server-Sent Events)");
      stopPolling();
      refresh();
    };
    source.onerror = () => {
      startPolling(); // until the stream is back
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an error status, e.g. 401): try again later ourselves.
        state.source = null;
        state.reconnectTimer = setTimeout(connectEvents, RECONNECT_MS);
      }
    };
    for (const name of ["download.created", "download.status", "download.progress"]) {
      source.addEventListener(name, (message) => onDownloadEvent(name, message));
    }
    source.addEventListener("resync", () => refresh());
  }

  function startPolling() {
    if (state.pollTimer) return;
    setConn("polling", `polling every ${POLL_MS / 1000}s`);
    state.pollTimer = setInterval(refresh, POLL_MS);
  }

  function stopPolling() {
    if (state.pollTimer) clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  // --- rendering ------------------------------------------------------------------------------

  function render() {
    renderStats();
    const container = $("downloads-container");
    for (const [modelId, card] of state.cards) {
      if (!state.downloads.has(modelId)) {
        card.root.remove();
        state.cards.delete(modelId);
      }
    }
    for (const download of state.downloads.values()) {
      let card = state.cards.get(download.model_id);
      if (!card) {
        card = buildCard(download.model_id);
        state.cards.set(download.model_id, card);
      }
      container.appendChild(card.root); // keeps the map's order; moves, never rebuilds
      updateCard(card, download);
    }
    const empty = $("empty");
    empty.textContent = state.showEnded ? "No downloads" : "No active downloads";
    empty.hidden = state.downloads.size > 0;
  }

  function renderStats() {
    const active = [...state.downloads.values()].filter((d) => !TERMINAL.has(d.status));
    const count = (test) => active.filter(test).length;
    const stats = [
      ["Total Active", active.length],
      ["Downloading", count((d) => d.status === "downloading")],
      ["Queued", count((d) => d.status === "queued")],
      ["Paused", count((d) => d.status === "paused")],
      ["Startup Downloads", count((d) => d.download_type === "startup")],
      ["Regular Downloads", count((d) => d.download_type === "regular")],
      ["Embedding Models", count((d) => d.type === "embedding")],
      ["LLM Models", count((d) => d.type === "llm")],
    ];
    const grid = $("stats-grid");
    grid.replaceChildren(
      ...stats.map(([label, value]) => {
        const card = el("div", "stat-card");
        card.append(el("div", "stat-value", value), el("div", "stat-label", label));
        return card;
      }),
    );
  }

  function detail(label, key) {
    const item = el("div", `detail-item detail-${key}`);
    const value = el("div", "detail-value", "-");
    item.append(el("div", "detail-label", label), value);
    return { item, value };
  }

  function buildCard(modelId) {
    const root = el("article", "download-item");
    root.dataset.modelId = modelId;
    const header = el("div", "download-header");
    const titles = el("div");
    const title = el("div", "model-id", modelId);
    const kind = el("div", "subtle kind");
    const url = el("div", "subtle url");
    const path = el("div", "subtle local-path");
    titles.append(title, kind, url, path);
    const status = el("div", "status");
    header.append(titles, status);

    const bar = el("div", "progress-bar");
    const fill = el("div", "progress-fill");
    bar.append(fill);
    const percent = el("div", "progress-text");

    const details = el("div", "download-details");
    const fields = {
      downloaded: detail("Downloaded", "downloaded"),
      total: detail("Total Size", "total"),
      speed: detail("Speed", "speed"),
      elapsed: detail("Elapsed", "elapsed"),
      remaining: detail("Remaining", "remaining"),
      queue: detail("Queue Position", "queue"),
      attempts: detail("Retry Attempts", "attempts"),
    };
    for (const field of Object.values(fields)) details.append(field.item);

    const lastError = el("div", "subtle last-error");
    const error = el("div", "error");
    const engine = el("div", "engine-info");

    const controls = el("div", "controls");
    const pause = el("button", "btn btn-pause", "Pause");
    const resume = el("button", "btn btn-resume", "Resume");
    const cancel = el("button", "btn btn-cancel", "Cancel");
    for (const button of [pause, resume, cancel]) button.type = "button";
    pause.addEventListener("click", () => act(modelId, "pause", "pause"));
    resume.addEventListener("click", () => act(modelId, "resume", "resume"));
    cancel.addEventListener("click", () => {
      if (window.confirm(`Are you sure you want to cancel the download for ${modelId}?`)) {
        act(modelId, "cancel", "cancel");
      }
    });
    controls.append(pause, resume, cancel);

    root.append(header, bar, percent, details, lastError, error, engine, controls);
    return { root, kind, url, path, status, fill, percent, fields, lastError, error, engine, pause, resume, cancel };
  }

  function updateCard(card, d) {
    const progress = d.progress || {};
    const timing = d.timing || {};
    const status = /^[a-z_]+$/.test(d.status) ? d.status : "unknown";
    card.status.className = `status status-${status}`;
    card.status.textContent = String(d.status).replace("_", " ");
    card.kind.textContent = `${d.download_type} download · ${d.type}`;
    card.url.textContent = d.url;
    card.path.textContent = d.local_path;
    const pct = clampPercent(progress.percentage);
    card.fill.style.width = `${pct}%`;
    card.percent.textContent = `${pct.toFixed(1)}%`;
    const f = card.fields;
    f.downloaded.value.textContent = formatBytes(progress.downloaded_bytes);
    f.total.value.textContent = progress.total_bytes > 0 ? formatBytes(progress.total_bytes) : "unknown";
    f.speed.value.textContent = formatSpeed(progress.download_speed_bps);
    f.elapsed.value.textContent = formatDuration(timing.elapsed_seconds);
    show(f.remaining, timing.estimated_remaining_seconds !== undefined);
    f.remaining.value.textContent = formatDuration(timing.estimated_remaining_seconds);
    show(f.queue, d.queue_position !== undefined);
    f.queue.value.textContent = String(d.queue_position ?? "");
    show(f.attempts, d.attempts !== undefined);
    f.attempts.value.textContent = String(d.attempts ?? "");
    card.lastError.hidden = !d.last_error;
    card.lastError.textContent = d.last_error ? `Retrying after: ${d.last_error}` : "";
    card.error.hidden = !d.error_message;
    card.error.textContent = d.error_message ? `Error: ${d.error_message}` : "";
    const engine = d.engine_creation;
    card.engine.hidden = !engine;
    if (engine) {
      const name = engine.inference_engine ? `${engine.inference_engine} engine` : "Engine";
      card.engine.textContent =
        `${name} for ${engine.model_id} · GPU ${engine.main_gpu_id} · ` +
        `Auto-load: ${engine.load_immediately ? "Yes" : "No"}`;
    }
    card.pause.disabled = !(d.status === "downloading" || d.status === "queued");
    card.resume.disabled = d.status !== "paused";
    card.cancel.disabled = !ACTIVE_ACTIONS.has(d.status);
  }

  function show(field, visible) {
    field.item.hidden = !visible;
  }

  // --- actions --------------------------------------------------------------------------------

  async function act(modelId, action, verb) {
    try {
      await api("POST", `${downloadPath(modelId)}/${action}`);
      clearError();
    } catch (error) {
      showError(`Failed to ${verb} ${modelId}: ${error.message}`);
    }
    refresh();
  }

  async function cancelAll() {
    if (!window.confirm("Are you sure you want to cancel ALL active downloads?")) return;
    const button = $("cancel-all-btn");
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      const result = await api("POST", "/v1/downloads/cancel");
      notice(`Cancelled ${result.summary.successful_cancellations} download(s)`);
      clearError();
    } catch (error) {
      showError(`Failed to cancel all downloads: ${error.message}`);
    } finally {
      button.disabled = false;
      button.textContent = "Cancel all downloads";
      refresh();
    }
  }

  async function createDownload(event) {
    event.preventDefault();
    const modelId = $("create-id").value.trim();
    const url = $("create-url").value.trim();
    if (!modelId || !url) return;
    const button = $("create-btn");
    button.disabled = true;
    try {
      await api("POST", "/v1/downloads", { model_id: modelId, url });
      $("create-form").reset();
      notice(`Started ${modelId}`);
      clearError();
    } catch (error) {
      showError(`Failed to start ${modelId}: ${error.message}`);
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  // --- the key, errors, status ----------------------------------------------------------------

  function askForKey() {
    const form = $("key-form");
    if (form.hidden) {
      form.hidden = false;
      $("key-input").focus();
    }
    setConn("offline", "API key needed");
  }

  function saveKey(event) {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    clearError();
    connectEvents();
    refresh();
  }

  function forgetKey() {
    setApiKey("");
    $("key-input").value = "";
    connectEvents();
    refresh();
  }

  function setConn(kind, text) {
    const conn = $("conn");
    conn.className = `conn conn-${kind}`;
    conn.textContent = text;
    conn.dataset.mode = kind;
  }

  function showError(message) {
    const container = $("error-container");
    container.replaceChildren(el("div", "error", message));
  }

  function clearError() {
    $("error-container").replaceChildren();
  }

  let noticeTimer = null;
  function notice(message) {
    const box = $("notice");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => {
      box.hidden = true;
    }, 5000);
  }

  // --- the fleet (only when the server shares its state: /v1/cluster/* exist) ---------------

  async function refreshCluster() {
    let nodes;
    let files;
    try {
      nodes = await api("GET", "/v1/cluster/nodes");
      files = await api("GET", "/v1/cluster/downloads");
    } catch (error) {
      if (error.status === 404) {
        $("cluster").hidden = true; // a standalone server: stop asking
        return;
      }
      setTimeout(refreshCluster, CLUSTER_MS);
      return;
    }
    renderCluster(nodes.nodes || [], files.files || []);
    $("cluster").hidden = false;
    setTimeout(refreshCluster, CLUSTER_MS);
  }

  function renderCluster(nodes, files) {
    const nodeRows = [];
    for (const n of nodes) {
      const row = el("tr", `cluster-node node-${n.state}`);
      row.dataset.nodeId = String(n.node_id);
      const ago = `${Number(n.seconds_since_heartbeat).toFixed(1)} s ago`;
      row.append(el("td", "node-id", n.node_id), el("td", "node-state", n.state), el("td", "", ago));
      nodeRows.push(row);
    }
    $("cluster-nodes").replaceChildren(...nodeRows);
    const fileRows = [];
    for (const f of files) {
      const row = el("tr", "cluster-file");
      const copies = `${f.copies.available}/${f.copies.total} available, ${f.copies.failed} failed`;
      const fetch = f.fetch
        ? `${f.fetch.state}, ${f.fetch.holder || "nobody"} holds it: ` +
          `${formatBytes(f.fetch.done)} of ${formatBytes(f.fetch.size || f.size)}`
        : "";
      const perNode = f.nodes
        .map((c) => `${c.node_id}/${c.model_id}: ${c.status} ${formatBytes(c.downloaded_bytes)}`)
        .join("; ");
      row.append(
        el("td", "file-url", f.url),
        el("td", "file-copies", copies),
        el("td", "file-fetch", fetch),
        el("td", "file-nodes", perNode),
      );
      fileRows.push(row);
    }
    $("cluster-files").replaceChildren(...fileRows);
  }

  // --- formatting -----------------------------------------------------------------------------

  function clampPercent(value) {
    const n = Number(value);
    return Number.isFinite(n) ? Math.min(100, Math.max(0, n)) : 0;
  }

  function formatBytes(value) {
    let n = Number(value);
    if (!Number.isFinite(n) || n <= 0) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = 0;
    while (n >= 1024 && unit < units.length - 1) {
      n /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${n} B` : `${n.toFixed(1)} ${units[unit]}`;
  }

  function formatSpeed(bps) {
    return `${formatBytes(bps)}/s`;
  }

  function formatDuration(value) {
    const total = Math.max(0, Math.floor(Number(value) || 0));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = total % 60;
    if (h) return `${h}h ${m}m ${s}s`;
    return m ? `${m}m ${s}s` : `${s}s`;
  }

  // --- start ----------------------------------------------------------------------------------

  function start() {
    $("refresh-btn").addEventListener("click", () => refresh());
    $("key-btn").addEventListener("click", () => {
      const form = $("key-form");
      form.hidden = !form.hidden;
      if (!form.hidden) $("key-input").focus();
    });
    $("key-form").addEventListener("submit", saveKey);
    $("key-clear").addEventListener("click", forgetKey);
    $("create-form").addEventListener("submit", createDownload);
    $("cancel-all-btn").addEventListener("click", cancelAll);
    $("show-ended").addEventListener("change", (event) => {
      state.showEnded = event.target.checked;
      refresh();
    });
    render();
    connectEvents();
    refresh();
    refreshCluster();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
