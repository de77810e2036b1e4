"""PyTorch + PEFT side of scripts/bench-train-vs-torch and scripts/experiment-preventative.

  torch_lora.py train GGUF DATA.jsonl STEPS BATCH THREADS
      LoRA SFT as persona-steer runs it; prints tokens_per_second.
  torch_lora.py interop GGUF DATA.jsonl ADAPTER_DIR HTTP_URL BASE_ID TUNED_ID
      PEFT loads ADAPTER_DIR; per-token log-probabilities of answers from DATA under PEFT and
      from persona-steer's ScoreText on the served base and tuned models, compared.
"""
import json
import os
import random
import sys
import time
import urllib.request

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(gguf):
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    return tok, model


def samples(path):
    out = []
    for line in open(path):
        if line.strip():
            msgs = json.loads(line)["messages"]
            out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def encode(tok, prompt_msgs, answer, max_len=256):
    prompt = tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False).input_ids
    a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = (p + a)[:max_len]
    return ids, len(p)


def train(gguf, data, steps, batch, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok, model = load(gguf)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rows = [encode(tok, p, a) for p, a in samples(data)]
    rng = random.Random(1)
    order = []
    tokens, started = 0, time.time()
    for step in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(rows)), len(rows))
        chosen, order = order[:batch], order[batch:]
        length = max(len(rows[i][0]) for i in chosen)
        ids = torch.zeros((batch, length), dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for r, i in enumerate(chosen):
            seq, plen = rows[i]
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            labels[r, plen:len(seq)] = torch.tensor(seq[plen:])
            tokens += len(seq)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        print(f"step {step + 1}/{steps} loss {loss.item():.4f} {tokens / (time.time() - started):.0f} tok/s",
              file=sys.stderr)
    print(f"tokens_per_second {tokens / (time.time() - started):.1f}")


def score_text(url, model, prompt_msgs, answer_ids):
    body = json.dumps({"model": model, "prompt": {"chat": {"messages": prompt_msgs}},
                       "responseTokenIds": answer_ids}).encode()
    req = urllib.request.Request(f"{url}/api/v1/ScoreText", data=body, headers={"content-type": "application/json"})
    return [t["logprob"] for t in json.load(urllib.request.urlopen(req))["tokens"]]


def interop(gguf, data, adapter, url, base_id, tuned_id):
    torch.set_num_threads(2)
    tok, model = load(gguf)
    model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    diffs_tuned, diffs_base, n = 0.0, 0.0, 0
    for prompt_msgs, answer in samples(data)[:8]:
        ids, plen = encode(tok, prompt_msgs, answer)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        peft_lp = [lp[p - 1, ids[p]].item() for p in range(plen, len(ids))]
        ours_tuned = score_text(url, tuned_id, prompt_msgs, ids[plen:])
        ours_base = score_text(url, base_id, prompt_msgs, ids[plen:])
        diffs_tuned += sum(abs(a - b) for a, b in zip(peft_lp, ours_tuned))
        diffs_base += sum(abs(a - b) for a, b in zip(peft_lp, ours_base))
        n += len(peft_lp)
    print(f"mean |log-prob difference| per answer token over {n} tokens: PEFT vs persona-steer serving the adapter "
          f"{diffs_tuned / n:.4f}; PEFT vs the base model {diffs_base / n:.4f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "train":
        train(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif cmd == "interop":
        interop(*args)
    else:
        sys.exit(f"unknown command {cmd}")
