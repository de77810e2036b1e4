// Hand-made SVG charts: a line chart with one or two y axes, and a heat map.

const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    // Through the CSSOM: the console's Content-Security-Policy refuses inline style attributes.
    if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v);
  }
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Round tick values covering [lo, hi]. */
function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function extent(values, pad = 0.05) {
  const v = values.filter((x) => Number.isFinite(x));
  if (!v.length) return [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  if (lo === hi) { lo -= 1; hi += 1; }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

function label(n) {
  return Math.abs(n) >= 1000 ? n.toExponential(0) : String(+n.toFixed(2));
}

/**
 * A line chart. series: [{name, color, points: [[x, y]], axis: "left"|"right", dashed}];
 * opts: {title, xLabel, yLabel, y2Label, yRange, y2Range, marks: [{x, label}], height, desc}.
 */
export function lineChart(series, opts = {}) {
  // Narrow screens get a narrower drawing, so its text stays legible when scaled to fit.
  const narrow = window.innerWidth < 700;
  const W = narrow ? 420 : opts.width || 640, H = opts.height || 300, m = { l: 54, r: series.some((x) => x.axis === "right") ? 54 : 16, t: 28, b: 42 };
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": opts.desc || opts.title || "chart" });
  svg.append(s("title", {}, opts.desc || opts.title || "chart"));
  const xs = series.flatMap((x) => x.points.map((p) => p[0]));
  const [x0, x1] = opts.xRange || extent(xs, 0.02);
  const left = series.filter((x) => x.axis !== "right"), right = series.filter((x) => x.axis === "right");
  const [y0, y1] = opts.yRange || extent(left.flatMap((x) => x.points.map((p) => p[1])));
  const [r0, r1] = opts.y2Range || extent(right.flatMap((x) => x.points.map((p) => p[1])));
  const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v, a, b) => H - m.b - ((v - a) / (b - a)) * (H - m.t - m.b);
  if (opts.title) svg.append(s("text", { x: m.l, y: 16, class: "title" }, opts.title));
  for (const t of ticks(y0, y1)) {
    if (t < y0 || t > y1) continue;
    svg.append(s("line", { x1: m.l, x2: W - m.r, y1: Y(t, y0, y1), y2: Y(t, y0, y1), class: "gridline" }));
    svg.append(s("text", { x: m.l - 6, y: Y(t, y0, y1) + 4, "text-anchor": "end" }, label(t)));
  }
  if (right.length) {
    for (const t of ticks(r0, r1)) {
      if (t < r0 || t > r1) continue;
      svg.append(s("text", { x: W - m.r + 6, y: Y(t, r0, r1) + 4, fill: right[0].color, style: `fill:${right[0].color}` }, label(t)));
    }
  }
  for (const t of ticks(x0, x1, opts.xTicks || 8)) {
    if (t < x0 || t > x1) continue;
    svg.append(s("line", { x1: X(t), x2: X(t), y1: H - m.b, y2: H - m.b + 4, class: "axis" }));
    svg.append(s("text", { x: X(t), y: H - m.b + 16, "text-anchor": "middle" }, opts.xFormat ? opts.xFormat(t) : label(t)));
  }
  svg.append(s("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
  svg.append(s("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }));
  if (opts.xLabel) svg.append(s("text", { x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel));
  if (opts.yLabel) {
    svg.append(s("text", { x: 12, y: (m.t + H - m.b) / 2, transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})`, "text-anchor": "middle",
      style: left.length === 1 ? `fill:${left[0].color}` : undefined }, opts.yLabel));
  }
  if (opts.y2Label) {
    const x = W - 10, y = (m.t + H - m.b) / 2;
    svg.append(s("text", { x, y, transform: `rotate(90 ${x} ${y})`, "text-anchor": "middle", style: `fill:${right[0]?.color}` }, opts.y2Label));
  }
  for (const mark of opts.marks || []) {
    if (mark.y !== undefined) {
      const y = Y(mark.y, y0, y1);
      if (y < m.t || y > H - m.b) continue;
      svg.append(s("line", { x1: m.l, x2: W - m.r, y1: y, y2: y, stroke: mark.color || "#9ca3af", "stroke-dasharray": "4 4" }));
      svg.append(s("text", { x: W - m.r - 4, y: y - 4, "text-anchor": "end" }, mark.label || ""));
    } else {
      const x = X(mark.x);
      svg.append(s("line", { x1: x, x2: x, y1: m.t, y2: H - m.b, stroke: mark.color || "#9ca3af", "stroke-dasharray": "4 4" }));
      svg.append(s("text", { x: x + 4, y: m.t + 10 }, mark.label || ""));
    }
  }
  for (const ser of series) {
    const [a, b] = ser.axis === "right" ? [r0, r1] : [y0, y1];
    const pts = ser.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) continue;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1], a, b).toFixed(1)}`).join("");
    if (!ser.dotsOnly) {
      svg.append(s("path", { d, fill: "none", stroke: ser.color, "stroke-width": 2, "stroke-dasharray": ser.dashed ? "5 4" : null }));
    }
    if (pts.length <= 40 || ser.dotsOnly) {
      for (const p of pts) {
        const c = s("circle", { cx: X(p[0]), cy: Y(p[1], a, b), r: ser.dotsOnly ? 3 : 3.2, fill: p[2] || ser.color });
        c.append(s("title", {}, `${ser.name}: ${label(p[1])} at ${opts.xFormat ? opts.xFormat(p[0]) : label(p[0])}`));
        svg.append(c);
      }
    }
  }
  // Legend.
  let lx = m.l + (opts.title ? Math.min(320, opts.title.length * 7 + 20) : 0);
  for (const ser of series) {
    if (!ser.name) continue;
    svg.append(s("rect", { x: lx, y: 8, width: 12, height: 4, fill: ser.color }));
    svg.append(s("text", { x: lx + 16, y: 14 }, ser.name));
    lx += 24 + ser.name.length * 6.5;
  }
  return svg;
}

/**
 * A heat map. rows/cols: labels; value(r, c) → number|null; color(v) → css colour;
 * cross(r, c) → true to mark a cell (e.g. incoherent); opts: {title, rowLabel, colLabel, desc, fmt}.
 */
export function heatMap(rows, cols, value, color, opts = {}) {
  const cell = Math.max(30, Math.min(58, Math.floor(560 / Math.max(1, cols.length))));
  const ch = 28;
  const m = { l: 62, t: 44, b: 40 };
  // Wide enough for the title; never drawn larger than its natural size.
  const W = Math.max(m.l + cols.length * cell + 10, 8 + 6.6 * (opts.title || "").length), H = m.t + rows.length * ch + m.b;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": opts.desc || opts.title || "heat map",
    style: `max-width:${Math.round(W * 1.15)}px` });
  svg.append(s("title", {}, opts.desc || opts.title || "heat map"));
  if (opts.title) svg.append(s("text", { x: 4, y: 16, class: "title" }, opts.title));
  rows.forEach((r, i) => {
    svg.append(s("text", { x: m.l - 8, y: m.t + i * ch + ch / 2 + 4, "text-anchor": "end" }, r));
    cols.forEach((c, j) => {
      const v = value(i, j);
      const x = m.l + j * cell, y = m.t + i * ch;
      const rect = s("rect", { x, y, width: cell - 2, height: ch - 2, rx: 3, fill: v === null ? "#f1f3f7" : color(v) });
      rect.append(s("title", {}, v === null ? `${opts.rowLabel} ${r}, ${opts.colLabel} ${c}: not evaluated`
        : `${opts.rowLabel} ${r}, ${opts.colLabel} ${c}: ${(opts.fmt || label)(v)}${opts.cross?.(i, j) ? " (incoherent)" : ""}`));
      svg.append(rect);
      if (v !== null) {
        svg.append(s("text", { x: x + cell / 2 - 1, y: y + ch / 2 + 4, "text-anchor": "middle", style: "fill:#111;font-size:10px" }, (opts.fmt || label)(v)));
      }
      if (v !== null && opts.cross?.(i, j)) {
        svg.append(s("line", { x1: x + 2, y1: y + ch - 4, x2: x + cell - 4, y2: y + 2, stroke: "#7f1d1d", "stroke-width": 1.2, opacity: 0.6 }));
      }
    });
  });
  cols.forEach((c, j) => svg.append(s("text", { x: m.l + j * cell + cell / 2, y: m.t + rows.length * ch + 14, "text-anchor": "middle" }, c)));
  if (opts.colLabel) svg.append(s("text", { x: m.l + (cols.length * cell) / 2, y: H - 6, "text-anchor": "middle" }, opts.colLabel));
  if (opts.rowLabel) svg.append(s("text", { x: m.l - 8, y: m.t - 8, "text-anchor": "end" }, opts.rowLabel));
  return svg;
}

/** White → blue for 0–100. */
export function cohColor(v) {
  const t = Math.max(0, Math.min(1, v / 100));
  return `rgb(${255 - Math.round(159 * t)},${255 - Math.round(90 * t)},${255 - Math.round(5 * t)})`;
}

/** White → orange for 0–100. */
export function traitColor(v) {
  const t = Math.max(0, Math.min(1, v / 100));
  const r = 255 - Math.round(21 * t), g = 255 - Math.round(167 * t), b = 255 - Math.round(243 * t);
  return `rgb(${r},${g},${b})`;
}
