# %% [markdown]
# # 09 · LFM2-VL: an image through the processor, the vision tower and into the prompt
#
# A tiny LFM2-VL checkpoint directory (random weights, the processor settings, a tokenizer with LFM2-VL's image
# tokens at their released ids): `tests/golden/vl-chat`, whose whole path transformers recorded
# (`tools/make_vl_fixtures.py`). Its processor is the released one at a small scale: patches of 4 pixels instead of
# 16, tiles of 32 instead of 512, at most 16 image tokens per unit instead of 256. The same code runs the released
# sizes.

# %%
import matplotlib.pyplot as plt
import numpy as np

import lfm2np
from lfm2np.io.images import read_image
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.trace import record
from lfm2np.prompting import encode_with_images

directory = "../tests/golden/vl-chat"
model, tok = lfm2np.load(directory), Tokenizer.load(directory)
print(model)
print(model.image_processor.config.tile_size, model.image_processor.config.min_tiles,
      model.image_processor.config.max_image_tokens)

# %% [markdown]
# ## One image through the processor
# The image is 110 x 75 pixels: past the tiling threshold, so it is resized to a grid of tiles (here 2 x 2 tiles
# of 32 pixels) and, because it is tiled, a thumbnail (the smart-resized whole image) follows the tiles.

# %%
path = "../tests/golden/vl-images/tiled.png"
image = read_image(path)                          # (H, W, 3) uint8, as transformers' load_image reads it
batch = model.image_processor([path])
layout = batch.layouts[0]
print(f"image {layout.height}x{layout.width}: tiled {layout.tiled}, {layout.rows} rows x {layout.cols} cols, "
      f"thumbnail {layout.thumbnail} ({layout.resized[0]}x{layout.resized[1]})")
print("units (h, w) in pixels:", layout.units)
print("image tokens per unit:", layout.unit_tokens, "total", batch.tokens_per_image[0])

# %%
t = model.image_processor.config.tile_size
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].imshow(image)
axes[0].set_title(f"the image, {layout.width}x{layout.height}: tiles drawn over it")
sy, sx = image.shape[0] / (layout.rows * t), image.shape[1] / (layout.cols * t)  # grid canvas -> image pixels
for r in range(layout.rows):
    for c in range(layout.cols):
        axes[0].add_patch(plt.Rectangle((c * t * sx - 0.5, r * t * sy - 0.5), t * sx, t * sy, fill=False,
                                        edgecolor="yellow", linewidth=2))
        axes[0].text((c + 0.5) * t * sx, (r + 0.5) * t * sy, f"row {r + 1}\ncol {c + 1}", color="yellow",
                     ha="center", va="center")
thumb = batch.pixel_values[-1][batch.pixel_attention_mask[-1]]          # the thumbnail's real patches
h, w = batch.spatial_shapes[-1]
p = model.image_processor.config.encoder_patch_size
pixels = thumb.reshape(h, w, p, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)
axes[1].imshow((pixels * 0.5 + 0.5).clip(0, 1))                       # undo the normalisation (mean = std = 0.5)
axes[1].set_title(f"the thumbnail unit, {w * p}x{h * p}, as the tower sees it")
plt.tight_layout()

# %% [markdown]
# ## The patch grid and its mask
# Every unit is cut into p x p patches, row by row, and padded with zero patches to the same budget P; the mask
# marks the real ones. `spatial_shapes` says how many patch rows and columns each unit has, which the position
# embeddings are resized to.

# %%
N, P, _ = batch.pixel_values.shape
print(f"pixel_values {batch.pixel_values.shape}, pixel_attention_mask {batch.pixel_attention_mask.shape}")
for n in range(N):
    hh, ww = batch.spatial_shapes[n]
    print(f"unit {n}: {hh} x {ww} patches = {hh * ww} real of {P}; mask sum {batch.pixel_attention_mask[n].sum()}")
fig, ax = plt.subplots(figsize=(9, 1.8))
ax.imshow(batch.pixel_attention_mask, aspect="auto", cmap="Greens", interpolation="nearest")
ax.set_xlabel("patch slot"), ax.set_ylabel("unit"), ax.set_title("pixel_attention_mask (green: a real patch)")
plt.tight_layout()

# %% [markdown]
# ## Where the image tokens land in the prompt
# A chat with the image: each `<image>` placeholder (here the one the chat puts before the text) becomes the
# image's start and end markers, a marker per tile followed by its tokens, the thumbnail marker and its tokens.

# %%
ids, batch = encode_with_images(model, tok, [path], chat="What is this?")
runs, previous = [], None
for i in ids:
    piece = tok.decode([i])
    if runs and piece == previous:
        runs[-1][1] += 1
    else:
        runs.append([piece, 1])
    previous = piece
print(" ".join(p if n == 1 else f"{p}x{n}" for p, n in runs))
image_id = model.config.vision.image_token_id
print(f"{len(ids)} ids, {ids.count(image_id)} image placeholders = {batch.tokens_per_image[0]} image features")

# %%
fig, ax = plt.subplots(figsize=(9, 1.5))
ax.imshow((np.array(ids) == image_id)[None, :], aspect="auto", cmap="Oranges", interpolation="nearest")
ax.set_yticks([]), ax.set_xlabel("position"), ax.set_title("image placeholders (orange) in the prompt")
plt.tight_layout()

# %% [markdown]
# ## The vision tower's attention
# The trace holds every intermediate under transformers' module names: the tower's queries and keys of layer 0
# give its attention weights, `softmax(q k^T / sqrt(hd) + mask)`, the padding patches masked out. Below: where
# the thumbnail's centre patch looks, per head, over the thumbnail's 6 x 8 patch grid (its 16 padding patches,
# past the grid, get none).

# %%
logits, trace = record(model, ids, images=batch)
v = model.config.vision
tower = "model.vision_tower.vision_model."
q = trace[tower + "encoder.layers.0.self_attn.q_proj"][-1]    # the last unit, the thumbnail: (P, Dv)
k = trace[tower + "encoder.layers.0.self_attn.k_proj"][-1]
mask = batch.pixel_attention_mask[-1]
hh, ww = batch.spatial_shapes[-1]
centre = (hh // 2) * ww + ww // 2
fig, axes = plt.subplots(1, v.num_attention_heads, figsize=(9, 2.4))
for head in range(v.num_attention_heads):
    cols = slice(head * v.head_dim, (head + 1) * v.head_dim)
    scores = q[centre, cols] @ k[:, cols].T / np.sqrt(v.head_dim)
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    assert weights[~mask].sum() == 0 and (~mask).sum() == 16  # the padding gets no attention
    axes[head].imshow(weights[:hh * ww].reshape(hh, ww), cmap="viridis")
    axes[head].plot(ww // 2, hh // 2, "r+")
    axes[head].set_title(f"head {head}"), axes[head].axis("off")
fig.suptitle("layer 0: attention of the thumbnail's centre patch (red +)")
plt.tight_layout()
print("next-token argmax after the prompt:", int(logits[-1].argmax()))
