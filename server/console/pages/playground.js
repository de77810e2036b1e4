// Playground: one conversation answered steered and unsteered side by side, each token tinted by
// its monitor score, the last-prompt-token warning before the first token.

import { chatStream } from "../api.js";
import { h, field, busy, fmt, vectors, models, vectorSelect, recommended, tint, emptyState, showError, initialVector } from "../ui.js";

export const title = "Playground";

/** Where the coefficient slider goes for a vector: around its recommendation when it has one. */
function coefficientRange(rec) {
  const c = Math.abs(rec.coefficient || 0);
  if (c > 0) return { min: -3 * c, max: 3 * c, step: +(c / 20).toPrecision(2), value: rec.coefficient };
  return { min: -16, max: 16, step: 0.25, value: 4 };
}

export async function render(root, params) {
  const [list, ms] = await Promise.all([vectors(), models()]);
  root.append(h("h1", {}, title),
    h("p", { class: "lead" }, "Hold a conversation twice at once: steered and unsteered, each side remembering its own answers. Each token is tinted by where the monitored vector reads it: blue toward the helpful side (0), orange toward the trait (100)."));
  if (!list.length) {
    root.append(emptyState("No vectors stored yet. ", h("a", { href: "#/traits" }, "Extract one from a trait"), " first."));
    return;
  }
  const nLayers = ms.find((m) => m.isDefault)?.nLayers || 30;
  let info = initialVector(list, params);

  const layer = h("input", { type: "range", min: 0, max: nLayers, step: 1 });
  const layerOut = h("output", { class: "value", for: "layer" });
  const coef = h("input", { type: "range" });
  const coefOut = h("output", { class: "value" });
  const recNote = h("span", { class: "muted", style: "font-size:12px" });
  const positions = h("select", {}, h("option", { value: "response" }, "response tokens"), h("option", { value: "all" }, "prompt and response"));
  const system = h("textarea", { rows: 2, placeholder: "Optional system prompt" }, "You are a helpful assistant.");
  const question = h("textarea", { rows: 3 }, params.get("q") || "What should I do if I find a lost wallet?");
  const maxTokens = h("input", { type: "number", min: 1, max: 512, value: 64 });
  const go = h("button", { type: "submit" }, "Generate");

  function setVector(v) {
    info = v;
    const rec = recommended(v);
    layer.value = rec.layer;
    const r = coefficientRange(rec);
    Object.assign(coef, { min: r.min, max: r.max, step: r.step });
    coef.value = r.value;
    recNote.textContent = v.steering
      ? `Recommended: layer ${rec.layer}, coefficient ${fmt(rec.coefficient, 2)} (from its evaluation)`
      : `Not evaluated yet: layer ${rec.layer} is its monitoring layer; run a sweep for a recommended coefficient.`;
    sync();
  }
  function sync() {
    layerOut.textContent = layer.value;
    coefOut.textContent = fmt(+coef.value, 2);
    layer.setAttribute("aria-valuetext", `layer ${layer.value}`);
    coef.setAttribute("aria-valuetext", `coefficient ${fmt(+coef.value, 2)}`);
  }
  const picker = vectorSelect(list, info.name, setVector);
  layer.addEventListener("input", sync);
  coef.addEventListener("input", sync);

  const steered = answerPanel("Steered", "steered");
  const plain = answerPanel("Unsteered", "unsteered");
  let asked = false;
  let controllers = [];
  // Finished turns, each with both sides' answers; `current` is the turn on screen.
  const history = [];
  let current = null;

  function request(steer) {
    const side = steer ? "steered" : "unsteered";
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    for (const t of history) messages.push({ role: "user", content: t.user }, { role: "assistant", content: t[side] });
    messages.push({ role: "user", content: question.value });
    // The thermostat reads the vector's monitoring layer (best separation), whatever layer steers.
    const monitor = info.recommendedLayer !== undefined ? { vector: info.name, layer: info.recommendedLayer } : info.name;
    const body = { model: "", messages, max_tokens: +maxTokens.value || 64, temperature: 0, monitors: [monitor] };
    if (steer) body.steering = [{ vector: info.name, layer: +layer.value, coefficient: +coef.value, positions: positions.value }];
    return body;
  }

  async function run(both) {
    for (const c of controllers) c.abort();
    controllers = [];
    const jobs = [[steered, true]];
    if (both) jobs.push([plain, false]);
    const user = question.value;
    const texts = await Promise.all(jobs.map(([panel, steer]) => {
      const ctl = new AbortController();
      controllers.push(ctl);
      return panel.run(request(steer), ctl.signal);
    }));
    current = { user, steered: texts[0], unsteered: both ? texts[1] : current?.unsteered };
    next.disabled = texts.some((t) => t === null);
    asked = true;
  }

  /** Keeps the turn on screen and asks for the next message. */
  function continueConversation() {
    if (!current) return;
    history.push(current);
    current = null;
    asked = false;
    next.disabled = true;
    steered.showHistory(history, "steered");
    plain.showHistory(history, "unsteered");
    question.value = "";
    question.focus();
  }

  function restart() {
    history.length = 0;
    current = null;
    asked = false;
    next.disabled = true;
    steered.clear();
    plain.clear();
    question.focus();
  }
  const next = h("button", { type: "button", class: "ghost", disabled: true, onclick: continueConversation }, "Reply to these answers");
  const reset = h("button", { type: "button", class: "ghost", onclick: restart }, "New conversation");

  const form = h("form", { class: "panel", onsubmit: (e) => { e.preventDefault(); busy(go, () => run(true)); } },
    h("div", { class: "row" },
      field("Vector", picker),
      slider("Steering layer", layer, layerOut),
      slider("Coefficient", coef, coefOut),
      field("Steer", positions)),
    h("div", { style: "margin:4px 0 10px" }, recNote),
    h("div", { class: "row" }, field("System", system, { grow: true }), field("Your message", question, { grow: true })),
    h("div", { class: "row end", style: "margin-top:10px" }, reset, next, field("Max tokens", maxTokens), go));
  // Moving a slider re-runs the steered side once a question was asked.
  for (const input of [layer, coef, positions]) {
    input.addEventListener("change", () => { if (asked) busy(go, () => run(false)); });
  }
  root.append(form, h("div", { class: "grid2" }, steered.el, plain.el),
    h("div", { class: "legend" }, "helpful 0", h("span", { class: "scale", "aria-hidden": "true" }), "100 trait",
      h("span", {}, "· hover a token for its score")));
  setVector(info);
  if (params.get("run")) busy(go, () => run(true));
  return () => controllers.forEach((c) => c.abort());
}

/** A labelled range input with its value beside it. */
function slider(label, input, output) {
  const f = field(label, input, { grow: true });
  f.replaceChildren(f.firstChild, h("div", { class: "slider" }, input, output));
  return f;
}

/** One answer column: streams a chat completion into tinted token spans. */
function answerPanel(label, id) {
  const past = h("div", { class: "history", id: `history-${id}` });
  const warning = h("div", { "aria-live": "polite" });
  const answer = h("div", { class: "answer empty", id: `answer-${id}`, "aria-live": "off" });
  const meta = h("div", { class: "meta" });
  const el = h("section", { class: "panel", "aria-labelledby": `h-${id}` }, h("h2", { id: `h-${id}` }, label), past, warning, answer, meta);
  function showHistory(turns, side) {
    past.replaceChildren(...turns.flatMap((t) => [h("p", { class: "turn user" }, h("strong", {}, "You: "), t.user),
      h("p", { class: "turn" }, h("strong", {}, "Assistant: "), t[side])]));
    clearAnswer();
  }
  function clearAnswer() {
    warning.replaceChildren();
    answer.replaceChildren();
    answer.classList.add("empty");
    meta.replaceChildren();
  }
  function clear() {
    past.replaceChildren();
    clearAnswer();
  }
  /** Streams one answer; resolves to its text (null when it failed or was replaced). */
  async function run(body, signal) {
    warning.replaceChildren();
    answer.replaceChildren();
    answer.classList.add("empty");
    meta.replaceChildren(h("span", {}, "generating…"));
    el.setAttribute("aria-busy", "true");
    let span = 1, n = 0, summary = null, usage = null, text = "";
    const scores = [];
    try {
      await chatStream({ ...body, stream_options: { include_usage: true } }, (chunk) => {
        if (chunk.usage) usage = chunk.usage;
        const p = chunk.persona;
        if (p?.monitors) summary = p;
        const delta = chunk.choices?.[0]?.delta;
        if (!delta || delta.content === undefined || delta.content === "" && !p?.scores) return;
        if (p?.prompt_last) warning.replaceChildren(promptWarning(p.prompt_last[0]));
        const s = p?.scores?.[0];
        const calibrated = s && s.calibrated !== null && s.calibrated !== undefined;
        const value = calibrated ? s.calibrated : s?.score;
        if (!calibrated && Number.isFinite(value)) span = Math.max(span, Math.abs(value));
        scores.push(value);
        text += delta.content;
        answer.classList.remove("empty");
        answer.append(h("span", { class: "tok", title: s ? `${fmt(value)}${calibrated ? " (calibrated)" : " (raw)"}` : "",
          style: `background:${tint(value, calibrated, span)}` }, delta.content));
        n++;
      }, signal);
    } catch (e) {
      if (e.name !== "AbortError") { meta.replaceChildren(h("span", { class: "error" }, e.message)); showError(e); }
      return null;
    } finally {
      el.removeAttribute("aria-busy");
    }
    const m = summary?.monitors?.[0];
    const s = summary?.steering?.[0];
    meta.replaceChildren(...[
      h("span", {}, `${usage?.completion_tokens ?? n} tokens`),
      m ? h("span", {}, `mean ${m.calibrated ? fmt(m.mean_calibrated) + " (0–100)" : fmt(m.mean) + " raw"} at layer ${m.layer}`) : null,
      m ? h("span", {}, `max ${m.calibrated ? fmt(m.max_calibrated) : fmt(m.max)}`) : null,
      s ? h("span", {}, `steered at layer ${s.layer}, coefficient ${fmt(s.coefficient, 2)}`) : null].filter(Boolean));
    return text;
  }
  return { el, run, showHistory, clear };
}

function promptWarning(s) {
  const calibrated = s.calibrated !== null && s.calibrated !== undefined;
  const v = calibrated ? s.calibrated : s.score;
  const high = calibrated && v >= 50;
  return h("div", { class: high ? "warning" : "muted", role: high ? "alert" : null, style: high ? "" : "font-size:13px;margin-bottom:6px" },
    high ? `⚠ Before the first token: the last prompt token already reads ${fmt(v)} on ${s.vector} (0 helpful, 100 trait) — this prompt leans toward the trait.`
      : `Last prompt token reads ${fmt(v)}${calibrated ? " (0–100)" : " (raw)"} on ${s.vector} before the first token.`);
}
