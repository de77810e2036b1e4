// Small DOM helpers shared by the pages.

import { call } from "./api.js";

/** Creates an element: h("div", {class: "x", onclick: f}, child, "text", ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    // Through the CSSOM: the console's Content-Security-Policy refuses inline style attributes.
    else if (k === "style") el.style.cssText = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

let fieldIds = 0;

/** A labelled form field around `control`. */
export function field(label, control, { grow = false, hint } = {}) {
  const id = control.id || `f${++fieldIds}`;
  control.id = id;
  return h("div", { class: grow ? "field grow" : "field" }, h("label", { for: id }, label), control,
    hint ? h("span", { class: "muted", style: "font-size:12px" }, hint) : null);
}

/** Shows an error in the status line (or clears it with null). */
export function showError(err) {
  const status = document.getElementById("status");
  status.replaceChildren();
  if (err) status.append(h("div", { class: "error", role: "alert" }, err.message || String(err)));
}

/** Runs an async action with its button disabled, reporting failures. */
export async function busy(button, action) {
  button.disabled = true;
  showError(null);
  try {
    return await action();
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  } finally {
    button.disabled = false;
  }
}

export function fmt(x, digits = 1) {
  return x === undefined || x === null || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
}

/** Stored vectors (response averages first), cached for the page's lifetime. */
let vectorCache = null;
export async function vectors(refresh = false) {
  if (!vectorCache || refresh) {
    const res = await call("ListVectors", {});
    vectorCache = (res.vectors || []).sort((a, b) =>
      (kindRank(a.kind) - kindRank(b.kind)) || a.name.localeCompare(b.name));
  }
  return vectorCache;
}

function kindRank(kind) {
  return !kind || kind === "VECTOR_KIND_RESPONSE_AVG" ? 0 : 1;
}

let modelCache = null;
export async function models() {
  if (!modelCache) modelCache = (await call("ListModels", {})).models || [];
  return modelCache;
}

/** A <select> of stored vectors; `onchange(info)` with the chosen vector's info. */
export function vectorSelect(list, selected, onchange) {
  const sel = h("select", { onchange: () => onchange(list.find((v) => v.name === sel.value)) },
    list.map((v) => h("option", { value: v.name, selected: v.name === selected },
      `${v.name}${v.steering ? " ★" : ""}${v.kind && v.kind !== "VECTOR_KIND_RESPONSE_AVG" ? " (" + kindName(v.kind) + ")" : ""}`)));
  return sel;
}

/** The response-average vectors (the ones steering and evaluation take). */
export function responseVectors(list) {
  return list.filter((v) => kindRank(v.kind) === 0);
}

/** The vector a page opens on: the one named in its URL, else an evaluated one, else the first. */
export function initialVector(list, params) {
  return list.find((v) => v.name === params.get("vector")) || list.find((v) => v.steering) || list[0];
}

export function kindName(kind) {
  return ({ VECTOR_KIND_PROMPT_AVG: "prompt avg", VECTOR_KIND_PROMPT_LAST: "prompt last" })[kind] || "response avg";
}

/** The layer and coefficient a vector recommends: evaluation, else monitoring layer. */
export function recommended(info) {
  const s = info?.steering;
  if (s) return { layer: s.layer ?? 0, coefficient: s.coefficient ?? 0, source: "evaluation" };
  return { layer: info?.recommendedLayer ?? 0, coefficient: null, source: "monitoring layer" };
}

/** A background colour for a calibrated score (0 helpful … 100 trait), or a raw one scaled by `span`. */
export function tint(score, calibrated, span = 1) {
  if (score === null || score === undefined || Number.isNaN(score)) return "transparent";
  const t = calibrated ? (score - 50) / 50 : score / span;
  const a = Math.max(-1, Math.min(1, t));
  return a >= 0 ? `rgba(234, 88, 12, ${0.55 * a})` : `rgba(59, 130, 246, ${0.45 * -a})`;
}

export function emptyState(text, ...extra) {
  return h("div", { class: "empty-state" }, text, ...extra);
}
