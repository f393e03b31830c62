"""Backends a user may have installed, as :func:`lfm2np.oracle.conformance_run.run_pack` plays them: llama.cpp
(through llama-cpp-python) and transformers (torch). Each library is imported inside the backend that needs it:
the conformance kit needs neither.

- :class:`LlamaCppBackend` runs a GGUF with llama-cpp-python's C API: one context whose KV cache is F32 unless
  asked otherwise (llama.cpp's F16 default alone moves the logits by about 5e-4 of their scale, past the fp32
  tier) and no flash attention unless asked (llama.cpp's "auto" turns it on, and on the CPU it moves the logits
  by about 2e-4 of their scale: measured on the embedded model), one sequence id per sequence of a case, every
  position's logits. A rollback removes the positions with
  ``llama_memory_seq_rm`` (the context keeps recurrent-state snapshots for it, ``n_rs_seq``); where llama.cpp
  refuses, the sequence is cleared and its kept tokens fed again, and ``results.json`` says so. It also writes
  ``data/llamacpp-<model>.bin`` and ``-tokens.bin`` as llama.cpp's ``llama-logits`` does for the pack's llama.cpp
  prompt (tokenized by llama.cpp: BOS added, special tokens parsed).
- :class:`TransformersBackend` runs a checkpoint directory in float32 with eager attention; each feed continues the
  model's cache (``past_key_values``); a rollback recomputes the kept prefix (transformers' cache has no
  rollback for the conv state); sequences of a batch run one by one. Its trace is the hidden states.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import Lfm2npError
from ..io.gguf import read_gguf_config
from .conformance import Pack, config_hash
from .conformance_cases import play

#: ggml type ids of the KV cache types the adapter offers
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}


class LlamaCppBackend:
    """llama.cpp on a GGUF file (see the module docstring)."""

    def __init__(self, gguf: "str | Path", kv: str = "f32", threads: int | None = None, flash_attn: bool = False):
        try:
            import llama_cpp  # noqa: PLC0415 (optional: llama-cpp-python)
        except ImportError:
            raise Lfm2npError("the llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
        if kv not in KV_TYPES:
            raise Lfm2npError(f"KV cache type {kv!r}; expected one of {', '.join(KV_TYPES)}")
        self.lib, self.path, self.kv, self.threads, self.flash = llama_cpp, Path(gguf), kv, threads or 2, flash_attn
        self.name = f"llama.cpp (llama-cpp-python {getattr(llama_cpp, '__version__', '?')})"
        self.config_hash = config_hash(read_gguf_config(self.path))
        self._quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept: llama.cpp calls it later
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise Lfm2npError(f"{self.path}: llama.cpp cannot load it")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.details = {"kv_cache": kv, "flash_attention": flash_attn, "gguf": str(self.path), "rollback": []}

    def _context(self, n_ctx: int, n_batch: int, n_seq: int, n_rs: int):
        lib = self.lib
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = max(64, n_ctx), max(8, n_batch), max(8, n_batch), n_seq
        p.n_rs_seq = n_rs
        p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = KV_TYPES[self.kv]
        p.kv_unified = True
        p.flash_attn_type = 1 if self.flash else 0  # llama.cpp's "auto" turns it on: on the CPU it rounds through f16
        ctx = lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise Lfm2npError(f"{self.path}: llama.cpp cannot create a context ({n_ctx} positions, {n_seq} sequences)")
        return ctx

    def _decode(self, ctx, entries: list[tuple[int, list[int], int]]) -> list[np.ndarray]:
        """One llama_decode of several sequences' tokens: ``(seq, ids, first position)`` each; their logits."""
        lib = self.lib
        n = sum(len(ids) for _, ids, _ in entries)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            i = 0
            for seq, ids, start in entries:
                for j, token in enumerate(ids):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + j, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, 1
                    i += 1
            batch.n_tokens = n
            if lib.llama_decode(ctx, batch) != 0:
                raise Lfm2npError(f"{self.path}: llama_decode failed")
            out, i = [], 0
            for _, ids, _ in entries:
                rows = [np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i + j), (self.n_vocab,)).copy()
                        for j in range(len(ids))]
                out.append(np.stack(rows))
                i += len(ids)
            return out
        finally:
            lib.llama_batch_free(batch)

    def play(self, steps: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        lib = self.lib
        feeds = play(steps)
        seqs = sorted({f.seq for f in feeds})
        n_rs = max([s["n"] for s in steps if s["op"] == "rollback"] or [0])
        longest = max(len(f.sequence) for f in feeds)  # a rollback may feed a whole sequence again
        ctx = self._context(len(seqs) * (longest + 8), max(longest, max(
            sum(len(e["ids"]) for e in (s["feeds"] if s["op"] == "batch" else [s])) for s in steps
            if s["op"] != "rollback")), len(seqs), n_rs)
        try:
            mem, held, out = lib.llama_get_memory(ctx), {s: [] for s in seqs}, {}
            for step in steps:
                if step["op"] == "rollback":
                    seq, keep = step["seq"], len(held[step["seq"]]) - step["n"]
                    if lib.llama_memory_seq_rm(mem, seq, keep, -1):
                        self.details["rollback"].append("llama_memory_seq_rm")
                    else:  # llama.cpp cannot cut this sequence's recurrent state here: feed its kept tokens again
                        lib.llama_memory_seq_rm(mem, seq, -1, -1)
                        if keep:
                            self._decode(ctx, [(seq, held[seq][:keep], 0)])
                        self.details["rollback"].append("re-fed")
                    held[seq] = held[seq][:keep]
                    continue
                entries = step["feeds"] if step["op"] == "batch" else [step]
                logits = self._decode(ctx, [(e["seq"], e["ids"], len(held[e["seq"]])) for e in entries])
                for e, rows in zip(entries, logits):
                    out[f"logits.{len(out)}"] = rows
                    held[e["seq"]] = held[e["seq"]] + list(e["ids"])
            return out
        finally:
            lib.llama_free(ctx)

    def trace(self, ids: list[int]) -> None:
        return None  # llama.cpp's intermediates: tools/dump_llama_cpp_trace.py and `lfm2np compare`

    def operator(self, case: dict[str, Any], inputs: dict[str, np.ndarray]) -> None:
        return None

    def finish(self, pack: Pack, out: Path) -> None:
        """``data/llamacpp-<model>.bin`` and ``-tokens.bin`` for the pack's llama.cpp prompt, as llama-logits
        writes them (llama.cpp's own tokenization of the text: BOS added, special tokens parsed)."""
        case = pack.by_id.get("llama.cpp")
        if case is None:
            return
        text = case["text"].encode()
        buf = (self.lib.llama_token * (len(text) + 8))()
        n = self.lib.llama_tokenize(self.vocab, text, len(text), buf, len(buf), True, True)
        if n < 0:
            raise Lfm2npError(f"llama.cpp cannot tokenize the pack's llama.cpp prompt ({n})")
        ids = list(buf[:n])
        logits = self.play([{"op": "feed", "seq": 0, "ids": ids}])["logits.0"]
        (out / "data").mkdir(exist_ok=True)
        stem = out / "data" / f"llamacpp-{self.path.name[:-5] if self.path.name.endswith('.gguf') else self.path.name}"
        np.asarray(logits[-1], np.float32).tofile(f"{stem}.bin")
        np.asarray(ids, np.int32).tofile(f"{stem}-tokens.bin")


class TransformersBackend:
    """transformers on a checkpoint directory (see the module docstring)."""

    def __init__(self, directory: "str | Path"):
        try:
            import torch  # noqa: PLC0415 (optional: the reference extra)
            import transformers  # noqa: PLC0415
        except ImportError:
            raise Lfm2npError("the transformers backend needs torch and transformers: pip install "
                              "'lfm2np[reference]'") from None
        self.torch, self.directory = torch, Path(directory)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(self.directory), dtype=torch.float32, attn_implementation="eager").eval()
        self.config_hash = config_hash(Config.from_dict(json.loads((self.directory / "config.json").read_text())))
        self.name = f"transformers {transformers.__version__} (torch {torch.__version__})"
        self.details = {"dtype": "float32", "attention": "eager", "rollback": "recomputed", "batch": "one by one"}

    def _run(self, ids: list[int], past: Any, start: int) -> tuple[np.ndarray, Any]:
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor([ids])
            pos = torch.arange(start, start + len(ids))[None]
            r = self.model(input_ids=x, past_key_values=past, use_cache=True, position_ids=pos,
                           cache_position=pos[0])
        return r.logits[0].float().numpy(), r.past_key_values

    def play(self, steps: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        held: dict[int, list[int]] = {}
        past: dict[int, Any] = {}
        out: dict[str, np.ndarray] = {}
        for step in steps:
            if step["op"] == "rollback":
                seq = step["seq"]
                held[seq] = held[seq][: len(held[seq]) - step["n"]]
                past[seq] = self._run(held[seq], None, 0)[1] if held[seq] else None
                continue
            for e in step["feeds"] if step["op"] == "batch" else [step]:
                seq = e["seq"]
                logits, past[seq] = self._run(list(e["ids"]), past.get(seq), len(held.get(seq, [])))
                held[seq] = held.get(seq, []) + list(e["ids"])
                out[f"logits.{len(out)}"] = logits
        return out

    def trace(self, ids: list[int]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            r = self.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        states = [h[0].float().numpy() for h in r.hidden_states]
        out = {"model.embed_tokens": states[0]}
        out.update({f"model.layers.{i}": h for i, h in enumerate(states[1:-1])})
        out["model.embedding_norm"] = states[-1]  # transformers' last hidden state is the final norm's output
        return out

    def operator(self, case: dict[str, Any], inputs: dict[str, np.ndarray]) -> None:
        return None
