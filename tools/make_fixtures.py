#!/usr/bin/env python
"""Regenerate the golden fixtures under tests/golden/ from the reference implementation.

Needs the `reference` extra (torch==2.13.0 CPU, transformers). The tests never import torch: they read
what this script writes.

For each tiny configuration below it
1. builds ``Lfm2ForCausalLM`` / ``Lfm2MoeForCausalLM`` (float32, eager attention) and randomises EVERY
   parameter, norm weights, biases and the expert bias included (transformers initialises norms to ones,
   which would hide a ``1 + w`` or a missing norm);
2. writes the checkpoint as released checkpoints are laid out: per-expert tensors, the float32
   expert bias beside bf16/f16 weights where the checkpoint dtype is reduced, sharded when asked, and a
   config.json that may use the legacy keys;
3. reloads that directory's weights with ``from_pretrained`` (given the config object: transformers 5 cannot
   read every legacy spelling) and checks the logits are identical, so the tensors are exactly what
   transformers reads;
4. records, with forward hooks on the transformers modules, every operator's inputs and outputs for one
   sequence, and the logits for several sequence lengths and a batch of 2;
5. rejects routing near-ties (the margin between the k-th and (k+1)-th selection score must exceed
   ``MIN_ROUTING_MARGIN``), so a float32 implementation cannot legitimately choose differently.

Usage:  python tools/make_fixtures.py [--out tests/golden]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM

GENERATOR_VERSION = 1
MIN_ROUTING_MARGIN = 1e-4
SEQ_LENGTHS = (1, 5, 13)
BATCH_SHAPE = (2, 7)
CAPTURE_LENGTH = 13

# Each case: the canonical HF config (what transformers is built from), how config.json is written,
# the on-disk dtype, the number of shards, and what it exercises.
CASES: dict[str, dict] = {
    "dense-legacy": dict(
        seed=101,
        what="lfm2; legacy keys block_ff_dim/full_attn_idxs/tie_embedding/theta; auto-adjusted FFN width with "
             "multiplier 1.5 and multiple_of 16 (100 -> 112); conv_bias; GQA 6/2; norm_eps 1e-6; float32",
        config=dict(model_type="lfm2", vocab_size=101, hidden_size=48, num_hidden_layers=5,
                    num_attention_heads=6, num_key_value_heads=2, intermediate_size=100,
                    block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.5, block_multiple_of=16,
                    layer_types=["conv", "full_attention", "conv", "conv", "full_attention"],
                    conv_bias=True, conv_L_cache=3, norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=True),
        legacy=True, dtype="float32", shards=1),
    "dense-untied-mqa-f16": dict(
        seed=202,
        what="lfm2; untied lm_head; MQA (1 KV head); auto-adjust off; conv_L_cache 4; float16 checkpoint; "
             "3 shards with an index",
        config=dict(model_type="lfm2", vocab_size=83, hidden_size=40, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=1, intermediate_size=56,
                    block_auto_adjust_ff_dim=False,
                    layer_types=["full_attention", "conv", "conv", "full_attention"],
                    conv_bias=False, conv_L_cache=4, norm_eps=1e-5, rope_theta=500.0,
                    tie_word_embeddings=False),
        legacy=False, dtype="float16", shards=3),
    "dense-attn-only": dict(
        seed=303,
        what="lfm2; no layer_types / full_attn_idxs (every layer attention); rope_parameters dict; "
             "auto-adjust with multiplier null; float32",
        config=dict(model_type="lfm2", vocab_size=67, hidden_size=32, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=90,
                    block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=None, block_multiple_of=256,
                    conv_bias=False, norm_eps=1e-5, rope_theta=1_000_000.0, tie_word_embeddings=True),
        legacy=False, dtype="float32", shards=1, omit_layer_types=True),
    "moe-bf16-bias": dict(
        seed=404,
        what="lfm2_moe; bfloat16 weights with a float32 expert_bias large enough to change the chosen experts; "
             "8 experts top-2; norm_topk_prob; num_dense_layers 1; GQA 4/2",
        config=dict(model_type="lfm2_moe", vocab_size=97, hidden_size=32, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                    moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, num_dense_layers=1,
                    use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0,
                    layer_types=["conv", "conv", "full_attention", "conv"],
                    conv_bias=False, norm_eps=1e-5, rope_theta=1_000_000.0, tie_word_embeddings=True),
        legacy=False, dtype="bfloat16", shards=1, expert_bias_scale=0.6),
    "moe-top1-nobias": dict(
        seed=505,
        what="lfm2_moe; use_expert_bias false; top-1 of 5; norm_topk_prob false; routed_scaling_factor 2.5; "
             "num_dense_layers 0; untied lm_head; float32",
        config=dict(model_type="lfm2_moe", vocab_size=89, hidden_size=36, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=3, intermediate_size=40,
                    moe_intermediate_size=20, num_experts=5, num_experts_per_tok=1, num_dense_layers=0,
                    use_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=2.5,
                    layer_types=["full_attention", "conv", "full_attention"],
                    conv_bias=False, norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
        legacy=False, dtype="float32", shards=1),
    "moe-allk-convbias": dict(
        seed=606,
        what="lfm2_moe; top-k = number of experts (4 of 4); conv_bias; MQA; routed_scaling_factor 0.7; "
             "legacy tie_embedding key; num_dense_layers 2; 2 shards; float32",
        config=dict(model_type="lfm2_moe", vocab_size=73, hidden_size=24, num_hidden_layers=4,
                    num_attention_heads=3, num_key_value_heads=1, intermediate_size=44,
                    moe_intermediate_size=12, num_experts=4, num_experts_per_tok=4, num_dense_layers=2,
                    use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=0.7,
                    layer_types=["conv", "full_attention", "conv", "conv"],
                    conv_bias=True, norm_eps=1e-5, rope_theta=1_000_000.0, tie_word_embeddings=True),
        legacy=True, dtype="float32", shards=2, expert_bias_scale=0.2),
}

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(case: dict) -> torch.nn.Module:
    cfg = dict(case["config"])
    kind = cfg.pop("model_type")
    cls_cfg, cls_model = (Lfm2Config, Lfm2ForCausalLM) if kind == "lfm2" else (Lfm2MoeConfig, Lfm2MoeForCausalLM)
    if kind == "lfm2_moe" and "layer_types" not in cfg:
        cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    theta = cfg.pop("rope_theta")
    no_multiplier = "block_ffn_dim_multiplier" in cfg and cfg["block_ffn_dim_multiplier"] is None
    if no_multiplier:
        cfg.pop("block_ffn_dim_multiplier")
    config = cls_cfg(**cfg, rope_parameters={"rope_type": "default", "rope_theta": theta},
                     bos_token_id=1, eos_token_id=7, pad_token_id=0)
    if no_multiplier:
        # the modeling code skips the multiplier and the rounding when it is None (older configs); the
        # strict config class of transformers 5 refuses None, so it is set past the validator
        object.__setattr__(config, "block_ffn_dim_multiplier", None)
    config._attn_implementation = "eager"
    if kind == "lfm2_moe":
        config._experts_implementation = "eager"  # the reference loop over experts, no fused kernels
    torch.manual_seed(case["seed"])
    model = cls_model(config).eval()
    randomise(model, case)
    return model


def randomise(model: torch.nn.Module, case: dict) -> None:
    """Every parameter and buffer drawn afresh at a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # in [0.5, 1.5): not ones
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("conv.conv.weight"):
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))
            else:  # linear weights (out, in) and stacked experts (E, out, in)
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(case.get("expert_bias_scale", 0.0) * torch.randn(b.shape, generator=gen))
        dt = TORCH_DTYPES[case["dtype"]]
        if dt != torch.float32:  # the reference sees exactly the weights that are stored
            for name, p in model.named_parameters():
                p.copy_(p.to(dt).to(torch.float32))


def checkpoint_tensors(model: torch.nn.Module, case: dict) -> dict[str, np.ndarray]:
    """The state dict in the released on-disk layout (per-expert tensors), in the case's dtype."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            fm = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = t[e, :fm]
                out[f"{prefix}{e}.w3.weight"] = t[e, fm:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e]
        else:
            out[name] = t
    dt = TORCH_DTYPES[case["dtype"]]
    arrays = {}
    for name, t in out.items():
        t = t.detach().contiguous()
        if name.endswith("expert_bias"):
            arrays[name] = t.to(torch.float32)  # float32 buffer, as released
        else:
            arrays[name] = t.to(dt)
    return arrays


def to_numpy_for_save(t: torch.Tensor):
    return t.numpy() if t.dtype != torch.bfloat16 else t


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    from safetensors.torch import save_file as save_torch

    names = list(tensors)
    if shards == 1:
        save_torch(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    groups = [names[i::shards] for i in range(shards)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_torch({n: tensors[n] for n in group}, str(directory / fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def config_json(case: dict) -> dict:
    """config.json as written to disk: canonical transformers keys, or the legacy spelling."""
    c = dict(case["config"])
    d = {"architectures": ["Lfm2ForCausalLM" if c["model_type"] == "lfm2" else "Lfm2MoeForCausalLM"],
         "torch_dtype": case["dtype"], "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
         "initializer_range": 0.02, "use_cache": True}
    theta = c.pop("rope_theta")
    if case.get("omit_layer_types"):
        c.pop("layer_types", None)
    if case["legacy"]:
        if c["model_type"] == "lfm2":
            c["block_ff_dim"] = c.pop("intermediate_size")
            c["full_attn_idxs"] = [i for i, t in enumerate(c.pop("layer_types")) if t == "full_attention"]
            c["theta"] = theta
        else:
            c["rope_theta"] = theta
        c["tie_embedding"] = c.pop("tie_word_embeddings")
    elif case.get("omit_layer_types"):
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        c["rope_theta"] = theta
    d.update(c)
    return d


class Recorder:
    """Forward hooks that keep each operator's inputs and outputs, keyed by HF module path."""

    def __init__(self, model: torch.nn.Module):
        self.store: dict[str, np.ndarray] = {}
        self.handles = []
        for name, module in model.named_modules():
            if self._wanted(name, module):
                self.handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    @staticmethod
    def _wanted(name: str, module) -> bool:
        last = name.rsplit(".", 1)[-1]
        if name in ("model.embed_tokens", "model.embedding_norm", "lm_head", "model.rotary_emb", "model.pos_emb"):
            return True
        if name.startswith("model.layers.") and name.count(".") == 2:
            return True  # whole decoder layer
        return last in ("operator_norm", "ffn_norm", "conv", "self_attn", "q_layernorm", "k_layernorm",
                        "v_proj", "in_proj", "feed_forward", "gate", "experts") and not name.endswith("conv.conv")

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            inputs = list(args) + [kwargs[k] for k in ("hidden_states",) if k in kwargs]
            first = inputs[0] if inputs else None
            put = self._put
            if name.endswith(("rotary_emb", "pos_emb")):
                put(name + ".cos", output[0][0])
                put(name + ".sin", output[1][0])
                return
            if name.endswith(".gate"):
                logits, weights, experts = output
                put(name + ".input", first)
                put(name + ".router_logits", logits)
                put(name + ".routing_weights", weights)
                put(name + ".selected_experts", experts)
                return
            if name.endswith(".experts"):
                put(name + ".input", args[0])
                put(name + ".selected_experts", args[1])
                put(name + ".routing_weights", args[2])
                put(name + ".output", output)
                return
            put(name + ".input", first)
            put(name + ".output", output[0] if isinstance(output, tuple) else output)
        return hook

    def _put(self, key: str, t) -> None:
        if t is None:
            return
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # exact
        if t.dim() >= 2 and t.shape[0] == 1 and not key.endswith((".cos", ".sin")):
            t = t[0]  # drop the batch axis of 1
        arr = t.numpy()
        self.store[key] = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.astype(np.float32)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def function_level(model: torch.nn.Module, store: dict[str, np.ndarray]) -> None:
    """Operators that are functions, not modules, in transformers (RoPE application, the attention core,
    the causal conv): run the reference functions on the captured inputs and keep their outputs."""
    modeling = sys.modules[type(model).__module__]
    cfg = model.config
    rot = "model.rotary_emb" if "model.rotary_emb.cos" in store else "model.pos_emb"
    cos = torch.from_numpy(store[rot + ".cos"])[None]
    sin = torch.from_numpy(store[rot + ".sin"])[None]
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        with torch.no_grad():
            if cfg.layer_types[i] == "full_attention":
                a = p + "self_attn."
                q = torch.from_numpy(store[a + "q_layernorm.output"])[None].transpose(1, 2)  # (1, H, T, hd)
                k = torch.from_numpy(store[a + "k_layernorm.output"])[None].transpose(1, 2)
                T, hd = q.shape[2], q.shape[3]
                v = torch.from_numpy(store[a + "v_proj.output"]).view(1, T, -1, hd).transpose(1, 2)
                q_rope, k_rope = modeling.apply_rotary_pos_emb(q, k, cos, sin)
                mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
                attn, _ = modeling.eager_attention_forward(layer.self_attn, q_rope, k_rope, v, mask,
                                                           scaling=layer.self_attn.scaling)
                store[a + "q_rope"] = q_rope[0].transpose(0, 1).numpy()  # (T, H, hd)
                store[a + "k_rope"] = k_rope[0].transpose(0, 1).numpy()  # (T, G, hd)
                store[a + "v"] = v[0].transpose(0, 1).numpy()  # (T, G, hd)
                store[a + "attn_out"] = attn[0].reshape(T, -1).numpy()  # (T, H*hd)
            else:
                c = p + "conv."
                bcx = torch.from_numpy(store[c + "in_proj.output"])[None].transpose(-1, -2)
                b_gate, c_gate, x = bcx.chunk(3, dim=-2)
                bx = b_gate * x
                conv = layer.conv.conv
                z = modeling.causal_conv1d_fn(bx, conv.weight.squeeze(1), conv.bias)
                store[c + "bx"] = bx[0].T.numpy()  # (T, D)
                store[c + "conv_out"] = z[0].T.numpy()  # (T, D)


def routing_margin(model: torch.nn.Module, captured: dict[str, np.ndarray], case: dict) -> float:
    """Smallest gap between the k-th and (k+1)-th selection scores over all MoE layers and tokens."""
    cfg = model.config
    if cfg.model_type != "lfm2_moe" or cfg.num_experts_per_tok == cfg.num_experts:
        return float("inf")
    margin = float("inf")
    for i in range(cfg.num_dense_layers, cfg.num_hidden_layers):
        logits = captured[f"model.layers.{i}.feed_forward.gate.router_logits"].astype(np.float64)
        scores = 1 / (1 + np.exp(-logits))
        if cfg.use_expert_bias:
            scores = scores + model.model.layers[i].feed_forward.expert_bias.numpy().astype(np.float64)
        s = -np.sort(-scores, axis=-1)
        k = cfg.num_experts_per_tok
        margin = min(margin, float(np.min(s[:, k - 1] - s[:, k])))
    return margin


def bias_changes_selection(model: torch.nn.Module, captured: dict[str, np.ndarray]) -> bool:
    cfg = model.config
    changed = False
    for i in range(cfg.num_dense_layers, cfg.num_hidden_layers):
        logits = captured[f"model.layers.{i}.feed_forward.gate.router_logits"]
        unbiased = np.sort(np.argsort(-logits, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok], axis=-1)
        chosen = np.sort(captured[f"model.layers.{i}.feed_forward.gate.selected_experts"], axis=-1)
        changed |= bool((unbiased != chosen).any())
    return changed


def _eager(model: torch.nn.Module) -> dict:
    """from_pretrained arguments for the reference implementations (grouped_mm also fails on odd sizes)."""
    extra = {"attn_implementation": "eager"}
    if model.config.model_type == "lfm2_moe":
        extra["experts_implementation"] = "eager"
    return extra


def make_case(name: str, case: dict, out: Path) -> dict:
    directory = out / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model = build_model(case)
    tensors = checkpoint_tensors(model, case)
    write_checkpoint(directory, tensors, case["shards"])
    (directory / "config.json").write_text(json.dumps(config_json(case), indent=2) + "\n")

    V = model.config.vocab_size
    golden: dict[str, np.ndarray] = {}
    # pick input ids whose routing has no near-ties
    for attempt in range(200):
        rng = np.random.default_rng(case["seed"] * 1000 + attempt)
        ids = rng.integers(0, V, size=CAPTURE_LENGTH)
        rec = Recorder(model)
        with torch.no_grad():
            model(torch.from_numpy(ids)[None])
        rec.close()
        function_level(model, rec.store)
        margin = routing_margin(model, rec.store, case)
        if margin > MIN_ROUTING_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no input without routing near-ties")
    cfg = model.config
    if case.get("expert_bias_scale") and cfg.num_experts_per_tok < cfg.num_experts \
            and not bias_changes_selection(model, rec.store):
        raise SystemExit(f"{name}: the expert bias never changes the chosen experts; raise expert_bias_scale")
    golden.update({"capture.ids": ids.astype(np.int64)}, **{"capture." + k: v for k, v in rec.store.items()})

    with torch.no_grad():
        for T in SEQ_LENGTHS:
            sub = ids[:T] if T <= len(ids) else rng.integers(0, V, size=T)
            logits = model(torch.from_numpy(sub)[None]).logits[0].numpy()
            golden[f"logits.T{T}.ids"] = sub.astype(np.int64)
            golden[f"logits.T{T}"] = logits.astype(np.float32)
        bids = rng.integers(0, V, size=BATCH_SHAPE)
        golden["batch.ids"] = bids.astype(np.int64)
        golden["batch.logits"] = model(torch.from_numpy(bids)).logits.numpy().astype(np.float32)

    # the files must be what transformers itself loads: reload and compare the logits bit for bit
    with tempfile.TemporaryDirectory() as tmp:
        canonical = Path(tmp)
        for f in directory.iterdir():
            (canonical / f.name).symlink_to(f.resolve())
        (canonical / "config.json").unlink()
        model.config.save_pretrained(canonical)
        cls = type(model)
        # config passed as an object: transformers 5's strict config refuses a null block_ffn_dim_multiplier
        again = cls.from_pretrained(canonical, config=model.config, dtype=torch.float32,
                                    **_eager(model)).eval()
        with torch.no_grad():
            reloaded = again(torch.from_numpy(bids)).logits.numpy()
        if not np.array_equal(reloaded, golden["batch.logits"]):
            raise SystemExit(f"{name}: transformers reloads the written checkpoint differently "
                             f"(max diff {np.abs(reloaded - golden['batch.logits']).max()})")
        # the same checkpoint run by transformers in bfloat16 (weights, buffers and activations), the
        # reference for lfm2np's bfloat16 emulation
        half = cls.from_pretrained(canonical, config=model.config, dtype=torch.bfloat16, **_eager(model)).eval()
        bias_dtypes = {str(b.dtype) for n, b in half.named_buffers() if n.endswith("expert_bias")}
        rec16 = Recorder(half)
        with torch.no_grad():
            half(torch.from_numpy(ids)[None])
        rec16.close()
        for key in ("model.embed_tokens.output", "lm_head.output", *[f"model.layers.{i}.output"
                                                                    for i in range(model.config.num_hidden_layers)]):
            golden["bf16." + key] = rec16.store[key]
        golden["bf16.ids"] = ids.astype(np.int64)

    golden = {k: np.ascontiguousarray(v) for k, v in golden.items()}
    save_file(golden, str(directory / "golden.safetensors"),
              metadata={"generator": f"tools/make_fixtures.py v{GENERATOR_VERSION}"})
    return {
        "what": case["what"],
        "seed": case["seed"],
        "checkpoint_dtype": case["dtype"],
        "shards": case["shards"],
        "reference_config": case["config"],
        "routing_margin": None if margin == float("inf") else margin,
        "bf16_expert_bias_dtype": sorted(bias_dtypes),
        "capture_length": CAPTURE_LENGTH,
        "seq_lengths": list(SEQ_LENGTHS),
        "batch_shape": list(BATCH_SHAPE),
    }


def bf16_rounding(out: Path) -> None:
    """float32 values (random, exact ties, subnormals, infinities, extremes) and torch's bfloat16 bits."""
    rng = np.random.default_rng(7)
    vals = [rng.standard_normal(2000).astype(np.float32),
            (rng.standard_normal(500) * 1e30).astype(np.float32),
            (rng.standard_normal(500) * 1e-40).astype(np.float32)]  # subnormal range
    base = rng.integers(0, 2**31, size=500, dtype=np.uint32) & np.uint32(0xFFFF0000)
    vals.append((base | np.uint32(0x8000)).view(np.float32))  # exact ties, both parities
    vals.append(np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38, 1e-45], dtype=np.float32))
    x = np.concatenate(vals)
    x = x[np.isfinite(x) | np.isinf(x)]
    bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    save_file({"float32": x, "bfloat16_bits": bits.astype(np.int32)}, str(out / "bf16_rounding.safetensors"),
              metadata={"generator": f"tools/make_fixtures.py v{GENERATOR_VERSION}", "torch": torch.__version__})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "golden"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # deterministic reductions
    manifest = {
        "generator": "tools/make_fixtures.py",
        "generator_version": GENERATOR_VERSION,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "reference": "transformers Lfm2ForCausalLM / Lfm2MoeForCausalLM, float32, eager attention, CPU",
        "min_routing_margin": MIN_ROUTING_MARGIN,
        "cases": {},
    }
    for name, case in CASES.items():
        manifest["cases"][name] = make_case(name, case, out)
        print(f"{name}: ok ({manifest['cases'][name]['routing_margin']})")
    bf16_rounding(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
