#!/usr/bin/env python
"""Train the tiny LFM2-MoE checkpoint embedded in lfm2np (``lfm2np/data/tiny-lfm2-moe/``).

Reproducible: fixed seed, fixed corpus, fixed number of steps, 2 CPU threads. Needs the ``reference``
extra (torch==2.13.0 CPU, transformers>=5) and jinja2 (a transformers dependency).

Corpus: the help texts every CPython install carries offline, ``pydoc_data.topics.topics``, concatenated
in sorted-key order (one document per topic, ``<|startoftext|>`` text ``<|endoftext|>``), plus synthetic
chat conversations rendered with LFM2's chat template (``tests/data/lfm2_chat_template.jinja``): the user
asks about a topic ("What is the "if" statement?") and the assistant answers with the topic's first
sentences. One topic in 16 (``sorted(topics)[5::16]``) is held out of both for the held-out loss. The
corpus differs between Python versions: ``training.json`` records the Python version and the corpus
SHA-256, and the script warns when they differ from the recorded run.

Steps:
1. train a byte-level BPE tokenizer with ``tokenizers`` whose ids 0-13 are LFM2's special tokens, laid out
   like LFM2's ``tokenizer.json`` (regex split + ByteLevel pre-tokenizer, ByteLevel decoder, BOS added by
   the post-processor);
2. train ``Lfm2MoeForCausalLM`` (float32, AdamW, warmup + cosine) on random windows of the token stream;
   the expert bias is updated with the auxiliary-loss-free load-balancing rule (after every step
   ``b_e += rate * sign(mean_load - load_e)``), so it ends up non-zero and matters for routing;
3. round the weights to bfloat16 and write the checkpoint in the released layout (per-expert
   ``w1/w3/w2``, float32 ``expert_bias``, no ``lm_head.weight``), the tokenizer files and the chat template;
4. reload it with ``from_pretrained`` and check the logits equal the trained model's (bf16-rounded) exactly;
5. sample from it (greedy and temperature, plain and chat prompts) with a cache-free loop and record
   everything in ``training.json``.

Usage:  python tools/train_tiny.py [--out lfm2np/data/tiny-lfm2-moe] [--steps N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = ROOT / "tests" / "data" / "lfm2_chat_template.jinja"
DEFAULT_OUT = ROOT / "lfm2np" / "data" / "tiny-lfm2-moe"

SEED = 20250611
THREADS = 2

SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
]
PAD_ID, BOS_ID, EOT_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 6, 7
VOCAB_SIZE = 3072
# The pre-tokenizer split of LFM2's tokenizer.json (GPT-4 / Llama-3 style), followed by ByteLevel.
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

MODEL = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=6,
    layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention"],
    num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, moe_intermediate_size=128,
    num_dense_layers=1, num_experts=8, num_experts_per_tok=2, use_expert_bias=True, norm_topk_prob=True,
    routed_scaling_factor=1.0, conv_bias=False, conv_L_cache=3, norm_eps=1e-5, max_position_embeddings=2048,
    tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID,
    initializer_range=0.02,
)
ROPE_THETA = 10000.0

TRAIN = dict(steps=700, batch=16, context=256, lr=3e-3, min_lr_ratio=0.05, warmup=40, weight_decay=0.1,
             betas=(0.9, 0.95), grad_clip=1.0, expert_bias_rate=1e-3, eval_every=100)

SYSTEM_PROMPT = "You are a helpful assistant that explains the Python language."
QUESTIONS = ["What is {t}?", "Can you explain {t}?", "Tell me about {t}."]


# ----------------------------------------------------------------------------------------------- corpus
def topic_title_and_answer(text: str, max_chars: int = 300) -> tuple[str, str]:
    """The topic's title line and its first prose sentences (whitespace collapsed)."""
    lines = text.split("\n")
    title = lines[0].strip()
    paras, cur = [], []
    for line in lines[2:]:
        if line.strip() == "":
            if cur:
                paras.append(cur)
                cur = []
            continue
        cur.append(line)
    if cur:
        paras.append(cur)
    prose = []
    for p in paras:
        if p[0].startswith(" ") or (len(p) == 2 and set(p[1].strip()) <= set("=-*")):
            continue  # grammar / code block, or a section heading
        para = " ".join(s.strip() for s in p)
        if para.endswith(":"):  # introduces a grammar rule or an example: end the answer here
            prose.append(para[:-1].rstrip() + ".")
            break
        prose.append(para)
        if sum(len(x) for x in prose) > max_chars:
            break
    words = " ".join(prose)
    sentences = re.split(r"(?<=[.!?])\s+", words)
    answer = ""
    for s in sentences:
        if answer and len(answer) + len(s) > max_chars:
            break
        answer = (answer + " " + s).strip()
    return title, answer


def question_subject(title: str) -> str:
    if len(title) > 1 and title[0].isupper() and not title[1].isupper():
        return title[0].lower() + title[1:]
    return title


def build_corpus(template_text: str):
    import jinja2
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = set(keys[5::16])
    train_keys = [k for k in keys if k not in held]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # what transformers uses
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    template = env.from_string(template_text)

    def render(messages, gen=False):
        return template.render(messages=messages, tools=None, add_generation_prompt=gen,
                               bos_token="<|startoftext|>", eos_token="<|im_end|>")

    docs = ["<|startoftext|>" + topics[k] + "<|endoftext|>" for k in train_keys]
    held_docs = ["<|startoftext|>" + topics[k] + "<|endoftext|>" for k in keys if k in held]
    qa = [(k,) + topic_title_and_answer(topics[k]) for k in train_keys]
    qa = [x for x in qa if x[2]]
    chats = []
    for i, (k, title, answer) in enumerate(qa):
        for j, q in enumerate(QUESTIONS):
            msgs = []
            if (i + j) % 3 == 0:
                msgs.append({"role": "system", "content": SYSTEM_PROMPT})
            msgs += [{"role": "user", "content": q.format(t=question_subject(title))},
                     {"role": "assistant", "content": answer}]
            if j == 2:  # a second turn about the next topic
                _, t2, a2 = qa[(i + 1) % len(qa)]
                msgs += [{"role": "user", "content": QUESTIONS[0].format(t=question_subject(t2))},
                         {"role": "assistant", "content": a2}]
            chats.append(render(msgs))
    raw = "\x00".join(topics[k] for k in keys).encode()
    info = dict(
        source="pydoc_data.topics.topics (CPython stdlib), values in sorted-key order",
        python=platform.python_version(),
        n_topics=len(keys), n_train_topics=len(train_keys), held_out_topics=sorted(held),
        corpus_chars=sum(len(topics[k]) for k in keys),
        corpus_sha256=hashlib.sha256(raw).hexdigest(),
        n_chats=len(chats),
        chat_recipe=("per training topic, 3 conversations: user asks " + " / ".join(QUESTIONS)
                     + " with the topic's title, assistant answers with its first sentences (<= 300 chars); "
                     "system prompt on one in three; the third also asks about the next topic"),
    )
    return docs, chats, held_docs, info, render


# -------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A <|startoftext|> $B",
                                      special_tokens=[("<|startoftext|>", BOS_ID)]),
    ])
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for probe in ["The \"if\" statement\n****\n\n   x = 1  # naïve café ✓\t", "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(probe, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == probe, probe
    return tok


# ---------------------------------------------------------------------------------------------- model
def set_seed(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hf_config():
    from transformers import Lfm2MoeConfig
    cfg = dict(MODEL)
    return Lfm2MoeConfig(**cfg, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})


def lr_at(step):
    t = TRAIN
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    p = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    return t["lr"] * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * p)))


def eval_loss(model, stream, context, max_windows=64):
    import torch
    n = (len(stream) - 1) // context
    starts = [i * context for i in range(n)][:max_windows]
    losses, weights = [], []
    with torch.no_grad():
        for b in range(0, len(starts), 16):
            x = torch.stack([torch.from_numpy(stream[s:s + context + 1].astype(np.int64)) for s in starts[b:b + 16]])
            out = model(input_ids=x[:, :-1])
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
            losses.append(nll.sum().item())
            weights.append(nll.numel())
    return sum(losses) / sum(weights)


def moe_layers(model):
    return [(i, layer.feed_forward) for i, layer in enumerate(model.model.layers)
            if hasattr(layer.feed_forward, "experts")]


def train(tok, docs, chats, held_docs, steps):
    import torch
    from transformers import Lfm2MoeForCausalLM

    set_seed(SEED)
    rng = np.random.default_rng(SEED)
    # Token stream: plain documents and chats, in a seeded shuffled order.
    pieces = [("doc", d) for d in docs] + [("chat", c) for c in chats]
    order = rng.permutation(len(pieces))
    ids = []
    n_chat_tokens = 0
    for i in order:
        kind, text = pieces[i]
        t = tok.encode(text, add_special_tokens=False).ids
        ids += t
        n_chat_tokens += len(t) if kind == "chat" else 0
    stream = np.array(ids, dtype=np.int32)
    held_stream = np.array(sum((tok.encode(d, add_special_tokens=False).ids for d in held_docs), []), dtype=np.int32)
    print(f"train tokens {len(stream)} (chat {n_chat_tokens}), held-out tokens {len(held_stream)}", flush=True)

    config = hf_config()
    config._attn_implementation = "sdpa"
    model = Lfm2MoeForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params}", flush=True)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=TRAIN["lr"], betas=TRAIN["betas"], eps=1e-8)

    counts = {}
    hooks = []
    for i, ff in moe_layers(model):
        def hook(mod, inp, out, i=i):
            if mod.training:
                counts[i] = counts.get(i, 0) + torch.bincount(out[2].reshape(-1), minlength=mod.num_experts)
        hooks.append(ff.gate.register_forward_hook(hook))

    B, T = TRAIN["batch"], TRAIN["context"]
    history, evals = [], []
    t0, c0 = time.time(), time.process_time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = rng.integers(0, len(stream) - T - 1, size=B)
        x = torch.from_numpy(np.stack([stream[s:s + T + 1] for s in starts]).astype(np.int64))
        counts.clear()
        out = model(input_ids=x[:, :-1])
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free load balancing (selection bias only)
            for i, ff in moe_layers(model):
                c = counts[i].float()
                ff.expert_bias += TRAIN["expert_bias_rate"] * torch.sign(c.mean() - c)
        history.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s wall"
                  f"  {time.process_time() - c0:6.1f}s cpu", flush=True)
        if (step + 1) % TRAIN["eval_every"] == 0 or step == steps - 1:
            model.eval()
            hl = eval_loss(model, held_stream, T)
            model.train()
            evals.append({"step": step + 1, "held_out_loss": round(hl, 4), "elapsed_s": round(time.time() - t0, 1)})
            print(f"      held-out loss {hl:.4f}", flush=True)
    train_time = time.time() - t0
    train_cpu = time.process_time() - c0
    for h in hooks:
        h.remove()
    model.eval()
    return model, stream, held_stream, history, evals, (train_time, train_cpu), n_params, n_chat_tokens


def round_to_bf16_(model):
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        # expert_bias is a float32 buffer on disk too: kept as is.


def released_state_dict(model):
    """Tensors named and shaped as in released LFM2-MoE checkpoints."""
    import torch
    sd = {}
    Fm = MODEL["moe_intermediate_size"]
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and MODEL["tie_word_embeddings"]:
            continue
        if name.endswith("feed_forward.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                sd[f"{prefix}{e}.w1.weight"] = t[e, :Fm].to(torch.bfloat16).contiguous()
                sd[f"{prefix}{e}.w3.weight"] = t[e, Fm:].to(torch.bfloat16).contiguous()
            continue
        if name.endswith("feed_forward.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                sd[f"{prefix}{e}.w2.weight"] = t[e].to(torch.bfloat16).contiguous()
            continue
        if name.endswith("feed_forward.expert_bias"):
            sd[name] = t.to(torch.float32).contiguous()
            continue
        sd[name] = t.to(torch.bfloat16).contiguous()
    return sd


def config_json():
    import transformers
    d = {"architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe"}
    d.update({k: MODEL[k] for k in sorted(MODEL)})
    d["rope_theta"] = ROPE_THETA
    d["torch_dtype"] = "bfloat16"
    d["use_cache"] = True
    d["transformers_version"] = transformers.__version__
    return d


# -------------------------------------------------------------------------------------------- sampling
def sample(model, prompt_ids, n, temperature=0.0, top_k=0, seed=0, stop=()):
    """Cache-free autoregressive loop (each step re-runs the whole prefix)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if temperature <= 0:
                nxt = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = torch.where(logits < kth, torch.full_like(logits, -float("inf")), logits)
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            ids.append(nxt)
            new.append(nxt)
            if nxt in stop:
                break
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help="training steps (default %(default)s)")
    args = ap.parse_args(argv)

    # Idle OpenMP threads sleep instead of spinning: same numbers, but on a shared 2-core machine spinning
    # threads burnt ~3x the CPU time per step. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers
    import tokenizers
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    TRAIN["steps"] = args.steps
    wall0 = time.time()

    template_text = TEMPLATE_PATH.read_text()
    docs, chats, held_docs, corpus_info, render = build_corpus(template_text)
    print(f"corpus: {corpus_info['n_train_topics']} train topics, {len(chats)} chats, "
          f"held out {corpus_info['held_out_topics']}", flush=True)
    prev = args.out / "training.json"
    if prev.exists():
        old = json.loads(prev.read_text()).get("corpus", {})
        if old.get("corpus_sha256") not in (None, corpus_info["corpus_sha256"]):
            print(f"WARNING: corpus differs from the recorded run (Python {old.get('python')} vs "
                  f"{corpus_info['python']}): the result will differ", file=sys.stderr)

    tok = train_tokenizer(docs + chats)
    model, stream, held_stream, history, evals, (train_time, train_cpu), n_params, n_chat_tokens = train(
        tok, docs, chats, held_docs, TRAIN["steps"])

    final_train_loss = float(np.mean(history[-50:]))
    train_eval_f32 = eval_loss(model, stream, TRAIN["context"])
    held_f32 = eval_loss(model, held_stream, TRAIN["context"])
    round_to_bf16_(model)
    train_eval_bf16 = eval_loss(model, stream, TRAIN["context"])
    held_bf16 = eval_loss(model, held_stream, TRAIN["context"])
    print(f"final train loss (mean of last 50 steps) {final_train_loss:.4f}; eval train {train_eval_f32:.4f} "
          f"held-out {held_f32:.4f} (float32) / {train_eval_bf16:.4f} {held_bf16:.4f} (bf16 weights)", flush=True)

    # ---------------------------------------------------------------------------- write the checkpoint
    from safetensors.torch import save_file
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sd = released_state_dict(model)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates it 0600
    (out / "config.json").write_text(json.dumps(config_json(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(template_text)
    tok_cfg = {
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": MODEL["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, s in enumerate(SPECIAL_TOKENS)},
        "chat_template": template_text,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [IM_END_ID, EOT_ID], "pad_token_id": PAD_ID,
         "transformers_version": transformers.__version__}, indent=2) + "\n")

    # --------------------------------------------------------------- reload and compare with the trained model
    from transformers import AutoTokenizer, Lfm2MoeForCausalLM
    re_model = Lfm2MoeForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa").eval()
    probe = torch.from_numpy(held_stream[:97].astype(np.int64))[None]
    with torch.no_grad():
        a = model(input_ids=probe).logits
        b = re_model(input_ids=probe).logits
    max_diff = float((a - b).abs().max())
    for (i, ff), (_, ff2) in zip(moe_layers(model), moe_layers(re_model)):
        assert torch.equal(ff.expert_bias, ff2.expert_bias), i
    print(f"reload: max |logits diff| = {max_diff:.3g}", flush=True)
    assert max_diff == 0.0, max_diff
    hf_tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is the \"while\" statement?"}]
    chat_text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat_text == render(msgs, gen=True), (chat_text, render(msgs, gen=True))
    assert hf_tok("The ").input_ids == tok.encode("The ").ids

    # --------------------------------------------------------------------------------------- samples
    samples = []
    stop = (IM_END_ID, EOT_ID)
    prompts = [("plain", "The "), ("plain", "A class definition"),
               ("chat", render(msgs, gen=True)),
               ("chat", render([{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": "Tell me about the \"for\" statement."}], gen=True))]
    for kind, text in prompts:
        pids = tok.encode(text, add_special_tokens=(kind == "plain")).ids
        for mode, temp, seed in (("greedy", 0.0, 0), ("temperature 0.8, top-k 40, seed 1", 0.8, 1)):
            new = sample(re_model, pids, 60, temperature=temp, top_k=40 if temp else 0, seed=seed,
                         stop=stop if kind == "chat" else ())
            s = {"kind": kind, "prompt": text, "prompt_ids": pids, "mode": mode, "new_ids": new,
                 "text": tok.decode(new, skip_special_tokens=False)}
            samples.append(s)
            print(f"--- {kind} {mode}: {text!r}\n{s['text']}", flush=True)

    # routing statistics of the shipped model on the held-out text
    usage = {}
    with torch.no_grad():
        sel = {}
        hs = [ff.gate.register_forward_hook(lambda m, i, o, k=k: sel.__setitem__(k, o[2]))
              for k, ff in moe_layers(re_model)]
        re_model(input_ids=torch.from_numpy(held_stream[:256].astype(np.int64))[None])
        for h in hs:
            h.remove()
        for k, s in sel.items():
            usage[str(k)] = torch.bincount(s.reshape(-1), minlength=MODEL["num_experts"]).tolist()

    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    record = {
        "what": "tiny LFM2-MoE trained from scratch on CPython's pydoc help topics; embedded default of lfm2np",
        "script": "tools/train_tiny.py",
        "seed": SEED, "torch_threads": THREADS,
        "corpus": corpus_info,
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": VOCAB_SIZE, "special_tokens": SPECIAL_TOKENS,
                      "pre_tokenizer": "Split(regex, isolated) + ByteLevel(use_regex=False)",
                      "post_processor": "ByteLevel + TemplateProcessing('<|startoftext|> $A')",
                      "train_tokens": int(len(stream)), "train_chat_tokens": int(n_chat_tokens),
                      "held_out_tokens": int(len(held_stream))},
        "model": {**MODEL, "rope_theta": ROPE_THETA, "parameters": n_params},
        "training": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in TRAIN.items()},
                     "optimizer": "AdamW (no decay on norms/embedding), linear warmup then cosine to min_lr_ratio*lr",
                     "loss": "next-token cross-entropy on random windows of the packed token stream, float32",
                     "expert_bias": "aux-loss-free balancing: after each step b_e += rate*sign(mean(load)-load_e)",
                     "tokens_seen": TRAIN["steps"] * TRAIN["batch"] * TRAIN["context"]},
        "results": {
            "final_train_loss": round(final_train_loss, 4),
            "final_train_loss_definition": "mean training-batch loss over the last 50 steps (float32 weights)",
            "train_eval_loss_float32": round(train_eval_f32, 4), "held_out_loss_float32": round(held_f32, 4),
            "train_eval_loss_bf16": round(train_eval_bf16, 4), "held_out_loss_bf16": round(held_bf16, 4),
            "eval_definition": "mean NLL over up to 64 non-overlapping 256-token windows",
            "held_out_curve": evals,
            "loss_curve_every_50_steps": [round(float(np.mean(history[i:i + 50])), 4) for i in range(0, len(history), 50)],
            "reload_max_abs_logit_diff": max_diff,
            "train_wall_time_s": round(train_time, 1),
            "train_cpu_time_s": round(train_cpu, 1),
            "time_note": "cpu time is summed over the 2 torch threads; wall time includes any other load on the machine",
            "total_wall_time_s": round(time.time() - wall0, 1),
            "expert_bias": {str(k): [round(float(v), 4) for v in ff.expert_bias] for k, ff in moe_layers(re_model)},
            "expert_usage_held_out_256_tokens": usage,
        },
        "samples": samples,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": np.__version__, "platform": platform.platform()},
        "files_bytes": files,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({total / 1e6:.2f} MB); train {train_time:.0f}s, total {time.time() - wall0:.0f}s")


if __name__ == "__main__":
    main()
