// Spectrum: one question answered at -2c, -c, 0, +c, +2c side by side, each with its trait and
// coherence scores.

import { call } from "../api.js";
import { h, field, busy, fmt, vectors, vectorSelect, recommended, emptyState, responseVectors, initialVector } from "../ui.js";

export const title = "Spectrum";

export async function render(root, params) {
  const list = responseVectors(await vectors());
  root.append(h("h1", {}, title),
    h("p", { class: "lead" }, "One question, five answers: the coefficient times −2, −1, 0, 1 and 2. Trait and coherence are scored 0–100 by the judge when one is configured, else offline (calibrated projection; fluency and diversity)."));
  if (!list.length) {
    root.append(emptyState("No response-average vectors stored yet. ", h("a", { href: "#/traits" }, "Extract one"), "."));
    return;
  }
  let info = initialVector(list, params);
  const question = h("input", { type: "text", value: params.get("q") || "How should I treat people who disagree with me?" });
  const layer = h("input", { type: "number", min: 0, step: 1 });
  const coef = h("input", { type: "number", step: "any" });
  const tokens = h("input", { type: "number", min: 1, max: 256, value: 48 });
  const note = h("span", { class: "muted", style: "font-size:12px" });
  const go = h("button", { type: "submit" }, "Run spectrum");
  const out = h("div", { "aria-live": "polite" });
  function setVector(v) {
    info = v;
    const rec = recommended(v);
    layer.value = rec.layer;
    coef.value = rec.coefficient ?? "";
    coef.placeholder = rec.coefficient === null ? "required (not evaluated)" : "";
    note.textContent = v.steering ? `Recommended: layer ${rec.layer}, coefficient ${fmt(rec.coefficient, 2)}` : "Not evaluated: give a coefficient.";
  }
  async function run() {
    const body = { vector: info.name, question: question.value, sampling: { maxTokens: +tokens.value || 48 } };
    if (layer.value !== "") body.layer = +layer.value;
    if (coef.value !== "") body.coefficient = +coef.value;
    out.replaceChildren(h("p", { class: "muted" }, "Generating five answers…"));
    const res = await call("SteeringSpectrum", body);
    out.replaceChildren(
      h("p", { class: "muted" }, `${res.vector} at layer ${res.layer ?? 0}, coefficient ${fmt(res.coefficient, 2)} (${res.source}); scored ${res.scorer}.`),
      h("div", { class: "grid5" }, (res.points || []).map(point)));
  }
  root.append(
    h("form", { class: "panel", onsubmit: (e) => { e.preventDefault(); busy(go, run); } },
      h("div", { class: "row" }, field("Vector", vectorSelect(list, info.name, setVector)), field("Question", question, { grow: true }),
        field("Layer", layer), field("Coefficient c", coef), field("Tokens", tokens), go),
      h("div", { style: "margin-top:6px" }, note)),
    out);
  setVector(info);
  if (params.get("run")) busy(go, run);
}

function point(p) {
  const m = p.multiplier ?? 0;
  const label = m === 0 ? "unsteered" : `${m > 0 ? "+" : "−"}${Math.abs(m) === 1 ? "" : Math.abs(m)}c`;
  const bar = (cls, name, v) => h("div", { class: "score-line" }, name,
    h("div", { class: `bar ${cls}`, role: "meter", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": fmt(v ?? 0, 0), "aria-label": name },
      h("span", { style: `width:${Math.max(0, Math.min(100, v ?? 0))}%` })),
    h("span", { class: "value" }, p.scored === false ? "–" : fmt(v ?? 0, 0)));
  return h("article", { class: "card" },
    h("h3", {}, h("span", {}, label), h("span", { class: "muted", style: "font-size:12px" }, `coef ${fmt(p.coefficient ?? 0, 2)}`)),
    bar("trait", "trait", p.traitScore), bar("coh", "coherence", p.coherence),
    h("div", { class: "answer", style: "min-height:0;font-size:14px" }, p.answer || ""),
    p.scored === false ? h("span", { class: "muted" }, "not scored (judge refused)") : null);
}
