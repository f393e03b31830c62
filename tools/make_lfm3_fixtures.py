#!/usr/bin/env python
"""Regenerate the LFM3 golden fixtures (tests/golden/lfm3-*/ and tests/golden/lfm3_manifest.json) from
transformers 5.24's ``Lfm3ForCausalLM``.

Needs the reference environment (``bash tools/setup_reference.sh``, then run this with
``.venv-ref/bin/python``). The tests never import torch: they read what this script writes.

For each tiny configuration below it
1. builds ``Lfm3ForCausalLM`` (float32, eager attention) and randomises EVERY parameter (norm weights and
   biases included: transformers initialises norms to ones, which would hide a missing or ``1 + w`` norm);
2. writes the checkpoint as released checkpoints are laid out (the output gate as ``self_attn.gate_proj``,
   which transformers renames ``g_proj`` on load; no ``lm_head.weight`` when tied) and a config.json;
3. reloads that directory with ``from_pretrained`` and checks the logits are identical;
4. records, with forward hooks, every operator's inputs and outputs for one sequence (RoPE application,
   the attention core and the causal conv are functions in transformers: they are run on the captured
   inputs), the logits for several lengths (past the sliding window) and a batch of 2, and the layer
   outputs and logits of transformers' own bfloat16 run.

The case "lfm3-default-label" writes the RoPE label trap: a full-attention entry labelled "default" with
partial_rotary_factor 0.5, which transformers 5.24 runs as a full rotation (its "default" ignores the factor).

Usage:  .venv-ref/bin/python tools/make_lfm3_fixtures.py [--out tests/golden]
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
from safetensors.torch import save_file as save_torch
from transformers import Lfm3Config, Lfm3ForCausalLM

GENERATOR_VERSION = 1
SEQ_LENGTHS = (1, 5, 13, 40)
BATCH_SHAPE = (2, 9)
CAPTURE_LENGTH = 13
C, S, A = "conv", "sliding_attention", "full_attention"


def rope(sliding_theta: float, full_theta: float, full_type: str, factor: float) -> dict:
    return {S: {"rope_type": "default", "rope_theta": sliding_theta},
            A: {"rope_type": full_type, "rope_theta": full_theta, "partial_rotary_factor": factor}}


CASES: dict[str, dict] = {
    "lfm3-window": dict(
        seed=701, dtype="float32",
        what="lfm3; sliding window 4 (shorter than every sequence but T=1); sandwich norms and output gate on; "
             "proportional RoPE 0.5 on full layers; conv_L_cache 7; explicit head_dim 16 != D/H = 12; GQA 4/2",
        config=dict(vocab_size=101, hidden_size=48, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=80, layer_types=[C, S, A, C, S, A],
                    sliding_window=4, conv_L_cache=7, use_sandwich_norm=True, use_attention_gate=True,
                    rope_parameters=rope(10_000.0, 1_000_000.0, "proportional", 0.5), tie_word_embeddings=True)),
    "lfm3-plain-bf16": dict(
        seed=702, dtype="bfloat16",
        what="lfm3; sandwich norms and gate off; partial_rotary_factor 0.25; conv_L_cache 3; conv_bias; untied "
             "lm_head; window 6; head_dim = D/H; bfloat16 checkpoint",
        config=dict(vocab_size=89, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, intermediate_size=96, layer_types=[C, A, S, C, A],
                    sliding_window=6, conv_L_cache=3, conv_bias=True, use_sandwich_norm=False,
                    use_attention_gate=False, rope_parameters=rope(500.0, 50_000.0, "proportional", 0.25),
                    tie_word_embeddings=False)),
    "lfm3-bias-mqa": dict(
        seed=703, dtype="float32",
        what="lfm3; attention_bias; MQA (1 KV head); window 3; partial_rotary_factor 0.75; conv_L_cache 5; "
             "explicit head_dim 12 != D/H = 10; sliding layer first",
        config=dict(vocab_size=77, hidden_size=40, num_hidden_layers=5, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=12, intermediate_size=72, layer_types=[S, C, A, S, C],
                    sliding_window=3, conv_L_cache=5, attention_bias=True, use_sandwich_norm=True,
                    use_attention_gate=True, rope_parameters=rope(1_000.0, 100_000.0, "proportional", 0.75),
                    tie_word_embeddings=True)),
    "lfm3-default-label": dict(
        seed=704, dtype="float32",
        what="lfm3; the RoPE label trap: full attention labelled 'default' with partial_rotary_factor 0.5, which "
             "transformers 5.24 reads as a FULL rotation (lfm2np's rope_reading='transformers' reproduces it); "
             "small thetas so the two readings differ visibly at short positions",
        config=dict(vocab_size=71, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=16, intermediate_size=48, layer_types=[C, A, S, A],
                    sliding_window=5, conv_L_cache=4, use_sandwich_norm=True, use_attention_gate=True,
                    rope_parameters=rope(100.0, 200.0, "default", 0.5), tie_word_embeddings=True)),
    "lfm3-gate-only": dict(
        seed=705, dtype="float32",
        what="lfm3; the output gate on, sandwich norms off (the two switched independently); window 3; GQA 6/2",
        config=dict(vocab_size=67, hidden_size=36, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=8, intermediate_size=56, layer_types=[S, C, A, S],
                    sliding_window=3, conv_L_cache=4, use_sandwich_norm=False, use_attention_gate=True,
                    rope_parameters=rope(300.0, 30_000.0, "proportional", 0.5), tie_word_embeddings=True)),
    "lfm3-sandwich-only": dict(
        seed=706, dtype="float32",
        what="lfm3; sandwich norms on, the output gate off; window 5; conv_L_cache 6",
        config=dict(vocab_size=73, hidden_size=40, num_hidden_layers=4, num_attention_heads=5,
                    num_key_value_heads=1, head_dim=8, intermediate_size=64, layer_types=[C, S, C, A],
                    sliding_window=5, conv_L_cache=6, use_sandwich_norm=True, use_attention_gate=False,
                    rope_parameters=rope(700.0, 70_000.0, "proportional", 0.5), tie_word_embeddings=True)),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_model(case: dict) -> Lfm3ForCausalLM:
    config = Lfm3Config(**case["config"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        attn_implementation="eager")
    torch.manual_seed(case["seed"])
    model = Lfm3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # in [0.5, 1.5): not ones
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("conv.conv.weight"):
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        dt = TORCH_DTYPES[case["dtype"]]
        if dt != torch.float32:  # the reference sees exactly the weights that are stored
            for p in model.parameters():
                p.copy_(p.to(dt).to(torch.float32))
    return model


def checkpoint_tensors(model: Lfm3ForCausalLM, case: dict) -> dict[str, torch.Tensor]:
    """The state dict as released: ``g_proj`` saved as ``gate_proj``, no ``lm_head.weight`` when tied."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[name.replace(".self_attn.g_proj.", ".self_attn.gate_proj.")] = \
            t.detach().contiguous().to(TORCH_DTYPES[case["dtype"]])
    return out


def config_json(case: dict) -> dict:
    return {"architectures": ["Lfm3ForCausalLM"], "model_type": "lfm3", "torch_dtype": case["dtype"],
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "norm_eps": 1e-5, **case["config"]}


class Recorder:
    """Forward hooks keeping each module's input and output, keyed by HF module path (batch axis dropped)."""

    WANTED = ("operator_norm", "post_operator_norm", "ffn_norm", "post_ffn_norm", "conv", "self_attn", "q_norm",
              "k_norm", "v_proj", "g_proj", "o_proj", "in_proj", "feed_forward")

    def __init__(self, model: torch.nn.Module):
        self.store: dict[str, np.ndarray] = {}
        self.handles = []
        for name, module in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            whole_layer = name.startswith("model.layers.") and name.count(".") == 2
            if name in ("model.embed_tokens", "model.embedding_norm", "lm_head", "model.rotary_emb") or whole_layer \
                    or (last in self.WANTED and not name.endswith("conv.conv")):
                self.handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            if name == "model.rotary_emb":
                kind = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
                self.put(f"{name}.{kind}.cos", output[0][0])
                self.put(f"{name}.{kind}.sin", output[1][0])
                return
            first = args[0] if args else kwargs.get("hidden_states")
            self.put(name + ".input", first)
            self.put(name + ".output", output[0] if isinstance(output, tuple) else output)
        return hook

    def put(self, key: str, t) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        t = t.detach().float()
        if t.dim() >= 2 and t.shape[0] == 1:
            t = t[0]
        self.store[key] = t.numpy().astype(np.float32)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def function_level(model: Lfm3ForCausalLM, store: dict[str, np.ndarray]) -> None:
    """RoPE application, the attention core (before the gate) and the causal conv: functions in transformers,
    run here on the captured inputs."""
    modeling = sys.modules[type(model).__module__]
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        p, kind = f"model.layers.{i}.", cfg.layer_types[i]
        with torch.no_grad():
            if kind != C:
                a = p + "self_attn."
                cos = torch.from_numpy(store[f"model.rotary_emb.{kind}.cos"])[None]
                sin = torch.from_numpy(store[f"model.rotary_emb.{kind}.sin"])[None]
                q = torch.from_numpy(store[a + "q_norm.output"])[None].transpose(1, 2)  # (1, H, T, hd)
                k = torch.from_numpy(store[a + "k_norm.output"])[None].transpose(1, 2)
                T, hd = q.shape[2], q.shape[3]
                v = torch.from_numpy(store[a + "v_proj.output"]).view(1, T, -1, hd).transpose(1, 2)
                q_rope, k_rope = modeling.apply_rotary_pos_emb(q, k, cos, sin)
                pos = torch.arange(T)
                hidden = pos[None, :] > pos[:, None]
                if kind == S:
                    hidden |= pos[None, :] <= pos[:, None] - cfg.sliding_window
                mask = torch.zeros(T, T).masked_fill(hidden, float("-inf"))[None, None]
                core, _ = modeling.eager_attention_forward(layer.self_attn, q_rope, k_rope, v, mask,
                                                           scaling=layer.self_attn.scaling)
                store[a + "q_rope"] = q_rope[0].transpose(0, 1).numpy()  # (T, H, hd)
                store[a + "k_rope"] = k_rope[0].transpose(0, 1).numpy()  # (T, G, hd)
                store[a + "v"] = v[0].transpose(0, 1).numpy()
                store[a + "attn_core"] = core[0].reshape(T, -1).numpy()  # (T, H*hd), before the gate
            else:
                c = p + "conv."
                bcx = torch.from_numpy(store[c + "in_proj.output"])[None].transpose(-1, -2)
                b_gate, c_gate, x = bcx.chunk(3, dim=-2)
                bx = b_gate * x
                conv = layer.conv.conv
                z = modeling.causal_conv1d_fn(bx, conv.weight.squeeze(1), conv.bias)
                store[c + "bx"] = bx[0].T.numpy()
                store[c + "conv_out"] = z[0].T.numpy()


def make_case(name: str, case: dict, out: Path) -> dict:
    directory = out / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    model = build_model(case)
    tensors = checkpoint_tensors(model, case)
    save_torch(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json(case), indent=2) + "\n")

    V = model.config.vocab_size
    rng = np.random.default_rng(case["seed"])
    ids = rng.integers(0, V, size=CAPTURE_LENGTH)
    rec = Recorder(model)
    with torch.no_grad():
        model(torch.from_numpy(ids)[None])
    rec.close()
    function_level(model, rec.store)
    golden = {"capture.ids": ids.astype(np.int64), **{"capture." + k: v for k, v in rec.store.items()}}
    with torch.no_grad():
        for T in SEQ_LENGTHS:
            sub = ids[:T] if T <= len(ids) else rng.integers(0, V, size=T)
            golden[f"logits.T{T}.ids"] = sub.astype(np.int64)
            golden[f"logits.T{T}"] = model(torch.from_numpy(sub)[None]).logits[0].numpy().astype(np.float32)
        bids = rng.integers(0, V, size=BATCH_SHAPE)
        golden["batch.ids"] = bids.astype(np.int64)
        golden["batch.logits"] = model(torch.from_numpy(bids)).logits.numpy().astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:  # transformers reads the written files to the same logits
        again = Lfm3ForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            reloaded = again(torch.from_numpy(bids)).logits.numpy()
        if not np.array_equal(reloaded, golden["batch.logits"]):
            raise SystemExit(f"{name}: transformers reloads the written checkpoint differently "
                             f"(max diff {np.abs(reloaded - golden['batch.logits']).max()})")
        half = Lfm3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager").eval()
        rec16 = Recorder(half)
        with torch.no_grad():
            half(torch.from_numpy(ids)[None])
        rec16.close()
        del tmp
    for key in ("model.embed_tokens.output", "lm_head.output",
                *[f"model.layers.{i}.output" for i in range(model.config.num_hidden_layers)]):
        golden["bf16." + key] = rec16.store[key]
    golden["bf16.ids"] = ids.astype(np.int64)
    save_file({k: np.ascontiguousarray(v) for k, v in golden.items()}, str(directory / "golden.safetensors"),
              metadata={"generator": f"tools/make_lfm3_fixtures.py v{GENERATOR_VERSION}"})
    return {"what": case["what"], "seed": case["seed"], "checkpoint_dtype": case["dtype"],
            "reference_config": {"model_type": "lfm3", **case["config"]}, "capture_length": CAPTURE_LENGTH,
            "seq_lengths": list(SEQ_LENGTHS), "batch_shape": list(BATCH_SHAPE)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "golden"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(1)  # deterministic reductions
    manifest = {"generator": "tools/make_lfm3_fixtures.py", "generator_version": GENERATOR_VERSION,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "numpy": np.__version__, "python": sys.version.split()[0]},
                "reference": "transformers Lfm3ForCausalLM, float32, eager attention, CPU", "cases": {}}
    for name, case in CASES.items():
        manifest["cases"][name] = make_case(name, case, out)
        print(f"{name}: ok")
    (out / "lfm3_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
