#!/usr/bin/env python
"""Regenerate the LFM2-VL golden fixtures (tests/golden/vl-*/, tests/golden/vl-images/ and
tests/golden/vl_manifest.json) from transformers 5.25's ``Lfm2VlForConditionalGeneration`` and its image processor.

Needs the reference environment (torch, transformers 5.25, torchvision imported through tools/torchvision_cpu.py,
pillow); run it with ``PYTHONPATH=. /work/venv-ref/bin/python tools/make_vl_fixtures.py``. The tests never import
torch: they read what this script writes.

1. Writes a few small synthetic images (PNG) whose sizes make the tiny processors upscale, keep one tile with
   padding, go very wide (fewer patch rows than the position grid: an antialiased downscale of the positions) and
   tile with a thumbnail.
2. For each tiny configuration below, builds the model (float32, eager attention), randomises EVERY parameter
   (LayerNorm and RMSNorm weights and biases included: transformers initialises norms to ones and biases to
   zeros, which would hide a missing norm or bias), writes the checkpoint (the released tower names
   ``model.vision_tower.vision_model.*``, or transformers 5.25's ``model.vision_tower.*`` as its save_pretrained
   writes them), config.json and preprocessor_config.json, and checks ``from_pretrained`` gives the same logits.
3. Runs the image processor on the images (pixel_values, pixel_attention_mask, spatial_shapes), builds ids with
   each image's placeholders (image_token_id, tokens per tile = (h/f)(w/f)) between text ids, and records with
   forward hooks every vision value the trace schema names (module outputs; the resized position embeddings
   from transformers' own resize function; the projector's values for the real tokens only), the placed input
   embeddings, the text layers' outputs and the logits; and the logits of the text-only ids.
4. vl-chat: a checkpoint directory as a user has one (processor_config.json, the processor fixtures' tokenizer and
   chat template) and transformers' whole path from image files (``load_image``) and a chat through
   ``Lfm2VlProcessor`` (ids, pixel values) and the model: the tower's input and output, the unshuffled tokens, the
   projector's output, the placed embeddings, the logits and a few greedy tokens of ``generate``.
5. bf16 (``reference-bf16.safetensors`` beside vl-layernorm's reference; alone with ``--bf16-only``): the committed
   checkpoint loaded by transformers with ``dtype=torch.bfloat16`` and run on the recorded pixel batch and ids;
   the tower's input, each encoder layer, the post-layernorm, the projector's values and the logits, as bf16 bits
   (the reference of lfm2np's bfloat16 emulation of the vision path).

Usage:  PYTHONPATH=. /work/venv-ref/bin/python tools/make_vl_fixtures.py [--out tests/golden] [--bf16-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchvision_cpu  # noqa: E402,F401  (before transformers' image processors)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402
from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration  # noqa: E402
from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor  # noqa: E402

GENERATOR_VERSION = 1
IMAGE_TOKEN = 100
#: name -> (height, width): upscaled / one padded tile / very wide / tiled with a thumbnail
IMAGES = {"small": (22, 30), "single": (40, 28), "wide": (12, 100), "tiled": (75, 110)}
TEXT = dict(model_type="lfm2", vocab_size=130, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=96, layer_types=["conv", "full_attention", "conv"],
            block_auto_adjust_ff_dim=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES: dict[str, dict] = {
    "vl-layernorm": dict(
        seed=901, released_names=True,
        what="projector LayerNorm and biases on; 4 x 4 position grid; 2 tower layers, 4 heads of 8; tied head; "
             "released tower names (vision_model); min_tiles 2",
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                    num_patches=16),
        top=dict(projector_hidden_size=56, projector_use_layernorm=True, projector_bias=True, downsample_factor=2,
                 tie_word_embeddings=True),
        processor=dict(encoder_patch_size=4, downsample_factor=2, tile_size=32, min_image_tokens=4,
                       max_image_tokens=16, min_tiles=2, max_tiles=4, use_thumbnail=True, do_image_splitting=True,
                       max_pixels_tolerance=2.0)),
    "vl-nolayernorm": dict(
        seed=902, released_names=False,
        what="no projector LayerNorm, no projector biases; 8 x 8 position grid; 3 tower layers, 2 heads of 12; "
             "untied head; transformers 5.25's saved tower names; min_tiles 1",
        vision=dict(hidden_size=24, intermediate_size=36, num_hidden_layers=3, num_attention_heads=2, patch_size=4,
                    num_patches=64),
        top=dict(projector_hidden_size=40, projector_use_layernorm=False, projector_bias=False, downsample_factor=2,
                 tie_word_embeddings=False),
        processor=dict(encoder_patch_size=4, downsample_factor=2, tile_size=32, min_image_tokens=4,
                       max_image_tokens=16, min_tiles=1, max_tiles=4, use_thumbnail=True, do_image_splitting=True,
                       max_pixels_tolerance=2.0)),
}
TOWER, SAVED = "model.vision_tower.vision_model.", "model.vision_tower."
#: the whole path from image files: a checkpoint directory with the processor fixtures' tokenizer and chat template
#: (LFM2-VL's image tokens at their released ids, <image> = 396), transformers' Lfm2VlProcessor on the image files
#: (load_image: Pillow) and a chat, then the model; and a few greedy tokens of model.generate
CHAT = dict(
    seed=903, released_names=True,
    what="the full path: processor_config.json + tokenizer + chat template, images from files through "
         "Lfm2VlProcessor, a chat with two images, greedy generation; projector LayerNorm on, tied head",
    vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                num_patches=16),
    top=dict(projector_hidden_size=56, projector_use_layernorm=True, projector_bias=True, downsample_factor=2,
             tie_word_embeddings=True),
    text=dict(vocab_size=768, eos_token_id=7), image_token_id=396,
    processor=dict(encoder_patch_size=4, downsample_factor=2, tile_size=32, min_image_tokens=4, max_image_tokens=16,
                   min_tiles=2, max_tiles=4, use_thumbnail=True, do_image_splitting=True, max_pixels_tolerance=2.0),
    images=["small", "tiled"], chat="Which of the two is larger?", new_tokens=8)
#: what the chat case keeps of the recorded values (the stages: tower input and output, unshuffled tokens,
#: projector output, placed embeddings)
CHAT_KEEP = (TOWER + "embeddings", TOWER + "post_layernorm", "model.multi_modal_projector.pixel_unshuffle",
             "model.multi_modal_projector.linear_2", "model.inputs_embeds")
PROCESSOR_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests/golden/vl-processor/checkpoint"


def make_images(out: Path) -> dict[str, Path]:
    """Smooth colour gradients with noise (deterministic), so that resizing and patches carry real structure."""
    rng = np.random.default_rng(7)
    paths = {}
    for name, (h, w) in IMAGES.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 5 - c) for c in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        paths[name] = out / f"{name}.png"
        Image.fromarray(pixels, "RGB").save(paths[name])
    return paths


def build(case: dict) -> Lfm2VlForConditionalGeneration:
    config = Lfm2VlConfig(text_config={**TEXT, **case.get("text", {})}, vision_config=dict(model_type="siglip2_vision_model",
                          vision_use_head=False, **case["vision"]), image_token_id=case.get("image_token_id", IMAGE_TOKEN),
                          attn_implementation="eager", **case["top"])
    torch.manual_seed(case["seed"])
    model = Lfm2VlForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))  # in [0.5, 1.5): not ones
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name == "lm_head.weight" or "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("conv.conv.weight"):
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def checkpoint(model: Lfm2VlForConditionalGeneration, case: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if case["released_names"] and name.startswith(SAVED):
            name = TOWER + name[len(SAVED):]
        out[name] = t.detach().contiguous()
    return out


def lfm2np_name(key: str) -> str:
    """A capture key of this script (module path, transformers 5.25's) -> lfm2np's trace name."""
    key = key[:-len(".output")] if key.endswith(".output") else key
    if key.startswith(SAVED):
        return TOWER + key[len(SAVED):]
    return key.replace("model.language_model.", "model.")


class Recorder:
    """Forward hooks: every module output the schema names (the vision tower's, the projector's, the text layers'),
    and the inputs that hold function-level values (attn_out: out_proj's input; attn_residual: layer_norm2's)."""

    def __init__(self, model: torch.nn.Module):
        self.store: dict[str, torch.Tensor] = {}
        # the projector's first module reads the unshuffled tokens
        self.first = "model.multi_modal_projector." + ("layer_norm" if model.config.projector_use_layernorm
                                                       else "linear_1")
        self.handles = []
        for name, module in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            vision = name.startswith(SAVED) and last in (
                "patch_embedding", "embeddings", "layer_norm1", "q_proj", "k_proj", "v_proj", "out_proj",
                "layer_norm2", "fc1", "activation_fn", "fc2", "post_layernorm") or \
                (name.startswith(SAVED + "encoder.layers.") and name.count(".") == 4)
            projector = name.startswith("model.multi_modal_projector.")
            text = (name.startswith("model.language_model.layers.") and name.count(".") == 3) or \
                name in ("model.language_model", "model.language_model.embed_tokens", "model.language_model.embedding_norm")
            if vision or projector or text:
                self.handles.append(module.register_forward_hook(self.hook(name), with_kwargs=True))

    def hook(self, name: str):
        def record(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
            if name == "model.language_model":
                self.store["model.inputs_embeds"] = kwargs["inputs_embeds"][0].detach().clone()
                return
            key = name.replace(".mlp.activation_fn", ".mlp.act")
            self.store[key + ".output"] = out.detach().clone()
            if name.endswith("self_attn.out_proj"):
                self.store[name.replace("self_attn.out_proj", "self_attn.attn_out")] = args[0].detach().clone()
            if name.endswith("layer_norm2"):
                self.store[name.replace("layer_norm2", "attn_residual")] = args[0].detach().clone()
            if name == self.first:
                self.store["model.multi_modal_projector.pixel_unshuffle"] = args[0].detach().clone()
        return record

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def real_tokens(batch, f: int) -> tuple[list[int], torch.Tensor]:
    """Each image's tokens, and which of the projector's token slots (every image's padded to the most an image
    can have) are real."""
    tokens = [(int(h) // f) * (int(w) // f) for h, w in batch["spatial_shapes"]]
    slots = batch["pixel_values"].shape[1] // f ** 2
    return tokens, torch.cat([torch.arange(slots) < n for n in tokens])


def run_case(name: str, case: dict, images: dict[str, Path], out: Path) -> dict:
    model = build(case)
    cfg = model.config
    directory = out / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    save_torch(checkpoint(model, case), str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(cfg.to_json_string())
    config.pop("transformers_version", None)
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    processor = Lfm2VlImageProcessor(**case["processor"])
    processor.save_pretrained(directory)

    pil = [Image.open(images[k]).convert("RGB") for k in IMAGES]
    batch = processor(pil, return_tensors="pt", return_row_col_info=True)
    f = cfg.downsample_factor
    tiles_per_image = [int(r) * int(c) + (1 if int(r) * int(c) > 1 and case["processor"]["use_thumbnail"] else 0)
                       for r, c in zip(batch["image_rows"], batch["image_cols"])]
    tokens, real = real_tokens(batch, f)
    ids, t = [1, 5, 6], 0
    for n, count in enumerate(tiles_per_image):
        ids += [IMAGE_TOKEN] * sum(tokens[t:t + count]) + [7 + n, 11]
        t += count
    ids += [9, 10]
    assert t == len(tokens), (tiles_per_image, tokens)
    ids_t = torch.tensor([ids])
    inputs = dict(pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"],
                  spatial_shapes=batch["spatial_shapes"])
    rec = Recorder(model)
    with torch.no_grad():
        logits = model(input_ids=ids_t, **inputs).logits[0]
        rec.close()
        text_ids = torch.tensor([[1, 5, 6, 7, 11, 9, 10, 12, 3]])
        text_logits = model(input_ids=text_ids).logits[0]
        emb = model.model.vision_tower.embeddings
        grid = emb.position_embedding.weight.reshape(emb.position_embedding_size, emb.position_embedding_size, -1)
        positions = emb.resize_positional_embeddings(grid, batch["spatial_shapes"], batch["pixel_values"].shape[1])

    with tempfile.TemporaryDirectory() as tmp:  # the written checkpoint reloads to the same logits
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
        if case["released_names"]:  # from_pretrained reads 5.25's names; the released ones are mapped back here
            from safetensors.torch import load_file
            tensors = {k.replace(TOWER, SAVED): v for k, v in load_file(str(directory / "model.safetensors")).items()}
            save_torch(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        again = Lfm2VlForConditionalGeneration.from_pretrained(tmp, attn_implementation="eager").eval()
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids_t, **inputs).logits[0], logits), name

    # the projector runs on every image's token slots padded to the most an image can have: keep the real ones
    store = {}
    for key, value in rec.store.items():
        value = value[0] if value.dim() >= 2 and value.shape[0] == 1 and not key.startswith(SAVED) else value
        if key.startswith("model.multi_modal_projector."):
            value = value.reshape(-1, value.shape[-1])[real]
        store[lfm2np_name(key)] = value
    store[TOWER + "embeddings.position_embedding"] = positions
    store[TOWER + "encoder.attention_mask"] = batch["pixel_attention_mask"].float()
    reference = {k: v.detach().float().numpy().astype(np.float32) for k, v in store.items()}
    reference.update(pixel_values=batch["pixel_values"].numpy().astype(np.float32),
                     pixel_attention_mask=batch["pixel_attention_mask"].numpy().astype(np.int32),
                     spatial_shapes=batch["spatial_shapes"].numpy().astype(np.int64),
                     ids=np.array(ids, np.int64), logits=logits.numpy(), text_ids=text_ids[0].numpy(),
                     text_logits=text_logits.numpy())
    save_file({k: np.ascontiguousarray(v) for k, v in reference.items()}, str(directory / "reference.safetensors"),
              metadata={"generator": f"tools/make_vl_fixtures.py v{GENERATOR_VERSION}",
                        "transformers": transformers.__version__, "torch": torch.__version__})
    return {"what": case["what"], "images": list(IMAGES), "tiles_per_image": tiles_per_image, "tokens": tokens,
            "T": len(ids)}


def run_chat(name: str, case: dict, images: dict[str, Path], out: Path) -> dict:
    """The chat case: a checkpoint directory a user would have, and transformers' whole path on image files."""
    from transformers import AutoProcessor
    from transformers.image_utils import load_image
    model = build(case)
    with torch.no_grad():  # the tied rows of the special and reserved ids (0..500) smaller, so that greedy
        model.model.language_model.embed_tokens.weight[:501] *= 0.1  # generation emits text, not markers
    directory = out / name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    save_torch(checkpoint(model, case), str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(model.config.to_json_string())
    config.pop("transformers_version", None)
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(PROCESSOR_CHECKPOINT / f, directory / f)
    settings = dict(case["processor"], image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2, do_rescale=True,
                    rescale_factor=1 / 255, do_normalize=True, do_pad=True, image_processor_type="Lfm2VlImageProcessor")
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "Lfm2VlProcessor", "use_image_special_tokens": True, "image_processor": settings},
        indent=1) + "\n")
    processor = AutoProcessor.from_pretrained(str(directory))
    files = [images[k] for k in case["images"]]
    messages = [{"role": "user", "content": [{"type": "image"} for _ in files] + [{"type": "text",
                                                                                     "text": case["chat"]}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(images=[load_image(str(f)) for f in files], text=rendered, return_tensors="pt")
    rec = Recorder(model)
    with torch.no_grad():
        logits = model(**enc).logits[0]
        rec.close()
        generated = model.generate(**enc, max_new_tokens=case["new_tokens"], do_sample=False)[0, enc["input_ids"].shape[1]:]
    tokens, real = real_tokens(enc, model.config.downsample_factor)
    store = {}
    for key, value in rec.store.items():
        name = lfm2np_name(key)
        if name not in CHAT_KEEP:
            continue
        value = value[0] if value.dim() >= 2 and value.shape[0] == 1 and not key.startswith(SAVED) else value
        store[name] = value.reshape(-1, value.shape[-1])[real] if name.startswith("model.multi") else value
    reference = {k: v.detach().float().numpy().astype(np.float32) for k, v in store.items()}
    reference.update(pixel_values=enc["pixel_values"].numpy().astype(np.float32),
                     pixel_attention_mask=enc["pixel_attention_mask"].numpy().astype(np.int32),
                     spatial_shapes=enc["spatial_shapes"].numpy().astype(np.int64),
                     ids=enc["input_ids"][0].numpy().astype(np.int64), logits=logits.numpy(),
                     generated=generated.numpy().astype(np.int64))
    save_file({k: np.ascontiguousarray(v) for k, v in reference.items()}, str(directory / "reference.safetensors"),
              metadata={"generator": f"tools/make_vl_fixtures.py v{GENERATOR_VERSION}",
                        "transformers": transformers.__version__, "torch": torch.__version__})
    return {"what": case["what"], "images": case["images"], "chat": case["chat"], "rendered": rendered,
            "tokens": tokens, "T": int(enc["input_ids"].shape[1]), "generated": generated.tolist()}


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bit patterns (uint16): half a float32's bytes, exactly."""
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def run_bf16(name: str, out: Path) -> dict:
    """transformers in bfloat16 on a case's committed checkpoint and its recorded inputs (the pixel batch and
    the ids of ``reference.safetensors``): the model loaded with ``dtype=torch.bfloat16`` (weights, buffers and
    activations, as the text fixtures' bf16 references are made), eager attention. Kept, as bf16 bits: the tower's
    input (embeddings), each encoder layer's output, its output (post_layernorm), the projector's values on the
    real tokens (layer_norm, linear_1, linear_2: the image features) and the logits."""
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch
    directory = out / name
    ref = load_file(str(directory / "reference.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:  # 5.25's tower names, as from_pretrained reads them
        shutil.copy(directory / "config.json", Path(tmp) / "config.json")
        tensors = {k.replace(TOWER, SAVED): v for k, v in load_torch(str(directory / "model.safetensors")).items()}
        save_torch(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = Lfm2VlForConditionalGeneration.from_pretrained(tmp, dtype=torch.bfloat16,
                                                               attn_implementation="eager").eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = dict(pixel_values=torch.from_numpy(ref["pixel_values"]),
                  pixel_attention_mask=torch.from_numpy(ref["pixel_attention_mask"]).bool(),
                  spatial_shapes=torch.from_numpy(ref["spatial_shapes"]))
    rec = Recorder(model)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ref["ids"])[None], **inputs).logits[0]
    rec.close()
    _, real = real_tokens(inputs, model.config.downsample_factor)
    layers = range(model.config.vision_config.num_hidden_layers)
    keep = [TOWER + "embeddings", *(f"{TOWER}encoder.layers.{i}" for i in layers), TOWER + "post_layernorm",
            *(f"model.multi_modal_projector.{m}" for m in ("layer_norm", "linear_1", "linear_2"))]
    store = {}
    for key, value in rec.store.items():
        key_name = lfm2np_name(key)
        if key_name in keep:
            value = value[0] if value.dim() >= 2 and value.shape[0] == 1 and not key.startswith(SAVED) else value
            store[key_name] = value.reshape(-1, value.shape[-1])[real] if key_name.startswith("model.multi") else value
    assert sorted(store) == sorted(keep), sorted(store)
    bits = {k: bf16_bits(v) for k, v in store.items()}
    bits["logits"] = bf16_bits(logits)
    save_file(bits, str(directory / "reference-bf16.safetensors"),
              metadata={"generator": f"tools/make_vl_fixtures.py v{GENERATOR_VERSION}", "dtype": "bfloat16 bits",
                        "transformers": transformers.__version__, "torch": torch.__version__,
                        "inputs": "reference.safetensors: pixel_values, pixel_attention_mask, spatial_shapes, ids"})
    return {"values": sorted(bits), "logits_argmax_equal_float32": float(
        (logits.float().argmax(-1).numpy() == ref["logits"].argmax(-1)).mean())}


BF16_CASE = "vl-layernorm"  #: the case whose checkpoint transformers also runs in bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/golden", type=Path)
    parser.add_argument("--bf16-only", action="store_true",
                        help=f"only the bfloat16 reference of the committed {BF16_CASE} checkpoint (step 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.bf16_only:
        manifest = json.loads((args.out / "vl_manifest.json").read_text())
        manifest["bf16"] = {BF16_CASE: run_bf16(BF16_CASE, args.out)}
        (args.out / "vl_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print("bf16", manifest["bf16"])
        return
    images_dir = args.out / "vl-images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images = make_images(images_dir)
    manifest = {"generator": f"tools/make_vl_fixtures.py v{GENERATOR_VERSION}",
                "transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for name, case in CASES.items():
        manifest["cases"][name] = run_case(name, case, images, args.out)
        print(name, manifest["cases"][name])
    manifest["chat"] = {"vl-chat": run_chat("vl-chat", CHAT, images, args.out)}  # (not a tower case: no text_ids)
    print("vl-chat", manifest["chat"]["vl-chat"])
    manifest["bf16"] = {BF16_CASE: run_bf16(BF16_CASE, args.out)}
    print("bf16", manifest["bf16"])
    (args.out / "vl_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
