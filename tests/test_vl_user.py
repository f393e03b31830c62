"""LFM2-VL as a user meets it: a checkpoint directory (weights, processor_config.json, tokenizer, chat template), image
files, a chat; transformers' whole path recorded by tools/make_vl_fixtures.py (tests/golden/vl-chat: Lfm2VlProcessor
on the files and the chat, then the model, then greedy generation). The API (load sets the image processor,
encode_with_images, forward/Generation with images) and the commands (generate, trace, chat's /image), and their
hostile inputs."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import lfm2np
from lfm2np.cli import main
from lfm2np.embedded import embedded_model_path
from lfm2np.generate import Generation, Sampling
from lfm2np.io.tokenizer import Tokenizer
from lfm2np.oracle.tolerance import FP32, rel_error
from lfm2np.oracle.trace import Trace, record
from lfm2np.processor import ImageBatch, ImageProcessor, ProcessorConfig
from lfm2np.prompting import encode_with_images, placeholders
from lfm2np.vision_schema import PROJECTOR, TOWER

from conftest import GOLDEN

CHAT = GOLDEN / "vl-chat"
CASE = json.loads((GOLDEN / "vl_manifest.json").read_text())["chat"]["vl-chat"]
FILES = [str(GOLDEN / "vl-images" / f"{name}.png") for name in CASE["images"]]
IMAGE_ID = 396


@functools.lru_cache(maxsize=None)
def reference() -> dict[str, np.ndarray]:
    return load_file(str(CHAT / "reference.safetensors"))


@functools.lru_cache(maxsize=None)
def loaded() -> tuple[lfm2np.Model, Tokenizer]:
    return lfm2np.load(CHAT), Tokenizer.load(CHAT)


def test_loading_a_vl_directory_sets_its_image_processor():
    model, _ = loaded()
    assert isinstance(model.image_processor, ImageProcessor)
    assert model.image_processor.config == ProcessorConfig.from_dir(CHAT)
    assert model.image_processor.config.tile_size == 32  # the file's value, not the released default
    assert lfm2np.load("embedded").image_processor is None  # a text model has none


def test_the_whole_path_from_image_files_is_within_the_fp32_tier_of_transformers():
    """ids (processor + tokenizer + template), pixel values, tower, projector, placed embeddings and logits against
    transformers' Lfm2VlProcessor and model on the same files and chat."""
    model, tok = loaded()
    r = reference()
    ids, batch = encode_with_images(model, tok, FILES, chat=CASE["chat"])
    assert ids == r["ids"].tolist()  # the same image token count and layout (markers, tiles, thumbnail)
    assert batch.tokens_per_image == [CASE["tokens"][0], sum(CASE["tokens"][1:])]
    assert np.array_equal(batch.pixel_values, r["pixel_values"])  # bit for bit
    assert np.array_equal(batch.pixel_attention_mask, r["pixel_attention_mask"] > 0)
    assert np.array_equal(batch.spatial_shapes, r["spatial_shapes"])
    logits, trace = record(model, ids, images=FILES)  # file paths, through the model's processor
    stages = {"tower input": TOWER + "embeddings", "vision tower": TOWER + "post_layernorm",
              "unshuffled": PROJECTOR + "pixel_unshuffle", "projector": PROJECTOR + "linear_2",
              "placed embeddings": "model.inputs_embeds"}
    errors = {k: rel_error(trace[v], r[v]) for k, v in stages.items()}
    assert all(e < FP32.op_rel for e in errors.values()), errors
    assert rel_error(logits, r["logits"]) < FP32.logits_rel
    print("vl-chat", {k: f"{e:.1e}" for k, e in errors.items()}, f"logits {rel_error(logits, r['logits']):.1e}")


def test_forward_takes_file_paths_arrays_or_a_processed_batch_alike():
    model, tok = loaded()
    ids, batch = encode_with_images(model, tok, FILES, chat=CASE["chat"])
    arrays = [np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(f).convert("RGB")) for f in FILES]
    from_files = model.forward(ids, images=FILES)
    assert np.array_equal(model.forward(ids, images=arrays), from_files)
    assert np.array_equal(model.forward(ids, images=batch), from_files)


def test_greedy_generation_with_images_gives_transformers_tokens():
    model, tok = loaded()
    ids, batch = encode_with_images(model, tok, FILES, chat=CASE["chat"])
    gen = Generation(model, ids, len(CASE["generated"]), Sampling(temperature=0.0), stop_ids=[7], images=batch)
    assert list(gen) == CASE["generated"]


def test_placement_images_first_or_at_each_placeholder():
    model, tok = loaded()
    first, _ = encode_with_images(model, tok, FILES, chat=CASE["chat"])
    marked, _ = encode_with_images(model, tok, FILES, chat="<image><image>" + CASE["chat"])
    assert first == marked
    moved, _ = encode_with_images(model, tok, FILES, chat="A <image> and B <image>?")
    assert moved.count(IMAGE_ID) == first.count(IMAGE_ID) and moved != first
    text, _ = encode_with_images(model, tok, FILES[:1], text="Look: <image> there")
    assert text[0] == 1 and text.count(IMAGE_ID) == CASE["tokens"][0]
    assert placeholders([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>"}]}]) == 2


def test_min_tiles_1_just_past_the_threshold_writes_one_placeholder_per_feature():
    """The 792x660 case of the released settings, at the fixture's scale (44x46, tiles of 32): a 1x1 grid of one
    tile (16 features). lfm2np writes 16 placeholders and the model runs; transformers 5.25's count (12, the
    smart-resized size's) is what its model then refuses, and lfm2np's model refuses it too, by name."""
    model, tok = loaded()
    image = np.random.default_rng(0).integers(0, 256, (44, 46, 3), dtype=np.uint8)
    one = ImageProcessor(model.image_processor.config.replace(min_tiles=1))
    ids, batch = encode_with_images(model, tok, one([image]), text="<image>")
    layout = batch.layouts[0]
    assert (layout.tiled, layout.rows, layout.cols, layout.units, layout.thumbnail) == (True, 1, 1, ((32, 32),), False)
    assert ids.count(IMAGE_ID) == batch.tokens_per_image[0] == 16
    assert np.isfinite(model.forward(ids, images=batch)).all()
    theirs = ImageProcessor(one.config.replace(single_tile_placeholders="transformers-5.25"))
    ids_5_25, _ = encode_with_images(model, tok, theirs([image]), text="<image>")
    assert ids_5_25.count(IMAGE_ID) == 12
    with pytest.raises(lfm2np.Lfm2npError, match="12 image placeholders .* give 16 image tokens"):
        model.forward(ids_5_25, images=batch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(chat="<image> only one"), "1 <image> placeholder for 2 images"),
    (dict(chat="<image><image><image>"), "3 <image> placeholders for 2 images"),
    (dict(text="x", chat="y"), "one prompt"),
    (dict(), "one prompt"),
    (dict(messages=[{"role": "system", "content": "s"}]), "no user message"),
])
def test_bad_prompts_with_images_are_errors(kwargs, message):
    model, tok = loaded()
    with pytest.raises(lfm2np.Lfm2npError, match=message):
        encode_with_images(model, tok, FILES, **kwargs)


def test_a_text_model_or_a_vl_model_without_processor_settings_refuses_images(tmp_path):
    text_model = lfm2np.load("embedded")
    with pytest.raises(lfm2np.Lfm2npError, match="no vision tower"):
        encode_with_images(text_model, Tokenizer.load(embedded_model_path()), FILES, chat="hi")
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((CHAT / f).read_bytes())
    bare = lfm2np.load(tmp_path)
    assert bare.image_processor is None
    with pytest.raises(lfm2np.Lfm2npError, match="image processor"):
        bare.forward(reference()["ids"], images=FILES)


def test_a_processor_that_does_not_fit_the_model_is_refused_at_load(tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((CHAT / f).read_bytes())
    settings = json.loads((CHAT / "processor_config.json").read_text())
    settings["image_processor"]["encoder_patch_size"] = 16
    (tmp_path / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(lfm2np.Lfm2npError, match="encoder_patch_size 16 but the model's config.json says patch_size 4"):
        lfm2np.load(tmp_path)


# ------------------------------------------------------------------------------------------- commands
def test_generate_with_images_streams_transformers_tokens(capsys):
    model, tok = loaded()
    argv = ["generate", str(CHAT), "--chat", CASE["chat"], "--temperature", "0", "-n", str(len(CASE["generated"]))]
    for f in FILES:
        argv += ["--image", f]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == tok.decode(CASE["generated"]) + "\n"
    assert f"prompt {len(reference()['ids'])} tokens" in captured.err


def test_trace_with_images_records_the_ids_it_ran(tmp_path, capsys):
    r = reference()
    out = tmp_path / "t.safetensors"
    images = [x for f in FILES for x in ("--image", f)]
    assert main(["trace", str(CHAT), "--chat", CASE["chat"], *images, "--out", str(out)]) == 0
    trace = Trace.load(out)
    assert trace.meta["ids"] == r["ids"].tolist() and trace.meta["images"] == FILES
    assert rel_error(trace["lm_head"], r["logits"]) < FP32.logits_rel
    assert rel_error(trace[PROJECTOR + "linear_2"], r[PROJECTOR + "linear_2"]) < FP32.op_rel
    again = tmp_path / "ids.safetensors"  # the same ids given already expanded
    assert main(["trace", str(CHAT), "--ids", *map(str, trace.meta["ids"]), *images, "--out", str(again)]) == 0
    assert np.array_equal(Trace.load(again)["lm_head"], trace["lm_head"])


def test_bad_image_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    ids = " ".join(map(str, reference()["ids"][:12]))  # part of the first image's placeholders
    cases = [
        (["generate", str(CHAT), "--chat", "hi", "--image", str(tmp_path / "missing.png")], "no such file"),
        (["generate", str(CHAT), "--chat", "hi", "--image", str(corrupt)], "not a readable image"),
        (["generate", str(CHAT), "--chat", "<image> and <image>", "--image", FILES[0]], "2 <image> placeholders for 1"),
        (["generate", str(CHAT), "--text", "<image>", "--image", FILES[0], "--image", FILES[1]],
         "1 <image> placeholder for 2 images"),
        (["generate", "embedded", "--chat", "hi", "--image", FILES[0]], "no vision tower"),
        (["trace", "embedded", "--image", FILES[0], "--out", str(tmp_path / "t")], "no vision tower"),
        (["trace", str(CHAT), "--ids", *ids.split(), "--image", FILES[0], "--out", str(tmp_path / "t")],
         "image placeholders"),
        (["trace", str(CHAT), "--system", "s", "--out", str(tmp_path / "t")], "--system goes with --chat"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()  # (after "loaded ..." when the model was loaded)
        assert err[-1].startswith("lfm2np: error:") and message in err[-1], (argv, err)
        assert sum("error" in line for line in err) == 1 and len(err) <= 2 and "Traceback" not in "".join(err)


def test_chat_attaches_images_with_the_image_command():
    """/image FILE twice, then a message: the reply is the greedy generation of the same prompt; a bad /image is
    one line and the chat goes on; a second turn reuses the state that holds the images."""
    model, tok = loaded()
    n = len(CASE["generated"])
    wide = str(GOLDEN / "vl-images" / "wide.png")
    stdin = "\n".join([f"/image {FILES[0]}", "/image /no/such.png", f"/image {FILES[1]}", CASE["chat"],
                       "And now?", f"/image {wide}", "this one", "/exit"]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "lfm2np", "chat", str(CHAT), "--temperature", "0", "-n", str(n)],
                          input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [line[len("assistant: "):] for line in proc.stdout.splitlines() if line.startswith("assistant: ")]
    assert replies[0] == tok.decode(CASE["generated"]) and len(replies) == 3
    assert "/no/such.png" in proc.stderr and "nothing attached" in proc.stderr
    assert "attached to your next message (2 waiting)" in proc.stderr
    turns = [[int(w) for w in line.replace(",", " ").split() if w.isdigit()][:2]
             for line in proc.stderr.splitlines() if line.startswith("[turn ")]  # (conversation, reused)
    assert turns[0] == [len(reference()["ids"]), 0]
    assert turns[1][1] >= turns[0][0] and turns[2][1] >= turns[1][0]  # each turn feeds only its new ids and images


def test_chat_conversation_feeds_each_image_once():
    from lfm2np.cli.chat import Conversation
    model, tok = loaded()
    talk = Conversation(model, tok)
    for f in FILES:
        talk.attach(f)
    gen = talk.ask(CASE["chat"], 2, Sampling(temperature=0.0), {7})
    list(gen)
    talk.record(gen)
    assert talk.fed[:len(reference()["ids"]) - 1] == reference()["ids"][:-1].tolist()
    gen = talk.ask("more", 2, Sampling(temperature=0.0), {7})  # no new image: the state's images are not fed again
    assert talk.last["reused"] >= len(reference()["ids"]) - 1
    list(gen)
    ids, batch = encode_with_images(model, tok, FILES, messages=talk.messages + [{"role": "user", "content": "x"}])
    assert isinstance(batch, ImageBatch) and ids.count(IMAGE_ID) == sum(CASE["tokens"])


def test_the_mmproj_pair_has_an_image_processor_too():
    """llama.cpp's pair (text GGUF + mmproj GGUF) carries llama.cpp's processor settings as the same ImageProcessor,
    so encode_with_images reads them as a directory's."""
    pair = GOLDEN / "vl-gguf"
    model = lfm2np.load(pair / "text-f32.gguf", mmproj=pair / "mmproj-f32.gguf")
    assert isinstance(model.image_processor, ImageProcessor)
    assert model.image_processor.config.rounding == "llama.cpp" and "mmproj" in model.image_processor.config.source
