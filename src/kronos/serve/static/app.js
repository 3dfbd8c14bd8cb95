// Kronos page: forecast view (symbol or file -> candlesticks, mean, bands, volume, P(up)) and run view.
"use strict";
const LWC = window.LightweightCharts;
// What is drawn, for people and for the browser test: series name -> number of points.
window.kronosView = { drawn: {}, result: null, run: null };

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const toTime = (iso) => Math.floor(Date.parse(iso.endsWith("Z") ? iso : iso + "Z") / 1000);

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function setStatus(el, text, isError) {
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

function newChart(el, extra) {
  el.innerHTML = "";
  return LWC.createChart(el, Object.assign({
    autoSize: true,
    layout: { background: { color: "#ffffff" }, textColor: "#333" },
    grid: { vertLines: { color: "#f0f0f0" }, horzLines: { color: "#f0f0f0" } },
    timeScale: { timeVisible: true, secondsVisible: false },
  }, extra || {}));
}

// ---------------------------------------------------------------- forecast view
function drawForecast(res) {
  const drawn = {};
  const chart = newChart($("price-chart"));
  const candles = chart.addCandlestickSeries();
  candles.priceScale().applyOptions({ scaleMargins: { top: 0.05, bottom: 0.28 } });
  const h = res.history;
  const hist = h.timestamps.map((t, i) => ({ time: toTime(t), open: h.open[i], high: h.high[i], low: h.low[i],
                                             close: h.close[i] }));
  candles.setData(hist);
  drawn.candles = hist.length;

  const volume = chart.addHistogramSeries({ priceScaleId: "vol", priceFormat: { type: "volume" } });
  chart.priceScale("vol").applyOptions({ scaleMargins: { top: 0.78, bottom: 0 } });
  const vol = h.timestamps.map((t, i) => ({ time: toTime(t), value: h.volume[i], color: "#b0bec5" }));
  res.timestamps.forEach((t, i) => vol.push({ time: toTime(t), value: res.mean.volume[i] || 0, color: "#90caf9" }));
  volume.setData(vol);
  drawn.volume = vol.length;

  const anchor = { time: toTime(res.last_timestamp), value: res.last_close };
  const line = (values, options) => {
    const s = chart.addLineSeries(Object.assign({ lineWidth: 2, priceLineVisible: false, lastValueVisible: false },
                                                options));
    const data = [anchor].concat(res.timestamps.map((t, i) => ({ time: toTime(t), value: values[i] })));
    s.setData(data.filter((p) => p.value !== null));
    return data.length - 1;
  };
  drawn.mean = line(res.mean.close, { color: "#1565c0", title: "mean" });
  const qs = Object.keys(res.quantiles).map(Number).sort((a, b) => a - b);
  if (qs.length >= 2) {
    const lo = String(qs[0]), hi = String(qs[qs.length - 1]);
    const style = { color: "#ef6c00", lineStyle: LWC.LineStyle.Dashed, lineWidth: 1 };
    drawn.band_low = line(res.quantiles[lo].close, Object.assign({ title: `q${lo}` }, style));
    drawn.band_high = line(res.quantiles[hi].close, Object.assign({ title: `q${hi}` }, style));
  }
  // the last bars of the history and the whole forecast (scroll or zoom for more)
  chart.timeScale().setVisibleLogicalRange({ from: Math.max(0, hist.length - 120), to: hist.length + res.timestamps.length + 2 });

  const pchart = newChart($("pup-chart"), { rightPriceScale: { scaleMargins: { top: 0.1, bottom: 0 } } });
  const pup = pchart.addHistogramSeries({ priceFormat: { type: "percent" }, base: 0 });
  const pdata = res.timestamps.map((t, i) => ({ time: toTime(t), value: 100 * res.p_up[i],
                                                color: res.p_up[i] >= 0.5 ? "#26a69a" : "#ef5350" }));
  pup.setData(pdata);
  pup.createPriceLine({ price: 50, color: "#999", lineStyle: LWC.LineStyle.Dotted, lineWidth: 1, title: "50%" });
  pchart.timeScale().fitContent();
  drawn.p_up = pdata.length;

  window.kronosView.drawn = drawn;
  window.kronosView.result = res;
  const band = qs.length >= 2 ? `, band q${qs[0]}..q${qs[qs.length - 1]}${res.calibrated ? " (calibrated)" : ""}` : "";
  $("legend").textContent = `model ${res.model}: ${res.timestamps.length} steps${band}; ` +
    `waited ${res.queue_wait_ms} ms in the queue, computed in ${res.compute_ms} ms with ${res.batch_size} series`;
  document.body.dataset.forecast = "ready";
}

async function runForecast(ev) {
  if (ev) ev.preventDefault();
  const status = $("status");
  const file = $("file").files[0];
  const symbol = $("symbol").value;
  const horizon = $("horizon").value, samples = $("samples").value, seed = $("seed").value;
  document.body.dataset.forecast = "running";
  setStatus(status, "Forecasting...");
  try {
    let res;
    if (file) {
      const form = new FormData();
      form.append("file", file);
      form.append("horizon", horizon);
      form.append("samples", samples);
      form.append("history", "300");
      if (seed !== "") form.append("seed", seed);
      res = await api("forecast", { method: "POST", body: form });
    } else if (symbol) {
      const q = new URLSearchParams({ horizon, samples, history: "300" });
      if (seed !== "") q.set("seed", seed);
      res = await api(`symbols/${encodeURIComponent(symbol)}/forecast?${q}`);
    } else {
      throw new Error("pick a symbol or drop a CSV / Parquet file first");
    }
    drawForecast(res);
    setStatus(status, `Forecast of ${file ? file.name : symbol}: ${res.timestamps.length} bars after ` +
      `${res.last_timestamp}`);
  } catch (e) {
    document.body.dataset.forecast = "error";
    setStatus(status, e.message, true);
  }
}

function setupDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((n) => drop.addEventListener(n, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((n) => drop.addEventListener(n, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => {
    if (e.dataTransfer.files.length) { $("file").files = e.dataTransfer.files; runForecast(); }
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) runForecast(); });
  $("symbol").addEventListener("change", () => { $("file").value = ""; if ($("symbol").value) runForecast(); });
  $("controls").addEventListener("submit", runForecast);
}

// ---------------------------------------------------------------- run view
const COLORS = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#c62828", "#00838f", "#5d4037", "#455a64"];

async function showRun() {
  const status = $("run-status");
  try {
    const run = await api("run");
    window.kronosView.run = run;
    setStatus(status, `Run ${run.run}`);
    const curves = newChart($("curves-chart"), {
      timeScale: { tickMarkFormatter: (t) => String(t) },
      localization: { timeFormatter: (t) => `step ${t}` },
    });
    let c = 0;
    for (const [stage, series] of Object.entries(run.curves)) {
      for (const [name, points] of Object.entries(series)) {
        const s = curves.addLineSeries({ color: COLORS[c++ % COLORS.length], lineWidth: 2, title: `${stage} ${name}` });
        const seen = new Set();
        s.setData(points.filter(([t]) => !seen.has(t) && seen.add(t)).map(([t, v]) => ({ time: t, value: v })));
      }
    }
    curves.timeScale().fitContent();
    const ev = run.evaluation;
    if (ev && Object.keys(ev.rows).length) {
      const metrics = [...new Set(Object.values(ev.rows).flatMap((r) => Object.keys(r)))];
      const fmt = (v) => (v === null || v === undefined ? "" : Number(v).toPrecision(4));
      $("eval-table").innerHTML = `<table><tr><th>forecast</th>${metrics.map((m) => `<th>${esc(m)}</th>`).join("")}</tr>` +
        Object.entries(ev.rows).map(([name, r]) =>
          `<tr><td>${esc(name)}</td>${metrics.map((m) => `<td>${fmt(r[m])}</td>`).join("")}</tr>`).join("") + "</table>";
    } else {
      $("eval-table").textContent = "No evaluation in this run yet.";
    }
    const bt = newChart($("backtest-chart"));
    c = 0;
    for (const [name, series] of Object.entries(run.backtest)) {
      const points = series.excess_return_with_cost || series.excess_return_without_cost || [];
      const s = bt.addLineSeries({ color: COLORS[c++ % COLORS.length], lineWidth: 2, title: name });
      s.setData(points.filter(([, v]) => v !== null).map(([t, v]) => ({ time: t, value: v })));
    }
    bt.timeScale().fitContent();
  } catch (e) {
    setStatus(status, e.message, true);
  }
}

function setupTabs() {
  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".view").forEach((v) => v.classList.toggle("hidden", v.id !== `view-${tab.dataset.view}`));
    if (tab.dataset.view === "run") showRun();
  }));
}

async function init() {
  setupTabs();
  setupDrop();
  try {
    const info = await api("models");
    const m = info.models[0];
    const cov = m.calibration ? `, calibrated bands (${m.calibration.file})` : "";
    $("model-info").textContent = `${m.name}: ${m.parameters.toLocaleString()} parameters, context ${m.max_context}${cov}`;
    $("horizon").max = info.limits.max_horizon;
    $("samples").max = info.limits.max_samples;
    if (!info.run) $("tab-run").classList.add("hidden");
    if (info.dataset) {
      const syms = await api("symbols");
      $("symbol").innerHTML = '<option value="">(pick a symbol)</option>' +
        syms.symbols.map((s) => `<option value="${esc(s.symbol)}">${esc(s.symbol)} (${s.bars} bars)</option>`).join("");
    }
  } catch (e) {
    setStatus($("status"), e.message, true);
  }
  document.body.dataset.ready = "1";
}

init();
