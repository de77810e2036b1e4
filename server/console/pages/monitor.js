// Monitor: live monitored traffic on this server — each monitored generation's scores over time,
// and its alerts — fed by the engine over /api/live.

import { live } from "../api.js";
import { lineChart } from "../charts.js";
import { h, fmt, showError } from "../ui.js";

export const title = "Monitor";

const PALETTE = ["#c2410c", "#7c3aed", "#059669", "#2563eb", "#db2777", "#ca8a04"];

export async function render(root) {
  root.append(h("h1", {}, title),
    h("p", { class: "lead" }, "Every generation on this server that asks for monitors, as it happens: token scores over time (calibrated 0–100 where the vector has a calibration), and which requests crossed their alert threshold; conversations scored through MonitorStream appear as their own series."));
  const chartBox = h("section", { class: "panel" });
  const alerts = h("ul", { class: "plain feed", "aria-live": "polite" });
  const noAlerts = h("p", { class: "muted" }, "No alerts yet. A request alerts when a monitor reaches its alert_threshold.");
  const recent = h("tbody");
  const state = h("span", { class: "badge calm" }, "connecting");
  root.append(h("div", { class: "row", style: "margin-bottom:8px" }, h("span", {}, "Feed:"), state), chartBox,
    h("div", { class: "grid2" },
      h("section", { class: "panel" }, h("h2", {}, "Alerts"), noAlerts, alerts),
      h("section", { class: "panel" }, h("h2", {}, "Recent monitored requests"),
        h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["#", "Model", "Vector", "Tokens", "Mean", "Max", ""].map((t) => h("th", { scope: "col" }, t)))), recent)))));
  const requests = new Map();
  const series = new Map();
  let t0 = null, dirty = false, tokens = 0, streamed = 0;
  function onEvent(e) {
    if (t0 === null) t0 = e.t;
    if (e.kind === "projection") {
      // A MonitorStream item: one point per vector, its response average (else its last prompt token).
      for (const p of e.projections || []) {
        const cal = p.response_avg_calibrated ?? p.prompt_last_calibrated;
        const v = cal ?? p.response_avg ?? p.prompt_last;
        const key = `${p.vector} · MonitorStream${cal === null || cal === undefined ? " (raw)" : ""}`;
        if (!series.has(key)) series.set(key, []);
        series.get(key).push([(e.t - t0) / 1000, v]);
      }
      streamed++;
      dirty = true;
      return;
    }
    if (e.kind === "start") requests.set(e.request, { ...e, tokens: 0 });
    const r = requests.get(e.request);
    if (!r) return;
    if (e.kind === "token") {
      r.tokens++;
      tokens++;
      (r.monitors || []).forEach((m, i) => {
        const cal = e.calibrated?.[i];
        const v = cal !== null && cal !== undefined ? cal : e.scores?.[i];
        const key = `${m.vector}${cal !== null && cal !== undefined ? "" : " (raw)"}`;
        if (!series.has(key)) series.set(key, []);
        const pts = series.get(key);
        pts.push([(e.t - t0) / 1000, v]);
        if (pts.length > 1500) pts.shift();
      });
      dirty = true;
    }
    if (e.kind === "done") {
      r.done = e;
      for (const m of e.monitors || []) {
        if (m.alert) {
          noAlerts.hidden = true;
          alerts.prepend(h("li", {}, h("span", { class: "badge alert" }, "alert"),
            ` request ${e.request}: ${m.vector} max ${fmt(m.max_calibrated ?? m.max)}${m.first_alert_token !== null && m.first_alert_token !== undefined ? ` from token ${m.first_alert_token}` : ""} · ${new Date(e.t).toLocaleTimeString()}`));
          while (alerts.children.length > 100) alerts.lastChild.remove();
        }
      }
      const m = (e.monitors || [])[0] || {};
      recent.prepend(h("tr", {}, h("td", {}, e.request), h("td", {}, e.model), h("td", {}, (e.monitors || []).map((x) => x.vector).join(", ")),
        h("td", {}, e.tokens), h("td", {}, fmt(m.mean_calibrated ?? m.mean)), h("td", {}, fmt(m.max_calibrated ?? m.max)),
        h("td", {}, (e.monitors || []).some((x) => x.alert) ? h("span", { class: "badge alert" }, "alert") : h("span", { class: "badge calm" }, "ok"))));
      while (recent.children.length > 50) recent.lastChild.remove();
      requests.delete(e.request);
    }
  }
  function draw() {
    if (!dirty && chartBox.childElementCount) return;
    dirty = false;
    const keys = [...series.keys()];
    if (!keys.length) {
      chartBox.replaceChildren(h("h2", {}, "Scores over time"), h("p", { class: "muted" }, "No monitored generations yet. Send a request with monitors (the Playground does) and it appears here."));
      return;
    }
    chartBox.replaceChildren(h("h2", {}, `Scores over time · ${tokens} generated tokens${streamed ? ` · ${streamed} MonitorStream items` : ""}`), lineChart(keys.map((k, i) => ({
      name: k, color: PALETTE[i % PALETTE.length], points: series.get(k), dotsOnly: true,
    })), { xLabel: "seconds since the feed began", yLabel: "score", width: 1200, height: 300, xTicks: 10,
      marks: keys.some((k) => !k.endsWith("(raw)")) ? [{ y: 50, label: "50" }] : [],
      desc: "Monitor scores of recent generated tokens over time" }));
  }
  const ctl = new AbortController();
  const timer = setInterval(draw, 500);
  draw();
  live(onEvent, ctl.signal).then(() => { state.textContent = "closed"; state.className = "badge"; },
    (e) => { if (e.name !== "AbortError") { state.textContent = "error"; state.className = "badge alert"; showError(e); } });
  state.textContent = "live";
  return () => { ctl.abort(); clearInterval(timer); };
}
