#!/usr/bin/env python
"""Regenerate the bidirectional LFM2 fixtures (tests/golden/bidir-*/) from transformers' Lfm2Model.

Run in the reference environment with lfm2np on the path (it writes the checkpoints with lfm2np's writer):
    PYTHONPATH=. /work/venv-ref/bin/python tools/make_bidir_fixtures.py [--out tests/golden]

transformers 5.25 has no bidirectional LFM2 (its development branch adds ``lfm2_bidirectional``; the released
checkpoints run remote code, ``modeling_lfm2_bidirectional.py``). This script builds transformers' own causal
``Lfm2Model`` (float32, eager attention) and makes it bidirectional the way that code does, with functions written
here:

- each short conv is centred: the depthwise ``Conv1d`` applied with ``padding = L // 2`` on both sides and its first
  T outputs kept (the causal model pads L - 1 on the left); with ``conv_zero_padding`` the conv block's input is
  zeroed at the padding first (the development branch's ``apply_mask_to_padding_states``);
- attention gets a pad-only additive mask (0 for a token's key, the float32 minimum for a padding key) and no
  causal mask: eager attention adds the mask it is given and nothing else.

The sentence-transformers head is written here too (Pooling: the first token, the mean over the tokens, or the last
token; Dense: ``x W^T (+ b)``; Normalize: ``x / max(||x||, 1e-12)``; PyLate's ColBERT: Dense and Normalize per
token). Every parameter is random, norm weights included (drawn in [0.5, 1.5): transformers initialises them to
ones). Each case is written as its checkpoint is released: config.json (``architectures``
``Lfm2BidirectionalModel``, or ``Lfm2Model`` for the causal LFM2-ColBERT-350M layout, or transformers'
development spelling ``model_type: lfm2_bidirectional``), the base model's tensors without the ``model.`` prefix,
modules.json, 1_Pooling/config.json, the Dense module, and a tiny byte-level BPE tokenizer in LFM2's layout.

Recorded per case, into golden.safetensors: the intermediates of one sequence (``capture.*``: each layer's
operator norm, conv in_proj / bx / conv_out / output, attention q and k after their norms, v, the attention output
before out_proj, the layer output; the final norm), the pooled embeddings under every pooling (``embed.{mode}``),
the per-token vectors (``tokens``), three sequences alone (``alone.{i}.*``) and as one right-padded batch with its
attention mask under both settings of the padding switch (``padded.zero.*``, ``padded.keep.*``), that batch as
ports with a porting mistake compute it (``mistake.{left-padded,causal-mask,causal-model}.embedding``: the conv
window of the causal model, its mask, both), and the same sequence run by transformers in bfloat16 (``bf16.*``: the embeddings, each layer's output, the final norm, the
embedding).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision_cpu  # noqa: F401  (transformers imports torchvision, a CUDA build here: see that module)
import transformers
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Lfm2Config, Lfm2Model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lfm2np.io.gguf_tokenizer import LFM2_SPLIT_REGEX  # noqa: E402
from lfm2np.io.safetensors import write_safetensors  # noqa: E402

GENERATOR_VERSION = 1
SPECIAL = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
           "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
           "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>"]
VOCAB = 320
CORPUS = ["query: what is the capital of France?", "document: Paris is the capital of France.",
          "The quick brown fox jumps over the lazy dog.", "Mars is the red planet; Jupiter is the largest.",
          "def f(x):\n    return x * 2\n", "Embeddings map a text to a vector; similar texts lie close."] * 20
CAPTURE = 11
LENGTHS = (11, 6, 3)  # the padded batch: rows of these lengths, right-padded to 11

BASE = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            block_auto_adjust_ff_dim=False, norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512)
CASES: dict[str, dict] = {
    "bidir-cls": dict(
        seed=701, what="Lfm2BidirectionalModel, CLS pooling, no dense head, conv_zero_padding absent (read as false: "
                       "the released layout), L 3, GQA 4/2 (LFM2.5-Embedding-350M's layout)",
        config=dict(BASE, num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
                    conv_L_cache=3, conv_bias=False, rope_theta=10000.0),
        arch="Lfm2BidirectionalModel", pooling="cls", dense=None, zero=None),
    "bidir-colbert": dict(
        seed=702, what="Lfm2BidirectionalModel, a PyLate Dense 32 -> 16 without bias and no pooling (per-token "
                       "vectors: LFM2.5-ColBERT-350M's layout), conv_zero_padding true, conv L 5 (centred: 2 each "
                       "side), attention first",
        config=dict(BASE, num_hidden_layers=4, layer_types=["full_attention", "conv", "conv", "full_attention"],
                    conv_L_cache=5, conv_bias=False, rope_theta=1_000_000.0),
        arch="Lfm2BidirectionalModel", pooling=None, dense=(16, False), zero=True),
    "bidir-last-bias": dict(
        seed=703, what="transformers' development spelling model_type lfm2_bidirectional (conv_zero_padding absent: "
                       "read as true), last-token pooling, then a Dense 32 -> 24 with a bias (2_Dense), conv_bias, MQA",
        config=dict(BASE, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                    num_key_value_heads=1, conv_L_cache=3, conv_bias=True, rope_theta=10000.0),
        arch="lfm2_bidirectional", pooling="last", dense=(24, True), zero=None),
    "causal-colbert": dict(
        seed=704, what="Lfm2Model (causal: LFM2-ColBERT-350M stays causal), a PyLate Dense 32 -> 16 and no pooling",
        config=dict(BASE, num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"],
                    conv_L_cache=3, conv_bias=False, rope_theta=1_000_000.0),
        arch="Lfm2Model", pooling=None, dense=(16, False), zero=None),
}


# ------------------------------------------------------------------------------------------ tokenizer
def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens laid out as LFM2's tokenizer.json: special tokens first, the regex split and
    ByteLevel, a BOS template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|startoftext|> $A", pair="<|startoftext|> $A <|startoftext|> $B",
                                      special_tokens=[("<|startoftext|>", 1)])])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    return tok


def write_tokenizer(directory: Path, tok: Tokenizer) -> None:
    (directory / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>", "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")


# ---------------------------------------------------------------------------------- the reference model
def build(case: dict, dtype: torch.dtype = torch.float32) -> Lfm2Model:
    cfg = dict(case["config"])
    theta = cfg.pop("rope_theta")
    config = Lfm2Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta}, bos_token_id=1,
                        eos_token_id=7, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(case["seed"])
    model = Lfm2Model(config).eval()
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # not ones
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("conv.conv.weight"):
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.to(dtype)


def dense_head(case: dict, hidden: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if case["dense"] is None:
        return None
    out, bias = case["dense"]
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w = torch.randn(out, hidden, generator=gen) / hidden ** 0.5
    return w, (0.3 * torch.randn(out, generator=gen) if bias else None)


class Bidirectional:
    """Make an Lfm2Model bidirectional (the module docstring) and record each conv's bx and conv_out."""

    def __init__(self, model: Lfm2Model, zero_pads: bool, centred: bool = True):
        self.store: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(model.layers):
            if hasattr(layer, "conv"):
                layer.conv.forward = self.centred(layer.conv, f"model.layers.{i}.conv.", zero_pads, centred)

    def centred(self, conv, prefix: str, zero_pads: bool, centred: bool):
        L = conv.conv_kernel_size
        pad = L // 2 if centred else L - 1  # (not centred: the causal model's window, a porting mistake)

        def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
            if zero_pads and attention_mask is not None:
                hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
            bcx = conv.in_proj(hidden_states).transpose(-1, -2)
            b, c, x = bcx.chunk(3, dim=-2)
            bx = b * x
            z = F.conv1d(bx, conv.conv.weight, conv.conv.bias, padding=pad, groups=bx.shape[1])[..., :bx.shape[-1]]
            self.store[prefix + "bx"], self.store[prefix + "conv_out"] = bx.transpose(-1, -2), z.transpose(-1, -2)
            return conv.out_proj((c * z).transpose(-1, -2).contiguous())
        return forward


def masks(mask: torch.Tensor, dtype: torch.dtype, triangle: bool = False) -> dict:
    """The per-layer-type masks a bidirectional Lfm2Model takes as a dict: attention's pad-only additive mask (with
    ``triangle``, the causal mask kept too: a porting mistake), the conv's 2D mask."""
    additive = torch.zeros(mask.shape[0], 1, mask.shape[1], mask.shape[1], dtype=dtype)
    additive.masked_fill_(~mask.bool()[:, None, None, :], torch.finfo(dtype).min)
    if triangle:
        additive.masked_fill_(torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool).triu(1), torch.finfo(dtype).min)
    return {"full_attention": additive, "conv": mask.to(dtype)}


def capture(model: Lfm2Model, ids: np.ndarray, zero_pads: bool, causal: bool) -> dict[str, np.ndarray]:
    """Every recorded intermediate of one sequence, under lfm2np's capture names."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name, take_input=False):
        def f(module, args, output):
            store[name] = args[0] if take_input else (output[0] if isinstance(output, tuple) else output)
        return f
    for name, module in model.named_modules():
        key = "model." + name
        last = name.rsplit(".", 1)[-1]
        if name.startswith("layers.") and name.count(".") == 1:
            handles.append(module.register_forward_hook(hook(key + ".output")))
        elif last in ("operator_norm", "ffn_norm", "q_layernorm", "k_layernorm", "v_proj", "feed_forward") or \
                (last == "in_proj" and ".conv." in key) or name in ("embedding_norm", "embed_tokens"):
            handles.append(module.register_forward_hook(hook(key + ".output")))
        elif last in ("conv", "self_attn") and name.count(".") == 2:
            handles.append(module.register_forward_hook(hook(key + ".output")))
        elif last == "out_proj" and ".self_attn." in key:
            handles.append(module.register_forward_hook(hook(key.rsplit(".", 1)[0] + ".attn_out", take_input=True)))
    patch = None if causal else Bidirectional(model, zero_pads)
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None], attention_mask=None if causal else masks(
            torch.ones(1, len(ids), dtype=torch.bool), torch.float32))
    for h in handles:
        h.remove()
    store.update(patch.store if patch else {})
    result = {k: v.detach().float()[0].numpy() for k, v in store.items()}
    result["model.embedding_norm.output"] = out.last_hidden_state[0].float().numpy()
    return result


def hidden(model: Lfm2Model, ids: np.ndarray, mask: np.ndarray | None, zero_pads: bool, causal: bool,
           centred: bool = True, triangle: bool = False) -> torch.Tensor:
    """The final hidden states of a batch (``mask`` None: no padding); ``centred`` false or ``triangle`` true:
    the porting mistakes of a bidirectional model run with the causal conv window or the causal mask."""
    m = torch.ones(ids.shape, dtype=torch.bool) if mask is None else torch.from_numpy(mask)
    with torch.no_grad():
        if causal:  # transformers' own causal masks (right padding never reaches a token)
            return model(torch.from_numpy(ids), attention_mask=m).last_hidden_state
        Bidirectional(model, zero_pads, centred)
        return model(torch.from_numpy(ids), attention_mask=masks(m, model.embed_tokens.weight.dtype,
                                                                 triangle)).last_hidden_state


def head(h: torch.Tensor, mask: torch.Tensor, how: str, dense) -> torch.Tensor:
    """sentence-transformers' Pooling, Dense and Normalize on (B, T, D) hidden states."""
    m = mask.to(h.dtype)
    if how == "cls":
        p = h[:, 0]
    elif how == "mean":
        p = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
    else:
        p = h[torch.arange(h.shape[0]), mask.long().sum(1) - 1]
    if dense is not None:
        p = F.linear(p, dense[0].to(h.dtype), None if dense[1] is None else dense[1].to(h.dtype))
    return F.normalize(p, p=2, dim=-1)


def tokens(h: torch.Tensor, dense) -> torch.Tensor:
    """PyLate's ColBERT vectors: Dense and Normalize per token."""
    if dense is not None:
        h = F.linear(h, dense[0].to(h.dtype), None if dense[1] is None else dense[1].to(h.dtype))
    return F.normalize(h, p=2, dim=-1)


def write_case(name: str, case: dict, tok: Tokenizer, out: Path) -> dict:
    directory = out / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    causal = case["arch"] == "Lfm2Model"
    model = build(case)
    dense = dense_head(case, model.config.hidden_size)
    zero = case["zero"] if case["zero"] is not None else case["arch"] == "lfm2_bidirectional"
    # the checkpoint: config.json as released (or in the development spelling), the base model's tensors
    cfg = dict(case["config"])
    conf = {"architectures": [case["arch"] if case["arch"] != "lfm2_bidirectional" else "Lfm2BidirectionalModel"],
            "model_type": "lfm2_bidirectional" if case["arch"] == "lfm2_bidirectional" else "lfm2",
            "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, **cfg}
    if case["zero"] is not None:
        conf["conv_zero_padding"] = case["zero"]
    (directory / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    write_safetensors(directory / "model.safetensors", {k: v.numpy() for k, v in model.state_dict().items()})
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if case["pooling"]:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        (directory / "1_Pooling").mkdir()
        mode = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, **{k: k == mode[case["pooling"]] for k in mode.values()},
             "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
             "include_prompt": True}, indent=2) + "\n")
    if dense is not None:
        n = len(modules)
        kind = "pylate.models.Dense.Dense" if case["pooling"] is None else "sentence_transformers.models.Dense"
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Dense", "type": kind})
        (directory / f"{n}_Dense").mkdir()
        (directory / f"{n}_Dense" / "config.json").write_text(json.dumps(
            {"in_features": 32, "out_features": dense[0].shape[0], "bias": dense[1] is not None,
             "activation_function": "torch.nn.modules.linear.Identity"}, indent=2) + "\n")
        linear = {"linear.weight": dense[0].numpy(), **({"linear.bias": dense[1].numpy()} if dense[1] is not None
                                                          else {})}
        write_safetensors(directory / f"{n}_Dense" / "model.safetensors", linear)
    (directory / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    write_tokenizer(directory, tok)

    golden: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(case["seed"])
    ids = np.concatenate([[1], rng.integers(len(SPECIAL), VOCAB, CAPTURE - 1)]).astype(np.int64)  # BOS first
    golden["capture.ids"] = ids
    golden.update({"capture." + k: v for k, v in capture(model, ids, zero, causal).items()})
    h = hidden(model, ids[None], None, zero, causal)
    ones = torch.ones(1, CAPTURE, dtype=torch.bool)
    for how in ("cls", "mean", "last"):
        golden[f"embed.{how}"] = head(h, ones, how, dense)[0].numpy()
    golden["tokens"] = tokens(h, dense)[0].numpy()
    # three sequences alone, and as one right-padded batch (pad id 0) with its mask, padding zeroed or not
    seqs = [ids[:n] for n in LENGTHS]
    batch = np.zeros((len(seqs), max(LENGTHS)), np.int64)
    mask = np.zeros(batch.shape, bool)
    for i, s in enumerate(seqs):
        batch[i, :len(s)], mask[i, :len(s)] = s, True
        alone = hidden(model, s[None], None, zero, causal)
        golden[f"alone.{i}.ids"] = s
        golden[f"alone.{i}.hidden"] = alone[0].numpy()
        golden[f"alone.{i}.embedding"] = head(alone, torch.ones(1, len(s), dtype=torch.bool), case["pooling"] or "mean",
                                              dense)[0].numpy()
    golden["padded.ids"], golden["padded.mask"] = batch, mask
    for label, z in (("zero", True), ("keep", False)):
        hp = hidden(model, batch, mask, z, causal)
        golden[f"padded.{label}.hidden"] = hp.numpy()
        golden[f"padded.{label}.embedding"] = head(hp, torch.from_numpy(mask), case["pooling"] or "mean", dense).numpy()
    # a bidirectional model computed by a port that kept the causal conv window, the causal mask, or both
    # (transformers' own Lfm2Model unchanged: the checkpoint loaded without its remote code)
    if not causal:
        for label, centred, triangle in (("left-padded", False, False), ("causal-mask", True, True),
                                         ("causal-model", False, True)):
            hm = hidden(model, batch, mask, zero, causal, centred, triangle)
            golden[f"mistake.{label}.embedding"] = head(hm, torch.from_numpy(mask), case["pooling"] or "mean",
                                                        dense).numpy()
    # the same model in bfloat16 (weights, activations), the reference of lfm2np's bf16 emulation
    half = build(case, torch.bfloat16)
    golden.update({"bf16." + k: v for k, v in capture(half, ids, zero, causal).items()
                   if k.endswith(".output") and k.count(".") <= 3})  # embeddings, each layer's output, final norm
    hb = hidden(half, ids[None], None, zero, causal)
    golden["bf16.embedding"] = head(hb, ones, case["pooling"] or "mean", dense)[0].float().numpy()
    golden = {k: np.ascontiguousarray(v.astype(np.int64) if v.dtype.kind in "iub" else v.astype(np.float32))
              for k, v in golden.items()}
    save_file(golden, str(directory / "golden.safetensors"),
              metadata={"generator": f"tools/make_bidir_fixtures.py v{GENERATOR_VERSION}"})
    return {"what": case["what"], "seed": case["seed"], "architecture": case["arch"], "causal": causal,
            "pooling": case["pooling"], "dense": list(case["dense"]) if case["dense"] else None,
            "conv_zero_padding": zero, "capture_length": CAPTURE, "padded_lengths": list(LENGTHS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "golden"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    manifest = {"generator": "tools/make_bidir_fixtures.py", "generator_version": GENERATOR_VERSION,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "numpy": np.__version__, "python": sys.version.split()[0]},
                "reference": "transformers Lfm2Model, float32, eager attention, CPU, made bidirectional by this "
                             "script (a centred conv, a pad-only attention mask)", "cases": {}}
    for name, case in CASES.items():
        manifest["cases"][name] = write_case(name, case, tok, out)
        print(f"{name}: ok")
    (out / "bidir_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
