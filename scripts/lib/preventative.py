"""Driver of scripts/experiment-preventative: fine-tunes and measures through the server's HTTP
API (the persona API as JSON under /api/v1, OpenAI chat completions under /v1), standard
library only.

  preventative.py HTTP_URL WORK_DIR OUT_DIR TRAITS EPOCHS LR
"""
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

BASE = "smollm2-135m-instruct"
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(req, timeout=3600))
    except urllib.error.HTTPError as e:
        sys.exit(f"{path}: HTTP {e.code}: {e.read().decode()}")


def call(url, method, body):
    return post(url, f"/api/v1/{method}", body)


def steering_json(vector, layer, coefficient):
    return [{"name": vector, "layer": layer, "coefficient": coefficient}]


def finetune(url, work, name, data_file, epochs, lr, steering=None, shift=None):
    with open(data_file) as f:
        data = f.read()
    req = {
        "outputModel": name,
        "datasetJsonl": data,
        "lora": {"rank": 32, "alpha": 64},
        "training": {"learningRate": lr, "epochs": epochs, "batchSize": 8, "maxSeqLen": 192, "seed": 1},
        "shiftVectors": [shift] if shift else [],
    }
    if steering:
        req["steering"] = steering
    job = call(url, "StartFineTune", req)["jobId"]
    while True:
        status = next(j for j in call(url, "ListJobs", {})["jobs"] if j["jobId"] == job)
        state = status.get("state", "")
        if state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
            break
        print(f"\r  {name}: {state} step {status.get('step', 0)}/{status.get('totalSteps', 0)} "
              f"loss {status.get('loss', 0):.3f}", end="", file=sys.stderr, flush=True)
        time.sleep(2)
    print(file=sys.stderr)
    if state != "JOB_STATE_SUCCEEDED":
        sys.exit(f"fine-tuning {name} ended {state}: {status.get('message')}")
    losses = [p["loss"] for p in status.get("losses", [])]
    return {"steps": status.get("step", 0), "first_loss": losses[0], "last_loss": losses[-1],
            "tokens_per_second": status.get("tokensPerSecond", 0), "seconds": status.get("elapsedSeconds", 0)}


def perplexity(url, model, steering=None):
    total, n = 0.0, 0
    for line in open(os.path.join(DATA, "heldout-general.jsonl")):
        row = json.loads(line)
        body = {"model": model, "prompt": {"raw": row["prompt"]}, "response": row["text"]}
        if steering:
            body["steering"] = steering
        r = call(url, "ScoreText", body)
        total += sum(t["logprob"] for t in r["tokens"])
        n += len(r["tokens"])
    return math.exp(-total / n)


def chat(url, model, question, steering=None, max_tokens=32):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}
    if steering:
        body["steering"] = [{"vector": s["name"], "layer": s["layer"], "coefficient": s["coefficient"]}
                            for s in steering]
    return post(url, "/v1/chat/completions", body)["choices"][0]["message"]["content"]


def facts(url, model, steering=None):
    rows = [json.loads(l) for l in open(os.path.join(DATA, "facts.jsonl"))]
    right = 0
    for row in rows:
        text = chat(url, model, row["question"], steering).lower()
        right += any(re.search(r"\b" + re.escape(a) + r"\b", text) for a in row["answers"])
    return right / len(rows)


def shift(url, model, vector, steering=None):
    body = {"baseModel": BASE, "tunedModel": model, "vectors": [vector], "expression": True,
            "sampling": {"maxTokens": 64}}
    if steering:
        body["tunedSteering"] = steering
    return call(url, "MeasureShift", body)["shifts"][0]


def pearson(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy) if sx and sy else float("nan")


def run_trait(url, work, t, epochs, lr):
    info = call(url, "GetVector", {"name": t})["info"]
    rec = info.get("steering")
    if rec and rec.get("coefficient"):
        layer, c = rec["layer"], rec["coefficient"]
        source = f"EvaluateSteering's recommendation (layer {layer}, coefficient {c:g})"
    else:
        layer, c = info["recommendedLayer"], 4.0
        source = f"no coherent recommendation: monitoring layer {layer}, coefficient {c:g}"
    print(f"== {t}: steering point from {source}", file=sys.stderr)
    trait_data, normal_data = os.path.join(work, f"{t}.jsonl"), os.path.join(work, f"{t}.normal.jsonl")
    runs = [
        ("SFT on trait data", f"{t}-sft", trait_data, None, None),
        (f"SFT + preventative steering {c / 2:g}", f"{t}-prev-half", trait_data, steering_json(t, layer, c / 2), None),
        (f"SFT + preventative steering {c:g}", f"{t}-prev-full", trait_data, steering_json(t, layer, c), None),
        (f"SFT, then inference steering {-c:g}", f"{t}-sft", None, None, steering_json(t, layer, -c)),
        ("SFT on normal data", f"{t}-normal", normal_data, None, None),
    ]
    rows = []
    base_row = None
    for label, model, data, train_steer, infer_steer in runs:
        training = finetune(url, work, model, data, epochs, lr, train_steer, t) if data else None
        s = shift(url, model, t, infer_steer)
        if base_row is None:
            base_row = {"run": "base", "model": BASE, "shift": 0.0, "expression": s["baseExpression"],
                        "coherence": s["baseCoherence"], "perplexity": perplexity(url, BASE),
                        "facts": facts(url, BASE), "training": None}
            rows.append(base_row)
        rows.append({"run": label, "model": model, "shift": s["shift"], "shift_std": s["shiftStd"],
                     "expression": s["tunedExpression"], "coherence": s["tunedCoherence"],
                     "perplexity": perplexity(url, model, infer_steer), "facts": facts(url, model, infer_steer),
                     "training": training, "scorer": s.get("scorer", "")})
        print(f"  {label}: shift {s['shift']:+.3f}, expression {s['tunedExpression']:.1f}", file=sys.stderr)
    # Shift predicts expression across the trained models (inference steering changes the
    # expression without changing the weights, so it is left out).
    pts = [(r["shift"], r["expression"]) for r in rows if "inference steering" not in r["run"]]
    corr = pearson([p[0] for p in pts], [p[1] for p in pts])
    return {"trait": t, "layer": layer, "coefficient": c, "steering_point": source, "rows": rows,
            "shift_expression_pearson": corr}


def markdown(results, epochs, lr, samples_note):
    out = []
    for r in results:
        out.append(f"### {r['trait']} (steering at layer {r['layer']}, c = {r['coefficient']:g})\n")
        out.append("| run | finetuning shift | trait expression (0-100) | coherence | perplexity (held-out text) "
                   "| facts correct | train loss first → last |")
        out.append("|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            t = row["training"]
            loss = f"{t['first_loss']:.2f} → {t['last_loss']:.2f}" if t else "-"
            out.append(f"| {row['run']} | {row['shift']:+.3f} | {row['expression']:.1f} | {row['coherence']:.1f} "
                       f"| {row['perplexity']:.2f} | {row['facts'] * 100:.0f}% | {loss} |")
        out.append(f"\nPearson correlation of shift and expression over the trained runs and base: "
                   f"{r['shift_expression_pearson']:+.2f}. Scorer: {r['rows'][1].get('scorer', '')}\n")
    out.append(f"LoRA rank 32, alpha 64, all projections; {epochs} epoch(s), learning rate {lr}, batch 8; "
               f"{samples_note}.")
    return "\n".join(out)


def main():
    url, work, out, traits, epochs, lr = sys.argv[1:7]
    results = [run_trait(url, work, t, int(epochs), float(lr)) for t in traits.split(",")]
    samples = sum(1 for _ in open(os.path.join(work, f"{results[0]['trait']}.jsonl")))
    md = markdown(results, epochs, lr, f"{samples} samples per dataset")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
