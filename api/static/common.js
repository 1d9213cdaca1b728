// Shared helpers of the explorer pages: the same JSON API the clients use, with the API key from localStorage.
"use strict";
const Selfie = (() => {
  const KEY = "selfieApiKey";
  // A key can be handed over in the URL fragment (#key=...), which never reaches the server's logs.
  const m = location.hash.match(/key=([^&]+)/);
  if (m) { localStorage.setItem(KEY, decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname + location.search); }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = localStorage.getItem(KEY);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function api(path, opts) {
    opts = opts || {};
    const res = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers) }));
    if (res.status === 401) { askKey(); throw new Error("an API key is needed"); }
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(res.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
    }
    return res.json();
  }

  async function download(path, filename) {
    const res = await fetch(path, { headers: headers() });
    if (!res.ok) throw new Error("download failed: " + res.status);
    saveBlob(await res.blob(), filename);
  }

  function saveBlob(blob, filename) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = filename;
    document.body.appendChild(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  }

  function askKey() {
    const box = document.getElementById("keybox");
    if (box) box.style.display = "block";
  }

  function setupKeyBox() {
    const box = document.getElementById("keybox");
    if (!box) return;
    box.querySelector("button").onclick = () => {
      localStorage.setItem(KEY, box.querySelector("input").value.trim());
      location.reload();
    };
  }

  // Sequential color scale: white -> deep blue, t in [0, 1].
  function color(t) {
    t = Math.max(0, Math.min(1, t));
    const a = [255, 255, 255], b = [8, 48, 107], mid = [107, 174, 214];
    const [c0, c1, u] = t < 0.5 ? [a, mid, t / 0.5] : [mid, b, (t - 0.5) / 0.5];
    const c = c0.map((v, i) => Math.round(v + (c1[i] - v) * u));
    return "rgb(" + c.join(",") + ")";
  }
  function textColor(t) { return t > 0.55 ? "#fff" : "#1d2330"; }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e[k] = v; else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  }

  // A bar chart as inline SVG (no library): bars = [{key, value, title}].
  function barChart(bars, opts) {
    opts = opts || {};
    const pad = { l: 36, r: 8, t: 10, b: 28 }, H = opts.height || 180;
    // Bars at most 40 px wide, so a few layers do not make a wall of blue; many layers share the width.
    const W = Math.max(280, Math.min(opts.width || 720, pad.l + pad.r + 40 * Math.max(1, bars.length)));
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("role", "img");
    if (opts.id) svg.setAttribute("id", opts.id);
    const max = Math.max(1, ...bars.map(b => b.value));
    const n = Math.max(1, bars.length), bw = Math.min(40, (W - pad.l - pad.r) / n);
    const mk = (tag, at) => { const e = document.createElementNS(ns, tag); for (const k in at) e.setAttribute(k, at[k]); return e; };
    svg.append(mk("line", { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, stroke: "#999" }));
    for (const frac of [0.5, 1]) {
      const y = H - pad.b - frac * (H - pad.t - pad.b);
      svg.append(mk("line", { x1: pad.l, y1: y, x2: W - pad.r, y2: y, stroke: "#eee" }));
      const t = mk("text", { x: pad.l - 4, y: y + 4, "text-anchor": "end" }); t.textContent = tickLabel(max * frac); svg.append(t);
    }
    bars.forEach((b, i) => {
      const h = (b.value / max) * (H - pad.t - pad.b);
      const r = mk("rect", { x: pad.l + i * bw + 1, y: H - pad.b - h, width: Math.max(1, bw - 2), height: h,
                             fill: opts.fill || "#2453a6", class: "bar", "data-key": b.key, "data-value": b.value });
      const title = document.createElementNS(ns, "title"); title.textContent = b.title || (b.key + ": " + b.value);
      r.append(title); svg.append(r);
      if (n <= 40 || i % Math.ceil(n / 40) === 0) {
        const t = mk("text", { x: pad.l + i * bw + bw / 2, y: H - pad.b + 14, "text-anchor": "middle" }); t.textContent = b.key; svg.append(t);
      }
    });
    if (opts.xlabel) { const t = mk("text", { x: (W + pad.l) / 2, y: H - 2, "text-anchor": "middle" }); t.textContent = opts.xlabel; svg.append(t); }
    return svg;
  }

  // A line chart as inline SVG: series = [{name, color, points: [[x, y], ...]}] (a null y is a gap, e.g. a loss that
  // was not finite). opts.log: a log10 y axis (losses that fall by orders of magnitude); non-positive values are gaps.
  function lineChart(series, opts) {
    opts = opts || {};
    const pad = { l: 56, r: 12, t: 10, b: 32 }, W = opts.width || 640, H = opts.height || 220;
    const ns = "http://www.w3.org/2000/svg";
    const mk = (tag, at) => { const e = document.createElementNS(ns, tag); for (const k in at) e.setAttribute(k, at[k]); return e; };
    const svg = mk("svg", { width: W, height: H, role: "img" });
    if (opts.id) svg.setAttribute("id", opts.id);
    const ok = y => y != null && Number.isFinite(y) && (!opts.log || y > 0);
    const fy = y => opts.log ? Math.log10(y) : y;
    const pts = series.flatMap(s => s.points.filter(p => ok(p[1])));
    if (!pts.length) { const t = mk("text", { x: pad.l, y: H / 2 }); t.textContent = "no finite values to draw"; svg.append(t); return svg; }
    const xs = pts.map(p => p[0]), ys = pts.map(p => fy(p[1]));
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (opts.log) { y0 = Math.floor(y0); y1 = Math.ceil(y1); }
    if (opts.zero && !opts.log) y0 = Math.min(0, y0);
    if (y1 === y0) y1 = y0 + 1;
    if (x1 === x0) x1 = x0 + 1;
    const X = x => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
    const Y = y => H - pad.b - (fy(y) - y0) / (y1 - y0) * (H - pad.t - pad.b);
    svg.append(mk("line", { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, stroke: "#999" }));
    svg.append(mk("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b, stroke: "#999" }));
    // y gridlines: every power of ten on a log axis (at most 8), else 4 even steps
    const ticks = opts.log ? Array.from({ length: y1 - y0 + 1 }, (_, i) => y0 + i).filter((_, i, a) => a.length <= 8 || i % Math.ceil(a.length / 8) === 0)
                           : [0, 1, 2, 3, 4].map(i => y0 + i * (y1 - y0) / 4);
    for (const t of ticks) {
      const y = H - pad.b - (t - y0) / (y1 - y0) * (H - pad.t - pad.b);
      svg.append(mk("line", { x1: pad.l, y1: y, x2: W - pad.r, y2: y, stroke: "#eee", class: "gridline" }));
      const label = mk("text", { x: pad.l - 4, y: y + 4, "text-anchor": "end", class: "ytick" });
      label.textContent = opts.log ? "1e" + t : (Math.abs(t) >= 100 || Number.isInteger(t) ? String(Math.round(t)) : t.toPrecision(2));
      svg.append(label);
    }
    for (const x of [x0, Math.round((x0 + x1) / 2), x1]) {
      const t = mk("text", { x: X(x), y: H - pad.b + 14, "text-anchor": "middle" }); t.textContent = String(x); svg.append(t);
    }
    if (opts.xlabel) { const t = mk("text", { x: (W + pad.l) / 2, y: H - 2, "text-anchor": "middle" }); t.textContent = opts.xlabel; svg.append(t); }
    series.forEach((s, i) => {
      let d = "", pen = "M", n = 0;
      for (const [x, y] of s.points) {
        if (!ok(y)) { pen = "M"; continue; }
        d += `${pen}${X(x).toFixed(1)},${Y(y).toFixed(1)} `; pen = "L"; n++;
      }
      const path = mk("path", { d: d.trim(), fill: "none", stroke: s.color || "#2453a6", "stroke-width": 2, class: "series", "data-name": s.name, "data-points": n });
      const title = document.createElementNS(ns, "title"); title.textContent = s.name; path.append(title); svg.append(path);
      const key = mk("text", { x: W - pad.r - 4, y: pad.t + 12 + 14 * i, "text-anchor": "end", fill: s.color || "#2453a6" });
      key.textContent = s.name; key.style.fill = s.color || "#2453a6"; svg.append(key);
    });
    return svg;
  }

  // A gridline's value as it is: counts halve to x.5 (1.5 of 3), which rounding would misreport as 2.
  function tickLabel(v) { return Number.isInteger(v) ? String(v) : v.toFixed(1); }

  // A server-sent event stream read with fetch (EventSource cannot send the API key): onEvent(name, data) for each
  // event; resolves when the server closes the stream, rejects when it is refused or breaks.
  async function follow(path, onEvent) {
    const res = await fetch(path, { headers: headers({ Accept: "text/event-stream" }) });
    if (!res.ok || !res.body) throw new Error("event stream refused: " + res.status);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message", data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(name, data.join("\n"));  // comment lines (keep-alives) carry no data
      }
    }
  }

  function badge(state) { return el("span", { class: "badge " + state, text: state }); }
  function progress(frac) { const d = el("div", { class: "progress" }, el("div")); d.firstChild.style.width = Math.round(100 * frac) + "%"; return d; }
  function fmtTime(s) { return s ? new Date(s).toLocaleString() : ""; }

  return { api, download, saveBlob, color, textColor, el, barChart, lineChart, badge, progress, fmtTime, setupKeyBox, follow };
})();
