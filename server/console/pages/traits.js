// Traits: the library, a trait's definition, drafting one from a description, extracting a
// vector with progress.

import { call, stream } from "../api.js";
import { h, field, busy, fmt, vectors, emptyState } from "../ui.js";

export const title = "Traits";

export async function render(root, params) {
  root.append(h("h1", {}, title),
    h("p", { class: "lead" }, "Character traits as the extraction pipeline uses them: contrastive system prompts, questions to answer, evaluation questions. Extracting runs the rollouts on this server and stores the vector with its per-layer separation and calibration."));
  const res = await call("ListTraits", {});
  const traits = res.traits || [];
  let selected = traits.find((t) => t.traitName === params.get("trait")) || traits[0];
  const listBox = h("div");
  const detail = h("div");
  const draft = draftForm((def) => { selected = def; drawList(); drawDetail(); });
  function drawList() {
    listBox.replaceChildren(h("div", { class: "row", role: "list", style: "gap:6px" },
      traits.map((t) => h("div", { role: "listitem" }, h("button", { type: "button", class: t === selected ? "" : "ghost", "aria-pressed": String(t === selected),
        onclick: () => { selected = t; drawList(); drawDetail(); } }, t.traitName))),
      selected && !traits.includes(selected) ? h("button", { type: "button", "aria-pressed": "true" }, `${selected.traitName} (draft)`) : null));
  }
  function drawDetail() {
    detail.replaceChildren(selected ? traitDetail(selected, traits.includes(selected)) : emptyState("No traits."));
  }
  drawList();
  drawDetail();
  root.append(h("section", { class: "panel" }, h("h2", {}, "Library"), listBox), detail, draft);
}

function traitDetail(t, inLibrary) {
  const name = h("input", { type: "text", value: t.traitName });
  const pairs = h("input", { type: "number", min: 0, value: 2 });
  const questions = h("input", { type: "number", min: 0, value: 8 });
  const tokens = h("input", { type: "number", min: 8, max: 256, value: 48 });
  const overwrite = h("input", { type: "checkbox" });
  const go = h("button", { type: "submit" }, "Extract vector");
  const progress = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "extraction progress" });
  const status = h("div", { "aria-live": "polite", class: "muted" });
  async function extract() {
    const body = { name: name.value.trim(), maxPairs: +pairs.value, maxQuestions: +questions.value, overwrite: overwrite.checked,
      sampling: { maxTokens: +tokens.value || 48 } };
    if (inLibrary) body.traitRef = t.traitName;
    else body.definition = t;
    progress.hidden = false;
    await stream("ExtractVector", body, (m) => {
      if (m.progress) {
        const p = m.progress;
        progress.max = p.total || 1;
        progress.value = p.done || 0;
        status.textContent = `${p.stage}: ${p.done || 0}/${p.total} · about ${fmt(p.etaSecs || 0, 0)} s left`;
      }
      if (m.result) {
        const r = m.result;
        const v = r.vector || {};
        status.replaceChildren(h("span", { class: "ok" }, `Stored ${v.name}: ${r.rollouts} rollouts in ${fmt(r.elapsedSecs, 0)} s; monitoring layer ${v.recommendedLayer ?? "–"}. `),
          h("a", { href: `#/vectors/vector=${encodeURIComponent(v.name)}` }, "Open it"), " · ",
          h("a", { href: `#/sweep/vector=${encodeURIComponent(v.name)}` }, "Evaluate steering"));
      }
    });
    progress.hidden = true;
    await vectors(true);
  }
  return h("section", { class: "panel", "aria-labelledby": "trait-title" },
    h("h2", { id: "trait-title" }, t.traitName, inLibrary ? null : h("span", { class: "badge" }, "draft")),
    h("p", {}, t.description),
    h("details", {}, h("summary", {}, `${(t.instruction || []).length} instruction pairs`),
      h("ul", { class: "plain" }, (t.instruction || []).map((p) => h("li", {}, h("strong", {}, "+ "), p.pos, h("br"), h("strong", {}, "− "), p.neg)))),
    h("details", {}, h("summary", {}, `${(t.questions || []).length} questions, ${(t.evalQuestions || []).length} evaluation questions`),
      h("ul", { class: "plain" }, (t.questions || []).map((q) => h("li", {}, q)))),
    h("form", { style: "margin-top:12px", onsubmit: (e) => { e.preventDefault(); busy(go, extract); } },
      h("div", { class: "row" }, field("Store as", name, { grow: true }), field("Pairs (0 = all)", pairs), field("Questions (0 = all)", questions),
        field("Tokens per answer", tokens),
        h("label", { style: "display:flex;gap:6px;align-items:center" }, overwrite, "replace existing"), go),
      h("div", { style: "margin-top:8px" }, progress, status)));
}

function draftForm(onDraft) {
  const name = h("input", { type: "text", placeholder: "e.g. pessimistic" });
  const description = h("textarea", { rows: 2, placeholder: "What the trait means, in a sentence or two" });
  const useLlm = h("input", { type: "checkbox" });
  const go = h("button", { type: "submit" }, "Draft");
  const out = h("div");
  async function draft() {
    const res = await call("DraftTrait", { traitName: name.value.trim(), description: description.value.trim(), useLlm: useLlm.checked });
    const def = res.definition;
    out.replaceChildren(h("p", { class: "muted" }, `Drafted by ${res.generator}. Review it, then extract from it above.`),
      h("pre", { class: "json" }, JSON.stringify(def, null, 2)));
    onDraft(def);
  }
  return h("form", { class: "panel", onsubmit: (e) => { e.preventDefault(); busy(go, draft); } },
    h("h2", {}, "Draft a trait"),
    h("div", { class: "row" }, field("Trait (an adjective)", name), field("Description", description, { grow: true }),
      h("label", { style: "display:flex;gap:6px;align-items:center" }, useLlm, "write with the judge model"), go), out);
}
