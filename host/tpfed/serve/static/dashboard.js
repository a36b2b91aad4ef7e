// tpfed serve dashboard: the server's state (/api/state), live over SSE (/api/events).
// Everything is built with DOM calls and textContent: names come from devices on the network.
"use strict";
const COLORS = ["#58a6ff", "#f2cc60", "#7ee787", "#ff7b72", "#d2a8ff", "#79c0ff", "#ffa657",
                "#56d4dd", "#e3b341", "#a5d6ff", "#ffdcd7", "#b4f0a8"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}
function si(n, unit) {
  if (n == null) return "–";
  const p = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [v, s] of p) if (Math.abs(n) >= v) return (n / v).toFixed(n / v >= 100 ? 0 : 2) + " " + s + unit;
  return (+n).toFixed(n % 1 ? 2 : 0) + " " + unit;
}
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function ms(x) { return x == null ? "–" : (x < 1 ? (x * 1000).toFixed(0) + " µs" : x.toFixed(2) + " ms"); }
function dur(s) { s = Math.floor(s); const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60;
  return (h ? h + " h " : "") + (h || m ? m + " min " : "") + (s % 60) + " s"; }
function bar(frac) {
  const f = Math.max(0, Math.min(1, frac || 0));
  const b = el("div", { class: "bar" }, el("i", { style: `width:${(f * 100).toFixed(1)}%` }),
               el("span", {}, (f * 100).toFixed(0) + " %"));
  return b;
}
function replaceBody(table, rows) { const tb = table.tBodies[0]; tb.replaceChildren(...rows); }

function renderPlan(model, colorOf) {
  const plan = model.plan, grid = $("plan");
  $("plan-info").textContent = `${plan.strategy}, ${plan.n_layers} layers, ${plan.n_kv_groups} KV groups, ` +
    `${plan.hidden_dim} MLP columns per layer; predicted ${ms(plan.makespan_ms)} per token`;
  $("legend").replaceChildren(...plan.devices.map((d) => el("span", { style: `--c:${colorOf(d.name)}` }, d.name)));
  const cells = [el("div", { class: "hdr" }, "layer"), el("div", { class: "hdr" }, "attention (KV groups)"),
                 el("div", { class: "hdr" }, "MLP (hidden columns)")];
  for (let layer = 0; layer < plan.n_layers; layer++) {
    const kv = new Array(plan.n_kv_groups).fill(null), mlp = [];
    for (const d of plan.devices) {
      const s = d.layers[String(layer)];
      if (!s) continue;
      for (const g of s.kv_groups) kv[g] = d.name;
      for (const [a, b] of s.mlp_ranges) mlp.push([a, b, d.name]);
    }
    mlp.sort((x, y) => x[0] - y[0]);
    const kvStrip = el("div", { class: "strip" }, ...kv.map((name, g) =>
      el("div", { style: `flex:1;background:${name ? colorOf(name) : "#333"}`, title: `group ${g}: ${name || "nobody"}` }, g)));
    const mlpStrip = el("div", { class: "strip" }, ...mlp.map(([a, b, name]) =>
      el("div", { style: `flex:${b - a};background:${colorOf(name)}`, title: `columns ${a}–${b}: ${name}` }, `${a}–${b}`)));
    cells.push(el("div", {}, layer), kvStrip, mlpStrip);
  }
  grid.replaceChildren(...cells);
  $("excluded").textContent = plan.excluded.length ?
    "left out: " + plan.excluded.map((e) => `${e.name} (${e.why})`).join("; ") : "";
}

function render(st) {
  const model = st.models.find((m) => m.name === st.default_model) || st.models[0];
  $("s-uptime").textContent = dur(st.uptime_s);
  $("s-lost").textContent = `${st.lost} / ${st.recovered}`;
  if (model) {
    $("model-name").textContent = model.name + (model.broken ? " (unavailable)" : "");
    $("s-tps").textContent = model.tokens_per_s.toFixed(1);
    $("s-tokens").textContent = st.models.reduce((a, m) => a + m.tokens, 0);
    $("s-requests").textContent = st.models.reduce((a, m) => a + m.requests, 0);
    $("s-waiting").textContent = st.models.reduce((a, m) => a + m.waiting, 0) + (model.busy ? " (busy)" : "");
    $("s-weights").textContent = bytes(st.models.reduce((a, m) => a + m.weight_bytes, 0));
    const names = model.devices.map((d) => d.name);
    const colorOf = (n) => COLORS[Math.max(0, names.indexOf(n)) % COLORS.length];
    replaceBody($("devices"), model.devices.map((d) => el("tr", { "data-device": d.name },
      el("td", {}, el("span", { style: `color:${colorOf(d.name)}` }, "■ "), d.name),
      el("td", {}, d.device_class), el("td", {}, d.uri || d.link),
      el("td", { class: "num" }, d.latency_us + " µs"), el("td", { class: "num" }, d.bandwidth_MBps + " MB/s"),
      el("td", { class: "num" }, si(d.int8_macs, "MAC/s")), el("td", { class: "num" }, bytes(d.arena_kb * 1024)),
      el("td", { class: "num" }, bytes(d.memory_bytes)),
      el("td", { class: "num" }, d.battery_pct == null ? "–" : d.battery_pct + " %"),
      el("td", { class: "num" }, d.temperature_c == null ? "–" : d.temperature_c.toFixed(1) + " °C"),
      el("td", { class: "num" }, d.kv_groups), el("td", { class: "num" }, d.mlp_columns),
      el("td", { class: "num" }, ms(d.attention_ms)), el("td", { class: "num" }, ms(d.mlp_ms)),
      el("td", {}, bar(d.utilisation)), el("td", { class: "num" }, `${d.lost} / ${d.recovered}`))));
    renderPlan(model, colorOf);
  }
  $("bus-url").textContent = st.bus.url || "(no --bus)";
  replaceBody($("bus-devices"), st.bus.devices.map((d) => el("tr", { "data-bus-device": d.id },
    el("td", {}, d.id), el("td", {}, d.uri || "–"), el("td", {}, d.device_class || "–"),
    el("td", { class: "num" }, si(d.int8_macs, "MAC/s")), el("td", { class: "num" }, bytes(d.memory_bytes)))));
  replaceBody($("bus-models"), Object.values(st.bus.models).map((m) => el("tr", {},
    el("td", {}, m.model), el("td", {}, m.state),
    el("td", {}, m.error || (m.total_s != null ? `ready in ${m.total_s} s (load ${m.load_s} s, ` +
      `connect+push ${m.setup_s} s, ${bytes(m.weight_bytes)} pushed)` : "")))));
  $("events").replaceChildren(...st.events.slice().reverse().map((e) =>
    el("li", { class: e.kind }, new Date(e.t * 1000).toLocaleTimeString() + "  " + e.text)));
  document.body.dataset.version = st.version;
}

function connect() {
  const src = new EventSource("/api/events");
  src.addEventListener("state", (ev) => {
    $("conn").textContent = "live"; $("conn").className = "pill live";
    render(JSON.parse(ev.data));
  });
  src.onerror = () => { $("conn").textContent = "reconnecting"; $("conn").className = "pill"; };
}
fetch("/api/state").then((r) => r.json()).then(render).catch(() => {});
connect();
