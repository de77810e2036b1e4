// Calls to the server's HTTP API: the persona API as JSON (/api/v1/<Method>), its server-sent
// event streams, and the OpenAI-compatible chat endpoint.

const KEY = "persona-steer.api-key";

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** An error the server answered, with its HTTP status. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body.error?.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  if (res.status === 401) message += " — set an API key (top right)";
  return new ApiError(res.status, message);
}

/** A unary call: the response message. */
export async function call(method, body = {}, signal) {
  const res = await fetch(`/api/v1/${method}`, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw await failure(res);
  return res.json();
}

/** Reads server-sent events from a response, calling onEvent(data, eventName) per event. */
async function readEvents(res, onEvent) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(data.join("\n"), event);
    }
  }
}

/** A server-streaming call: onMessage(message) per message; rejects on an error event. */
export async function stream(method, body, onMessage, signal) {
  const res = await fetch(`/api/v1/${method}`, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!res.ok) throw await failure(res);
  let error = null;
  await readEvents(res, (data, event) => {
    const msg = JSON.parse(data);
    if (event === "error" || msg.error) error = new ApiError(500, msg.error?.message || "stream failed");
    else onMessage(msg);
  });
  if (error) throw error;
}

/** A streamed OpenAI chat completion: onChunk(chunk) per chunk until [DONE]. */
export async function chatStream(body, onChunk, signal) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!res.ok) throw await failure(res);
  let error = null;
  await readEvents(res, (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) error = new ApiError(500, chunk.error.message);
    else onChunk(chunk);
  });
  if (error) throw error;
}

/** The live feed of monitored generations: onEvent(event) per event until aborted. */
export async function live(onEvent, signal) {
  const res = await fetch("/api/live", { headers: headers(), signal });
  if (!res.ok) throw await failure(res);
  await readEvents(res, (data, event) => {
    if (event === "message") onEvent(JSON.parse(data));
  });
}
