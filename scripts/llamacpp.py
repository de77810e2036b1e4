"""llama.cpp through llama-cpp-python, shared by the benchmarks that compare against it.

`ensure_venv()` installs llama-cpp-python (built from source) into a virtual environment under
~/.cache/persona-steer and re-runs the calling script inside it; `LlamaCpp` drives one context
through the low-level API: greedy generation over several sequences, control vectors, and every
position's logits for a token window.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("PERSONA_CACHE", Path.home() / ".cache" / "persona-steer"))
VENV = CACHE / "llamacpp-venv"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def _avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512_vnni", "avx512vbmi", "avx512_bf16"))


# The host's SIMD up to AVX-512 (VNNI, BF16), but not AMX: with -march=native on a Sapphire Rapids
# VM, ggml's AMX matmul crashed (SIGSEGV in ggml_backend_amx_mul_mat) on any multi-token batch.
# Our kernels use no AMX either, so both engines compare on the same instruction sets.
CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON "
              "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" + ("" if not _avx512() else
              " -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON"))


def ensure_venv() -> None:
    """Re-runs this script inside the venv that has llama_cpp, creating it when needed."""
    try:
        import llama_cpp  # noqa: F401

        return
    except ImportError:
        pass
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        sys.exit("llama_cpp is not importable even inside the venv; see the pip output above")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True)
    marker = VENV / "persona-cmake-args"
    built_with = marker.read_text() if marker.exists() else ""
    if probe.returncode != 0 or built_with != CMAKE_ARGS:
        print(f"== installing {LLAMA_CPP_PYTHON} (builds llama.cpp from source; several minutes)", flush=True)
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2), CMAKE_ARGS=CMAKE_ARGS)
        # --no-cache-dir: a wheel cached from other build flags must not be reused.
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps",
                        "--no-cache-dir", LLAMA_CPP_PYTHON], check=True, env=env)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", LLAMA_CPP_PYTHON], check=True, env=env)
        marker.write_text(CMAKE_ARGS)
    os.execv(str(python), [str(python), *sys.argv])


_LOG_CALLBACK = None


def quiet_logs(lc) -> None:
    """Silences llama.cpp's loader chatter (kept alive for the process: C holds the pointer)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = lc.llama_log_callback(lambda level, text, user_data: None)
        lc.llama_log_set(_LOG_CALLBACK, None)


class LlamaCpp:
    """Greedy generation on llama.cpp's low-level API: one context, up to n_seq sequences."""

    def __init__(self, model: Path, threads: int, n_seq: int, n_ctx: int):
        import llama_cpp as lc

        self.lc = lc
        quiet_logs(lc)
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(model).encode(), mparams)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(512, n_ctx)
        cparams.n_ubatch = 512
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_layer = lc.llama_model_n_layer(self.model)
        self.batch = lc.llama_batch_init(cparams.n_batch, 0, n_seq)

    def tokenize(self, text: str) -> list:
        lc = self.lc
        raw = text.encode()
        buf = (lc.llama_token * (len(raw) + 16))()
        n = lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        return list(buf[:n])

    def set_control_vector(self, layer: int, vector: list, coefficient: float) -> None:
        """Adds coefficient * vector where persona-steer's `layer` does: to residual row
        `layer`, the output of block `layer - 1`. llama.cpp's control vectors are global:
        every sequence of the context gets it. Its buffer row il - 1 is added to the output of
        block il (0-based), and only for il_start <= il <= il_end."""
        import ctypes

        lc = self.lc
        il = layer - 1
        if il < 1:
            raise ValueError("llama.cpp control vectors start after block 1 (layer >= 2)")
        data = [0.0] * (self.n_embd * self.n_layer)
        start = (il - 1) * self.n_embd
        data[start:start + self.n_embd] = [coefficient * x for x in vector]
        arr = (ctypes.c_float * len(data))(*data)
        apply = getattr(lc, "llama_set_adapter_cvec", None) or getattr(lc, "llama_apply_adapter_cvec")
        rc = apply(self.ctx, arr, len(data), self.n_embd, il, il)
        if rc != 0:
            raise RuntimeError(f"control vector apply failed ({rc})")

    def clear(self) -> None:
        lc = self.lc
        mem = lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(mem, True)

    def _decode(self, entries) -> None:
        """entries: (token, position, seq_id, wants_logits)."""
        lc = self.lc
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def generate(self, prompts: list, max_tokens: int) -> dict:
        """Greedy-decodes every prompt as its own sequence; returns timings and counts."""
        lc = self.lc
        self.clear()
        t0 = time.perf_counter()
        entries, last = [], []
        for seq, p in enumerate(prompts):
            for j, tok in enumerate(p):
                entries.append((tok, j, seq, j == len(p) - 1))
            last.append(len(entries) - 1)
        # Prefill in n_batch slices.
        outs = {}
        for s in range(0, len(entries), self.batch_cap()):
            chunk = entries[s:s + self.batch_cap()]
            self._decode(chunk)
            for k, (_, _, seq, wants) in enumerate(chunk):
                if wants:
                    outs[seq] = self._argmax(k)
        t_prefill = time.perf_counter()
        pos = [len(p) for p in prompts]
        nxt = [outs[s] for s in range(len(prompts))]
        alive = [not lc.llama_vocab_is_eog(self.vocab, t) for t in nxt]
        generated = [1] * len(prompts)
        while any(alive):
            batch = [(nxt[s], pos[s], s, True) for s in range(len(prompts)) if alive[s] and generated[s] < max_tokens]
            if not batch:
                break
            self._decode(batch)
            for k, (_, _, s, _) in enumerate(batch):
                pos[s] += 1
                nxt[s] = self._argmax(k)
                generated[s] += 1
                if lc.llama_vocab_is_eog(self.vocab, nxt[s]):
                    alive[s] = False
        t_end = time.perf_counter()
        return {
            "prompt_tokens": sum(len(p) for p in prompts),
            "generated": sum(generated),
            "prefill_s": t_prefill - t0,
            "decode_s": t_end - t_prefill,
            "wall_s": t_end - t0,
            "steps": max(generated) - 1,
        }

    def batch_cap(self) -> int:
        return 512

    def all_logits(self, tokens: list):
        """Logits at every position of `tokens`, evaluated as one fresh sequence: `[n, vocab]` f32."""
        import numpy as np

        self.clear()
        rows = []
        for s in range(0, len(tokens), self.batch_cap()):
            chunk = [(t, s + j, 0, True) for j, t in enumerate(tokens[s:s + self.batch_cap()])]
            self._decode(chunk)
            for k in range(len(chunk)):
                ptr = self.lc.llama_get_logits_ith(self.ctx, k)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return np.stack(rows).astype(np.float32)
