// Vectors: the library, per-layer separation (Cohen's d, AUROC), calibration, import, export,
// delete with confirmation.

import { call } from "../api.js";
import { lineChart } from "../charts.js";
import { h, field, busy, fmt, vectors, kindName, emptyState, showError } from "../ui.js";

export const title = "Vectors";

export async function render(root, params) {
  root.append(h("h1", {}, title),
    h("p", { class: "lead" }, "Stored persona vectors. Select one for how well each layer separates trait from helpful rollouts, and where each side projects (the 0 and 100 of every calibrated score)."));
  const table = h("div", { class: "table-wrap" });
  const detail = h("div");
  const file = h("input", { type: "file", accept: ".safetensors,.gguf,.pt" });
  const importName = h("input", { type: "text", placeholder: "name for the imported vector" });
  const importBtn = h("button", { type: "submit" }, "Import");
  let list = [];
  let selected = params.get("vector");

  async function refresh() {
    list = await vectors(true);
    if (!list.length) {
      table.replaceChildren(emptyState("No vectors yet. ", h("a", { href: "#/traits" }, "Extract one from a trait"), " or import a file."));
      detail.replaceChildren();
      return;
    }
    if (!list.some((v) => v.name === selected)) selected = list[0].name;
    table.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Name", "Trait", "Kind", "Monitor layer", "Calibrated", "Steering", "Created"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, list.map((v) => h("tr", { class: v.name === selected ? "selected" : "" },
        h("td", {}, h("button", { type: "button", class: "ghost", "aria-pressed": String(v.name === selected), onclick: () => { selected = v.name; refresh(); } }, v.name)),
        h("td", {}, v.traitName || "–"),
        h("td", {}, kindName(v.kind)),
        h("td", {}, v.recommendedLayer ?? "–"),
        h("td", {}, (v.calibration || []).length ? "yes" : "raw only"),
        h("td", {}, v.steering ? `layer ${v.steering.layer ?? 0}, ×${fmt(v.steering.coefficient, 2)}` : "not evaluated"),
        h("td", {}, v.createdUnix ? new Date(+v.createdUnix * 1000).toLocaleString() : "–"))))));
    const v = list.find((x) => x.name === selected);
    detail.replaceChildren(...vectorDetail(v, refresh));
  }

  async function importFile() {
    const f = file.files?.[0];
    if (!f) throw new Error("choose a file to import");
    const bytes = new Uint8Array(await f.arrayBuffer());
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    const name = importName.value.trim() || f.name.replace(/\.[^.]+$/, "");
    const res = await call("ImportVector", { name, data: btoa(bin) });
    selected = res.info?.name || name;
    await refresh();
  }

  root.append(table, detail,
    h("form", { class: "panel", onsubmit: (e) => { e.preventDefault(); busy(importBtn, importFile); } },
      h("h2", {}, "Import"),
      h("div", { class: "row" }, field("File (safetensors, GGUF control vector or .pt)", file, { grow: true }), field("Name", importName, { grow: true }), importBtn)));
  await refresh();
}

function vectorDetail(v, refresh) {
  if (!v) return [];
  const scores = v.layerScores || [];
  const cal = v.calibration || [];
  const charts = [];
  if (scores.length) {
    charts.push(lineChart([
      { name: "Cohen's d", color: "#7c3aed", points: scores.map((s) => [s.layer ?? 0, s.cohensD ?? 0]) },
      { name: "AUROC", color: "#059669", axis: "right", points: scores.map((s) => [s.layer ?? 0, s.auroc ?? 0]) },
    ], { title: "Separation by layer", xLabel: "layer", yLabel: "Cohen's d", y2Label: "AUROC", y2Range: [0.4, 1.02],
      marks: v.recommendedLayer !== undefined ? [{ x: v.recommendedLayer, label: "monitoring", color: "#15803d" }] : [],
      desc: `Cohen's d and AUROC of held-out rollouts per layer for ${v.name}` }));
  }
  if (cal.length) {
    const side = (c, s) => c.response?.[s]?.mean ?? 0;
    charts.push(lineChart([
      { name: "trait side (100)", color: "#c2410c", points: cal.map((c) => [c.layer ?? 0, side(c, "pos")]) },
      { name: "helpful side (0)", color: "#2563eb", points: cal.map((c) => [c.layer ?? 0, side(c, "neg")]) },
    ], { title: "Calibration: mean projection of each side", xLabel: "layer", yLabel: "projection",
      desc: `Where helpful and trait rollouts project at each layer for ${v.name}` }));
  }
  const confirmDelete = h("dialog", { "aria-labelledby": `del-${v.name}` },
    h("form", { method: "dialog" },
      h("h2", { id: `del-${v.name}` }, `Delete ${v.name}?`),
      h("p", {}, "The vector file is removed from the store; this cannot be undone. Export it first to keep a copy."),
      h("div", { class: "row end" }, h("button", { value: "cancel", class: "ghost", type: "submit", autofocus: true }, "Cancel"),
        h("button", { value: "delete", class: "danger", type: "submit" }, "Delete"))));
  confirmDelete.addEventListener("close", async () => {
    if (confirmDelete.returnValue !== "delete") return;
    try {
      await call("DeleteVector", { name: v.name });
      await refresh();
    } catch (e) { showError(e); }
  });
  const exportBtn = h("button", { type: "button", class: "ghost" }, "Export safetensors");
  exportBtn.addEventListener("click", () => busy(exportBtn, async () => {
    const res = await call("ExportVector", { name: v.name, format: "VECTOR_FORMAT_SAFETENSORS" });
    const bin = atob(res.data || "");
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const a = h("a", { href: URL.createObjectURL(new Blob([bytes])), download: `${v.name}.${res.extension || "safetensors"}` });
    document.body.append(a);
    a.click();
    a.remove();
  }));
  return [
    h("section", { class: "panel", "aria-labelledby": "vec-title" },
      h("div", { class: "row", style: "justify-content:space-between;align-items:center" },
        h("h2", { id: "vec-title", style: "margin:0" }, v.name, h("span", { class: "badge" }, kindName(v.kind))),
        h("div", { class: "row" },
          h("a", { href: `#/playground/vector=${encodeURIComponent(v.name)}` }, "Steer"),
          h("a", { href: `#/spectrum/vector=${encodeURIComponent(v.name)}` }, "Spectrum"),
          h("a", { href: `#/sweep/vector=${encodeURIComponent(v.name)}` }, "Sweep"),
          exportBtn, h("button", { type: "button", class: "danger", onclick: () => confirmDelete.showModal() }, "Delete…"))),
      h("div", { class: "meta" }, h("span", {}, `model ${v.model}`), h("span", {}, `${v.nRows} × ${v.dModel}`),
        v.description ? h("span", {}, v.description) : null),
      charts.length ? h("div", { class: "grid2", style: "margin-top:12px" }, charts)
        : h("p", { class: "muted" }, "No per-layer statistics: the vector was imported or put, not extracted here (raw scores only)."),
      confirmDelete),
  ];
}
