// The Monomyth dashboard: polls the control API once a second and updates
// the page in place. It needs no build step and loads nothing from another
// origin. Rows and boxes carry data-* attributes (data-worker-id,
// data-node-type, data-node-id, data-queue, data-field) so that tests and
// scripts can read the values.
"use strict";

const POLL_INTERVAL_MS = 1000;
// Polling slows down to this while the API does not respond.
const RETRY_INTERVAL_MS = 5000;
// The chart spans the samples taken so far, from 1 to 5 minutes.
const CHART_WINDOW_S = 300;
const MIN_CHART_WINDOW_S = 60;
// Each point of the chart averages the rate over this many seconds, because
// counters reach the master once per heartbeat, not once per poll.
const CHART_SMOOTHING_S = 3;
// Rates in the tables average over this many seconds of samples.
const RATE_WINDOW_S = 5;
const SERIES_COLORS = [
  "#2563eb", "#dc2626", "#059669", "#d97706",
  "#7c3aed", "#db2777", "#0891b2", "#4b5563",
];
const SVG_NAMESPACE = "http://www.w3.org/2000/svg";

// Each sample: {time_s, types: {TYPE: processed}, nodes: {ID: processed}}.
const samples = [];
let graph = null;
let graphKey = "";
const seriesColors = new Map();

function processedCount(entry, kind) {
  // A source pulls nothing: its progress is what it produces.
  return kind === "source" ? entry.items_out : entry.items_in;
}

function formatCount(value) {
  return Number(value || 0).toLocaleString("en-US");
}

function formatRate(value) {
  if (value === null) {
    return "–";
  }
  return value >= 100 ? formatCount(Math.round(value)) : value.toFixed(1);
}

function formatBytes(bytes) {
  if (!bytes) {
    return "–";
  }
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function formatPercent(done, total) {
  return `${Math.min(100, (100 * done) / total).toFixed(1)}%`;
}

async function fetchJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) {
    throw new Error(`${path} returned HTTP ${response.status}`);
  }
  return response.json();
}

// Sampling and rates.

function recordSample(status) {
  const now = performance.now() / 1000;
  const sample = { time_s: now, types: {}, nodes: {} };
  for (const [type, entry] of Object.entries(status.types)) {
    sample.types[type] = processedCount(entry, entry.kind);
  }
  for (const [id, entry] of Object.entries(status.nodes || {})) {
    const kind = (status.types[entry.node_type] || {}).kind;
    sample.nodes[id] = processedCount(entry, kind);
  }
  samples.push(sample);
  while (samples.length > 2 && now - samples[0].time_s > CHART_WINDOW_S + RATE_WINDOW_S) {
    samples.shift();
  }
}

// Return the rate per second of `key` in samples[group] over the last
// RATE_WINDOW_S seconds, or null with fewer than two samples.
function recentRate(group, key) {
  const last = samples[samples.length - 1];
  if (!last || samples.length < 2) {
    return null;
  }
  let first = samples[samples.length - 2];
  for (let i = samples.length - 2; i >= 0; i -= 1) {
    first = samples[i];
    if (last.time_s - samples[i].time_s >= RATE_WINDOW_S) {
      break;
    }
  }
  const elapsed = last.time_s - first.time_s;
  const before = first[group][key];
  const after = last[group][key];
  if (!elapsed || before === undefined || after === undefined) {
    return null;
  }
  return Math.max(0, (after - before) / elapsed);
}

// Tables: one row per key, reused across updates.

function updateTable(tableId, entries, fields, keyAttribute) {
  const body = document.querySelector(`#${tableId} tbody`);
  const seen = new Set();
  for (const [key, values] of entries) {
    seen.add(key);
    let row = body.querySelector(`tr[${keyAttribute}="${CSS.escape(key)}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.setAttribute(keyAttribute, key);
      for (const field of fields) {
        const cell = document.createElement("td");
        cell.dataset.field = field.name;
        if (field.number) {
          cell.className = "number";
        }
        row.appendChild(cell);
      }
      body.appendChild(row);
    }
    for (const field of fields) {
      const cell = row.querySelector(`td[data-field="${field.name}"]`);
      field.render(cell, values);
    }
  }
  for (const row of Array.from(body.rows)) {
    if (!seen.has(row.getAttribute(keyAttribute))) {
      row.remove();
    }
  }
  const empty = document.querySelector(`[data-empty-for="${tableId}"]`);
  if (empty) {
    empty.hidden = entries.length > 0;
  }
}

function text(render) {
  return (cell, values) => {
    cell.textContent = render(values);
  };
}

function stateBadge(render) {
  return (cell, values) => {
    const state = render(values);
    if (cell.dataset.state !== state) {
      cell.dataset.state = state;
      cell.textContent = "";
      const badge = document.createElement("span");
      badge.className = `badge state-${state}`;
      badge.textContent = state;
      cell.appendChild(badge);
    }
  };
}

function progressBar(cell, entry) {
  if (!entry.progress_total) {
    cell.textContent = "–";
    delete cell.dataset.percent;
    return;
  }
  let bar = cell.querySelector(".bar");
  if (!bar) {
    cell.textContent = "";
    bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    bar.appendChild(fill);
    const label = document.createElement("span");
    label.className = "bar-label";
    cell.append(bar, label);
  }
  const percent = formatPercent(entry.progress_done, entry.progress_total);
  cell.dataset.percent = percent;
  bar.firstChild.style.width = percent;
  cell.querySelector(".bar-label").textContent = percent;
}

function inputDepth(entry, depths) {
  if (!depths) {
    return "–";
  }
  let total = 0;
  for (const queue of entry.input_queues) {
    total += depths[queue] || 0;
  }
  return entry.input_queues.length ? formatCount(total) : "–";
}

function renderWorkers(workers) {
  const entries = Object.entries(workers).sort().map(([id, entry]) => [id, { id, ...entry }]);
  updateTable("workers", entries, [
    { name: "worker", render: text((w) => w.id) },
    { name: "hostname", render: text((w) => w.hostname) },
    { name: "pid", number: true, render: text((w) => w.pid) },
    { name: "state", render: stateBadge((w) => w.state) },
    {
      name: "last-heartbeat", number: true,
      render: text((w) => `${w.last_seen_s_ago.toFixed(1)} s ago`),
    },
    { name: "cpu", number: true, render: text((w) => `${w.cpu_percent.toFixed(0)}%`) },
    { name: "memory", number: true, render: text((w) => formatBytes(w.process_memory_bytes)) },
    {
      name: "nodes", number: true,
      render: text((w) => Object.values(w.nodes).reduce((n, ids) => n + ids.length, 0)),
    },
  ], "data-worker-id");
}

function renderTypes(types, depths) {
  const entries = Object.entries(types);
  updateTable("node-types", entries.map(([type, entry]) => [type, { type, ...entry }]), [
    { name: "node-type", render: text((e) => e.type) },
    { name: "kind", render: text((e) => e.kind) },
    { name: "state", render: stateBadge((e) => e.state) },
    { name: "processes", number: true, render: text((e) => `${e.running}/${e.processes}`) },
    { name: "restarts", number: true, render: text((e) => formatCount(e.restarts)) },
    { name: "items-in", number: true, render: text((e) => formatCount(e.items_in)) },
    { name: "items-out", number: true, render: text((e) => formatCount(e.items_out)) },
    { name: "rate", number: true, render: text((e) => formatRate(recentRate("types", e.type))) },
    { name: "failures", number: true, render: text((e) => formatCount(e.failures)) },
    { name: "retries", number: true, render: text((e) => formatCount(e.retries)) },
    { name: "queue", number: true, render: text((e) => inputDepth(e, depths)) },
    { name: "progress", render: progressBar },
  ], "data-node-type");
}

function renderNodes(nodes) {
  const entries = Object.entries(nodes).map(([id, entry]) => [id, { id, ...entry }]);
  updateTable("nodes", entries, [
    { name: "node", render: text((e) => e.id) },
    { name: "worker", render: text((e) => e.worker_id || "–") },
    { name: "state", render: stateBadge((e) => e.state) },
    { name: "pid", number: true, render: text((e) => e.pid || "–") },
    { name: "restarts", number: true, render: text((e) => formatCount(e.restarts)) },
    { name: "items-in", number: true, render: text((e) => formatCount(e.items_in)) },
    { name: "items-out", number: true, render: text((e) => formatCount(e.items_out)) },
    { name: "rate", number: true, render: text((e) => formatRate(recentRate("nodes", e.id))) },
    { name: "failures", number: true, render: text((e) => formatCount(e.failures)) },
    { name: "cpu", number: true, render: text((e) => `${e.cpu_percent.toFixed(0)}%`) },
    { name: "memory", number: true, render: text((e) => formatBytes(e.memory_bytes)) },
  ], "data-node-id");
}

function renderQueues(depths) {
  const entries = depths ? Object.entries(depths).map(([queue, depth]) => [queue, { queue, depth }]) : [];
  updateTable("queues", entries, [
    { name: "queue", render: text((e) => e.queue) },
    { name: "kind", render: text((e) => (e.queue.endsWith("-fail") ? "fail" : "edge")) },
    { name: "depth", number: true, render: text((e) => formatCount(e.depth)) },
  ], "data-queue");
}

function renderPipelines(pipelines, types) {
  const list = document.getElementById("pipelines");
  list.textContent = "";
  for (const [name, pipeline] of Object.entries(pipelines)) {
    const item = document.createElement("li");
    item.dataset.pipeline = name;
    item.dataset.done = String(pipeline.done);
    const state = pipeline.done ? "done" : "running";
    const badge = document.createElement("span");
    badge.className = `badge state-${state}`;
    badge.textContent = state;
    const label = document.createElement("strong");
    label.textContent = name;
    item.append(label, " ", badge);
    let done = 0;
    let total = 0;
    for (const type of pipeline.node_types) {
      done += (types[type] || {}).progress_done || 0;
      total += (types[type] || {}).progress_total || 0;
    }
    if (total) {
      const progress = document.createElement("span");
      progress.className = "pipeline-progress";
      progress.dataset.field = "progress";
      progress.textContent = `read ${formatPercent(done, total)}`;
      item.append(" ", progress);
    }
    list.appendChild(item);
  }
}

// The pipeline graph: node boxes in columns, an edge label per queue.

const BOX_WIDTH = 200;
const BOX_HEIGHT = 58;
const COLUMN_GAP = 110;
const ROW_GAP = 26;
const MARGIN = 12;

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG_NAMESPACE, name);
  for (const [key, value] of Object.entries(attributes || {})) {
    element.setAttribute(key, value);
  }
  return element;
}

function buildGraph(graphReply) {
  const container = document.getElementById("graph");
  container.textContent = "";
  if (Object.keys(graphReply.pipelines).length === 0) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "No pipeline is loaded.";
    container.appendChild(empty);
  }
  for (const [name, pipeline] of Object.entries(graphReply.pipelines)) {
    const positions = new Map();
    const rows = new Map();
    for (const node of pipeline.nodes) {
      const row = rows.get(node.column) || 0;
      rows.set(node.column, row + 1);
      positions.set(node.node_type, {
        x: MARGIN + node.column * (BOX_WIDTH + COLUMN_GAP),
        y: MARGIN + row * (BOX_HEIGHT + ROW_GAP),
      });
    }
    const columns = Math.max(1, ...Array.from(rows.keys(), (c) => c + 1));
    const height = Math.max(1, ...rows.values()) * (BOX_HEIGHT + ROW_GAP) - ROW_GAP;
    const width = columns * (BOX_WIDTH + COLUMN_GAP) - COLUMN_GAP;
    const svg = svgElement("svg", {
      width: width + 2 * MARGIN,
      height: height + 2 * MARGIN,
      role: "img",
      "aria-label": `graph of pipeline ${name}`,
    });
    svg.dataset.pipeline = name;

    for (const edge of pipeline.edges) {
      const from = positions.get(edge.from);
      const to = positions.get(edge.to);
      const x1 = from.x + BOX_WIDTH;
      const y1 = from.y + BOX_HEIGHT / 2;
      const x2 = to.x;
      const y2 = to.y + BOX_HEIGHT / 2;
      const middle = (x1 + x2) / 2;
      const group = svgElement("g", { class: "edge" });
      group.dataset.queue = edge.queue;
      group.appendChild(svgElement("path", {
        d: `M ${x1} ${y1} C ${middle} ${y1}, ${middle} ${y2}, ${x2 - 6} ${y2}`,
      }));
      group.appendChild(svgElement("path", {
        class: "arrow",
        d: `M ${x2 - 8} ${y2 - 5} L ${x2} ${y2} L ${x2 - 8} ${y2 + 5} Z`,
      }));
      const label = svgElement("text", {
        x: middle, y: (y1 + y2) / 2 - 6, "text-anchor": "middle", class: "edge-depth",
      });
      label.dataset.field = "depth";
      label.textContent = "–";
      group.appendChild(label);
      svg.appendChild(group);
    }

    for (const node of pipeline.nodes) {
      const { x, y } = positions.get(node.node_type);
      const group = svgElement("g", { class: "node", transform: `translate(${x} ${y})` });
      group.dataset.nodeType = node.node_type;
      group.appendChild(svgElement("rect", { width: BOX_WIDTH, height: BOX_HEIGHT, rx: 6 }));
      const title = svgElement("text", { x: 10, y: 19, class: "node-name" });
      title.textContent = node.node;
      const state = svgElement("text", { x: 10, y: 35, class: "node-state" });
      state.dataset.field = "state";
      const counts = svgElement("text", { x: 10, y: 50, class: "node-counts" });
      counts.dataset.field = "counts";
      group.append(title, state, counts);
      svg.appendChild(group);
    }
    const heading = document.createElement("h3");
    heading.textContent = name;
    container.append(heading, svg);
  }
}

function updateGraph(types, depths) {
  for (const group of document.querySelectorAll("#graph g.node")) {
    const entry = types[group.dataset.nodeType];
    if (!entry) {
      continue;
    }
    group.dataset.state = entry.state;
    group.querySelector('[data-field="state"]').textContent = `${entry.kind} · ${entry.state}`;
    const counts = entry.kind === "source"
      ? `out ${formatCount(entry.items_out)}`
      : `in ${formatCount(entry.items_in)} · out ${formatCount(entry.items_out)}`;
    const failed = entry.failures ? ` · failed ${formatCount(entry.failures)}` : "";
    group.querySelector('[data-field="counts"]').textContent = counts + failed;
  }
  for (const group of document.querySelectorAll("#graph g.edge")) {
    const depth = depths ? depths[group.dataset.queue] : undefined;
    const label = group.querySelector('[data-field="depth"]');
    label.textContent = depth === undefined ? "–" : formatCount(depth);
    group.dataset.depth = depth === undefined ? "" : String(depth);
  }
}

// The throughput chart, drawn on a canvas.

function colorOf(type) {
  if (!seriesColors.has(type)) {
    seriesColors.set(type, SERIES_COLORS[seriesColors.size % SERIES_COLORS.length]);
  }
  return seriesColors.get(type);
}

function niceMaximum(value) {
  if (value <= 0) {
    return 1;
  }
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * power >= value) {
      return step * power;
    }
  }
  return 10 * power;
}

function formatAge(seconds) {
  if (seconds === 0) {
    return "now";
  }
  if (seconds < 60) {
    return `-${seconds} s`;
  }
  const minutes = seconds / 60;
  return `-${Number.isInteger(minutes) ? minutes : minutes.toFixed(1)} min`;
}

function drawChart(types) {
  const canvas = document.getElementById("throughput-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);

  const left = 56;
  const right = 12;
  const top = 10;
  const bottom = 24;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const now = samples.length ? samples[samples.length - 1].time_s : 0;
  const history = samples.length ? now - samples[0].time_s : 0;
  const span = Math.min(CHART_WINDOW_S, Math.max(MIN_CHART_WINDOW_S, history));

  // One point per sample: the rate since the sample CHART_SMOOTHING_S earlier.
  const series = new Map();
  let maximum = 0;
  for (const type of Object.keys(types)) {
    const points = [];
    let start = 0;
    for (let i = 1; i < samples.length; i += 1) {
      while (start < i - 1 && samples[i].time_s - samples[start + 1].time_s >= CHART_SMOOTHING_S) {
        start += 1;
      }
      const age = now - samples[i].time_s;
      const elapsed = samples[i].time_s - samples[start].time_s;
      const before = samples[start].types[type];
      const after = samples[i].types[type];
      if (age > span || !elapsed || before === undefined || after === undefined) {
        continue;
      }
      const rate = Math.max(0, (after - before) / elapsed);
      maximum = Math.max(maximum, rate);
      points.push([age, rate]);
    }
    series.set(type, points);
  }
  const topValue = niceMaximum(maximum);

  context.font = "12px system-ui, sans-serif";
  context.lineWidth = 1;
  context.strokeStyle = "#e5e7eb";
  context.fillStyle = "#4b5563";
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (let i = 0; i <= 4; i += 1) {
    const y = top + plotHeight - (i / 4) * plotHeight;
    context.beginPath();
    context.moveTo(left, y);
    context.lineTo(left + plotWidth, y);
    context.stroke();
    context.fillText(formatRate((i / 4) * topValue), left - 6, y);
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  const step = [10, 15, 30, 60].find((seconds) => span / seconds <= 6) || 60;
  for (let age = 0; age <= span; age += step) {
    const x = left + plotWidth - (age / span) * plotWidth;
    context.fillText(formatAge(age), x, top + plotHeight + 6);
  }

  context.lineWidth = 2;
  for (const [type, points] of series) {
    if (points.length < 1) {
      continue;
    }
    context.strokeStyle = colorOf(type);
    context.beginPath();
    points.forEach(([age, rate], index) => {
      const x = left + plotWidth - (age / span) * plotWidth;
      const y = top + plotHeight - (rate / topValue) * plotHeight;
      if (index === 0) {
        context.moveTo(x, y);
      } else {
        context.lineTo(x, y);
      }
    });
    context.stroke();
  }
  updateLegend(types);
}

function updateLegend(types) {
  const legend = document.getElementById("throughput-legend");
  const key = Object.keys(types).join("\n");
  if (legend.dataset.key === key) {
    return;
  }
  legend.dataset.key = key;
  legend.textContent = "";
  for (const type of Object.keys(types)) {
    const item = document.createElement("li");
    item.dataset.nodeType = type;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = colorOf(type);
    item.append(swatch, type);
    legend.appendChild(item);
  }
}

// The poll loop.

function setConnection(state, message) {
  const element = document.getElementById("connection");
  element.dataset.state = state;
  element.textContent = message;
}

async function poll() {
  let status;
  try {
    status = await fetchJson("/status");
  } catch (error) {
    setConnection("down", `control API not reachable: ${error.message}`);
    return RETRY_INTERVAL_MS;
  }
  // Queue depths need the data stream, which may be down while the master is up.
  let depths = null;
  try {
    depths = (await fetchJson("/queues")).queues;
  } catch (error) {
    depths = null;
  }
  const key = Object.keys(status.pipelines).sort().join("\n");
  if (graph === null || key !== graphKey) {
    try {
      graph = await fetchJson("/graph");
      graphKey = key;
      buildGraph(graph);
    } catch (error) {
      graph = null;
    }
  }

  recordSample(status);
  renderPipelines(status.pipelines, status.types);
  updateGraph(status.types, depths);
  renderWorkers(status.workers);
  renderTypes(status.types, depths);
  renderNodes(status.nodes || {});
  renderQueues(depths);
  drawChart(status.types);
  setConnection("live", "live");
  document.getElementById("updated").textContent =
    `updated ${new Date().toLocaleTimeString("en-GB")}`;
  return POLL_INTERVAL_MS;
}

async function loop() {
  let delay = POLL_INTERVAL_MS;
  try {
    delay = await poll();
  } catch (error) {
    setConnection("down", `dashboard error: ${error.message}`);
    console.error(error);
  }
  window.setTimeout(loop, delay);
}

loop();
