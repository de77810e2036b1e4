// The console's shell: hash routes to pages, the API key dialog, the model name.

import { apiKey, setApiKey } from "./api.js";
import { models, showError } from "./ui.js";
import * as playground from "./pages/playground.js";
import * as spectrum from "./pages/spectrum.js";
import * as sweep from "./pages/sweep.js";
import * as vectors from "./pages/vectors.js";
import * as traits from "./pages/traits.js";
import * as monitor from "./pages/monitor.js";

const pages = { playground, spectrum, sweep, vectors, traits, monitor };
let cleanup = null;

async function route() {
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "playground").split("/");
  const page = pages[name] || playground;
  const params = new URLSearchParams(rest.join("/"));
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${name}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (cleanup) cleanup();
  cleanup = null;
  showError(null);
  const main = document.getElementById("main");
  main.replaceChildren();
  document.title = `${page.title} · persona-steer`;
  try {
    cleanup = (await page.render(main, params)) || null;
  } catch (e) {
    showError(e);
  }
}

function keyDialog() {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-button").addEventListener("click", () => {
    input.value = apiKey();
    dialog.showModal();
  });
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") setApiKey(input.value.trim());
    if (dialog.returnValue === "clear") setApiKey("");
    updateKeyButton();
    if (dialog.returnValue) route();
  });
}

function updateKeyButton() {
  document.getElementById("key-button").textContent = apiKey() ? "API key ✓" : "API key";
}

async function modelName() {
  try {
    const m = (await models()).find((x) => x.isDefault);
    if (m) document.getElementById("model-name").textContent = `${m.id} · ${m.nLayers} layers · ${m.device}`;
  } catch (_) { /* shown by the page */ }
}

keyDialog();
updateKeyButton();
window.addEventListener("hashchange", route);
route();
modelName();
