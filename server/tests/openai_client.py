"""Drives persona-steer's HTTP API with the official `openai` package (server/tests/http_api.rs).

Usage: openai_client.py <base_url> <vector> <layer> <coefficient> [<keyed_base_url> <generate_key> <read_key>]

Prints one JSON object: for each case the generated tokens (from the log-probabilities, one per
generated token) and what the replies carried; the Rust test compares them with gRPC Generate.
"""

import json
import sys

import openai

base, vector, layer, coefficient = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
QUESTION = "What should I do if I find a lost wallet?"
out = {}


def chat_messages():
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": QUESTION}]


# 1. Non-streaming greedy chat with log-probabilities.
r = client.chat.completions.create(
    model="", messages=chat_messages(), max_tokens=24, temperature=0, logprobs=True, top_logprobs=3
)
out["chat"] = {
    "text": r.choices[0].message.content,
    "tokens": [t.token for t in r.choices[0].logprobs.content],
    "top": [len(t.top_logprobs) for t in r.choices[0].logprobs.content],
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(),
    "object": r.object,
}

# 2. The same, streamed, with usage in a last chunk.
chunks = list(
    client.chat.completions.create(
        model="",
        messages=chat_messages(),
        max_tokens=24,
        temperature=0,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
)
content = [c for c in chunks if c.choices and c.choices[0].logprobs]
out["chat_stream"] = {
    "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "tokens": [t.token for c in content for t in c.choices[0].logprobs.content],
    "roles": [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role],
    "finish_reason": [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason],
    "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None,
    "objects": sorted({c.object for c in chunks}),
}

# 3. Steered and monitored, streamed: extra body fields; per-token scores in `persona`.
steer = {
    "steering": [{"vector": vector, "layer": layer, "coefficient": coefficient, "positions": "response"}],
    "monitors": [vector],
    "alert_threshold": -1e9,
}
chunks = list(
    client.chat.completions.create(
        model="", messages=chat_messages(), max_tokens=24, temperature=0, logprobs=True, stream=True, extra_body=steer
    )
)
tokens, scores, prompt_last, summary = [], [], None, None
for c in chunks:
    persona = (c.model_extra or {}).get("persona")
    if c.choices and c.choices[0].logprobs:
        tokens += [t.token for t in c.choices[0].logprobs.content]
        scores.append(persona["scores"][0]["score"])
        if "prompt_last" in persona:
            prompt_last = persona["prompt_last"][0]["score"]
    elif persona and "monitors" in persona:
        summary = persona
out["steered_stream"] = {"tokens": tokens, "scores": scores, "prompt_last": prompt_last, "summary": summary}

# 4. The same request, not streamed: the summary carries every token's score.
r = client.chat.completions.create(
    model="", messages=chat_messages(), max_tokens=24, temperature=0, logprobs=True, extra_body=steer
)
out["steered"] = {
    "tokens": [t.token for t in r.choices[0].logprobs.content],
    "persona": (r.model_extra or {}).get("persona"),
}

# 5. Legacy completions on a raw prompt, streamed and not.
r = client.completions.create(model="", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
out["completion"] = {"text": r.choices[0].text, "tokens": r.choices[0].logprobs.tokens, "object": r.object}
chunks = list(
    client.completions.create(model="", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
)
out["completion_stream"] = {"text": "".join(c.choices[0].text for c in chunks if c.choices)}

# 6. Models.
out["models"] = [m.id for m in client.models.list().data]


# 7. Errors: the openai package raises its typed errors from the HTTP status.
def error_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"status": e.status_code, "class": type(e).__name__, "message": e.message, "body": e.body}
    return None


out["errors"] = {
    "unknown_model": error_of(
        lambda: client.chat.completions.create(model="no-such-model", messages=chat_messages(), max_tokens=2)
    ),
    "n": error_of(lambda: client.chat.completions.create(model="", messages=chat_messages(), max_tokens=2, n=2)),
    "unknown_vector": error_of(
        lambda: client.chat.completions.create(
            model="", messages=chat_messages(), max_tokens=2, extra_body={"steering": [{"vector": "nope", "layer": 3, "coefficient": 1}]}
        )
    ),
    "stream_unknown_model": error_of(
        lambda: list(client.chat.completions.create(model="no-such-model", messages=chat_messages(), max_tokens=2, stream=True))
    ),
}

# 8. With API keys: none, a wrong one, one without the generate scope, the right one.
if len(sys.argv) > 5:
    keyed, generate_key, read_key = sys.argv[5], sys.argv[6], sys.argv[7]

    def keyed_chat(key):
        c = openai.OpenAI(base_url=keyed, api_key=key, max_retries=0, timeout=120)
        return lambda: c.chat.completions.create(model="", messages=chat_messages(), max_tokens=2, temperature=0)

    out["auth"] = {
        "wrong": error_of(keyed_chat("not-a-key")),
        "read_only": error_of(keyed_chat(read_key)),
        "ok": error_of(keyed_chat(generate_key)),
        "read_only_models": [m.id for m in openai.OpenAI(base_url=keyed, api_key=read_key, max_retries=0).models.list().data],
    }

print(json.dumps(out))
