// Sweep: the stored evaluation of a vector — trait and coherence against the coefficient (two
// axes) and the layer × coefficient heat map — and running a new evaluation with progress.

import { stream } from "../api.js";
import { lineChart, heatMap, traitColor, cohColor } from "../charts.js";
import { h, field, busy, fmt, vectors, vectorSelect, emptyState, responseVectors, initialVector } from "../ui.js";

export const title = "Sweep";

export async function render(root, params) {
  const list = responseVectors(await vectors());
  root.append(h("h1", {}, title),
    h("p", { class: "lead" }, "How steering strength trades the trait against coherence. A cell passes when its coherence stays at or above the threshold (a fraction of the unsteered coherence); the recommendation is the passing cell that raises the trait most."));
  if (!list.length) {
    root.append(emptyState("No response-average vectors stored yet. ", h("a", { href: "#/traits" }, "Extract one"), "."));
    return;
  }
  let info = initialVector(list, params);
  const view = h("div");
  const questions = h("input", { type: "number", min: 1, max: 64, value: 4 });
  const tokens = h("input", { type: "number", min: 8, max: 128, value: 32 });
  const coefs = h("input", { type: "text", placeholder: "default: −2 −1 0.5 1 1.5 2 3 4 6 8" });
  const go = h("button", { type: "submit" }, "Run evaluation");
  const progress = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "evaluation progress" });
  const progressText = h("span", { class: "muted", "aria-live": "polite" });
  async function evaluate() {
    const body = { vector: info.name, maxQuestions: +questions.value || 4, sampling: { maxTokens: +tokens.value || 32 } };
    const cs = coefs.value.split(/[\s,]+/).filter(Boolean).map(Number);
    if (cs.some((c) => !Number.isFinite(c))) throw new Error("coefficients: numbers separated by spaces");
    if (cs.length) body.coefficients = cs;
    progress.hidden = false;
    progress.value = 0;
    await stream("EvaluateSteering", body, (m) => {
      if (m.progress) {
        const p = m.progress;
        progress.max = p.total || 1;
        progress.value = p.done || 0;
        progressText.textContent = `${p.stage}: ${p.done || 0}/${p.total} · ${fmt(p.elapsedSecs || 0, 0)} s, about ${fmt(p.etaSecs || 0, 0)} s left`;
      }
      if (m.result) {
        const r = m.result;
        progressText.textContent = r.note || `Done in ${fmt(r.elapsedSecs, 0)} s${r.stored ? "; recommendation stored" : ""}.`;
        show({ ...(r.recommendation || {}), cells: r.cells, coherenceThreshold: r.coherenceThreshold,
          unsteeredTraitScore: r.unsteered?.traitScore, unsteeredCoherence: r.unsteered?.coherence, scorer: r.scorer }, r.unsteered);
      }
    });
    progress.hidden = true;
    const fresh = (await vectors(true)).find((v) => v.name === info.name);
    if (fresh) info = fresh;
  }
  function show(rec) {
    view.replaceChildren(...sweepView(rec));
  }
  function setVector(v) {
    info = v;
    if (v.steering) show(v.steering);
    else view.replaceChildren(emptyState(`${v.name} has not been evaluated yet. Run an evaluation above.`));
  }
  root.append(
    h("form", { class: "panel", onsubmit: (e) => { e.preventDefault(); busy(go, evaluate); } },
      h("div", { class: "row" }, field("Vector", vectorSelect(list, info.name, setVector)), field("Questions", questions),
        field("Tokens per answer", tokens), field("Coefficients", coefs, { grow: true }), go),
      h("div", { style: "margin-top:10px" }, progress, progressText)),
    view);
  setVector(info);
}

function sweepView(rec) {
  const cells = rec.cells || [];
  if (!cells.length) {
    return [h("div", { class: "panel" }, h("p", {}, `Recommended: layer ${rec.layer ?? 0}, coefficient ${fmt(rec.coefficient, 2)} (trait ${fmt(rec.traitScore)}, coherence ${fmt(rec.coherence)}).`),
      h("p", { class: "muted" }, "This recommendation was stored before evaluations kept their grid; run the evaluation again for the charts."))];
  }
  const layers = [...new Set(cells.map((c) => c.layer ?? 0))].sort((a, b) => a - b);
  const coefficients = [...new Set(cells.map((c) => c.coefficient ?? 0))].sort((a, b) => a - b);
  const best = rec.layer ?? layers[0];
  const threshold = rec.coherenceThreshold ?? 0;
  const layerSelect = h("select", {}, layers.map((l) => h("option", { value: l, selected: l === best }, `layer ${l}${l === best ? " (recommended)" : ""}`)));
  const chartBox = h("div");
  function drawLine() {
    const l = +layerSelect.value;
    const at = cells.filter((c) => (c.layer ?? 0) === l).sort((a, b) => (a.coefficient ?? 0) - (b.coefficient ?? 0));
    const withBase = [[0, rec.unsteeredTraitScore ?? 0, rec.unsteeredCoherence ?? 0], ...at.map((c) => [c.coefficient ?? 0, c.traitScore ?? 0, c.coherence ?? 0])]
      .sort((a, b) => a[0] - b[0]);
    const rl = (rec.layers || []).find((x) => (x.layer ?? 0) === l);
    chartBox.replaceChildren(lineChart([
      { name: "trait", color: "#c2410c", points: withBase.map((p) => [p[0], p[1]]) },
      { name: "coherence", color: "#2563eb", axis: "right", points: withBase.map((p) => [p[0], p[2]]) },
    ], {
      title: `Layer ${l}: trait and coherence by coefficient`, xLabel: "coefficient", yLabel: "trait (0–100)", y2Label: "coherence (0–100)",
      yRange: [0, 100], y2Range: [0, 100],
      marks: [...(rl ? [{ x: rl.coefficient ?? 0, label: "recommended", color: "#15803d" }] : []), { y: threshold, label: "coherence threshold" }],
      desc: `Trait and coherence scores against the steering coefficient at layer ${l}`,
    }));
  }
  layerSelect.addEventListener("change", drawLine);
  drawLine();
  const byKey = new Map(cells.map((c) => [`${c.layer ?? 0}:${c.coefficient ?? 0}`, c]));
  const metric = h("select", {}, h("option", { value: "traitScore" }, "trait score"), h("option", { value: "coherence" }, "coherence"));
  const heatBox = h("div");
  function drawHeat() {
    const key = metric.value, name = key === "coherence" ? "Coherence" : "Trait score";
    heatBox.replaceChildren(heatMap(layers.map(String), coefficients.map((c) => String(+c.toFixed(2))),
      (i, j) => { const c = byKey.get(`${layers[i]}:${coefficients[j]}`); return c ? c[key] ?? 0 : null; },
      key === "coherence" ? cohColor : traitColor,
      { title: `${name} by layer × coefficient (struck out: incoherent)`, rowLabel: "layer", colLabel: "coefficient", fmt: (v) => fmt(v, 0),
        cross: (i, j) => { const c = byKey.get(`${layers[i]}:${coefficients[j]}`); return c && !c.coherent; },
        desc: `Heat map of the ${name.toLowerCase()} over steering layer and coefficient` }));
  }
  metric.addEventListener("change", drawHeat);
  drawHeat();
  return [
    h("div", { class: "panel" },
      h("p", { style: "margin:0" }, h("strong", {}, `Recommended: layer ${best}, coefficient ${fmt(rec.coefficient, 2)}`),
        ` — trait ${fmt(rec.traitScore)} (unsteered ${fmt(rec.unsteeredTraitScore)}), coherence ${fmt(rec.coherence)} (unsteered ${fmt(rec.unsteeredCoherence)}, threshold ${fmt(threshold)}).`),
      h("p", { class: "muted", style: "margin:4px 0 0;font-size:13px" }, `Scored ${rec.scorer || "offline"}.`)),
    h("div", { class: "grid2" },
      h("section", { class: "panel" }, h("div", { class: "row", style: "margin-bottom:8px" }, field("Layer", layerSelect)), chartBox),
      h("section", { class: "panel" }, h("div", { class: "row", style: "margin-bottom:8px" }, field("Heat map of", metric)), heatBox)),
  ];
}
