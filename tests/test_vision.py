"""The vision tower and the vision-language model: VL2's token counts and tiling against
hand-computed examples, the encoder against transformers' SigLIP, the adaptor's layout, placeholders
through the chat template, the checkpoint (and its language part alone in nanoseek, transformers and
GGUF), and a tiny model that learns a visual task on CPU."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from PIL import Image

from nanoseek.checkpoint import (
    VISION_FILE,
    CheckpointError,
    load_model,
    load_vision_language_model,
    save_model,
    save_vision_language_model,
)
from nanoseek.config import ConfigError, ModelConfig, VisionConfig
from nanoseek.data.images import (
    ImageError,
    encode_image_conversation,
    expand_image_tokens,
    image_input,
    merge_inputs,
    preprocess,
    select_best_resolution,
    tile_grid,
)
from nanoseek.model import Transformer
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.model.vision import (
    ImageInput,
    VisionLanguageModel,
    VisionTower,
    image_token_count,
    pixel_shuffle,
)
from nanoseek.tasks.visual import COLOURS, get_visual_task
from nanoseek.tokenizer import load_tokenizer

from helpers import TINY_VISION, small_tokenizer, tiny_config

VL2 = VisionConfig(
    hidden_size=1152 // 16,  # widths do not change counts; keep it cheap
    num_attention_heads=4,
    image_size=384,
    patch_size=14,
    max_tiles=9,
)


def tiny_vision(**overrides) -> VisionConfig:
    fields = dict(TINY_VISION)
    fields.update(overrides)
    return VisionConfig(**fields)


# ------------------------------------------------------------------------------ counts and tiling
def test_vl2_token_counts():
    # 384 px tiles of 14 px patches: 27 x 27 features, padded to 28, 2x2 -> 14 x 14 tokens
    assert VL2.patch_grid == 27 and VL2.token_grid == 14
    assert image_token_count(VL2, (1, 1)) == 421  # 14*15 + 1 + 14*15
    assert image_token_count(VL2, (2, 2)) == 1023  # 210 + 1 + 28*29
    assert image_token_count(VL2, (3, 3)) == 2017  # 210 + 1 + 42*43


def test_vl2_tiling_hand_computed():
    """800 x 400 among VL2's 9-tile candidates: every canvas at least 800 wide and 400 high keeps
    all 320 000 pixels; the least padding among them is 1152 x 768 (3 wide, 2 high)."""
    assert len(VL2.candidate_resolutions) == 23  # pairs (m, n) with m*n <= 9
    assert select_best_resolution((800, 400), VL2.candidate_resolutions) == (1152, 768)
    assert tile_grid((800, 400), VL2) == (3, 2)
    assert image_token_count(VL2, (3, 2)) == 210 + 1 + 28 * 43  # = 1415
    # with at most 4 tiles no canvas holds all of it: 768 x 384 keeps 294 912 with no waste
    four = VisionConfig(image_size=384, patch_size=14, max_tiles=4)
    assert select_best_resolution((800, 400), four.candidate_resolutions) == (768, 384)
    assert image_token_count(four, tile_grid((800, 400), four)) == 210 + 1 + 14 * 29  # = 617
    # a tie on kept pixels goes to the least padding: 128 x 64 at 32 px tiles keeps 2048 pixels
    # in 64x32, 128x32 and 64x64; only 64x32 wastes nothing
    tiny = tiny_vision()
    assert select_best_resolution((128, 64), tiny.candidate_resolutions) == (64, 32)
    # more than two images: no cropping, one local tile each (VL2's rule)
    imgs = [Image.new("RGB", (128, 64))] * 3
    assert image_input(imgs, tiny).grids == [(1, 1)] * 3
    assert image_input(imgs[:2], tiny).grids == [(2, 1)] * 2


def test_preprocess_letterboxes_and_normalises():
    v = tiny_vision()
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    tiles, grid = preprocess(img, v)
    assert grid == (2, 1) and tiles.shape == (3, 3, 32, 32)
    # global view: red band in the middle, mean-colour (127) padding above and below
    assert torch.allclose(tiles[0, :, 16, 16], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(tiles[0, :, 0, 16], torch.full((3,), 127 / 255 * 2 - 1))
    # local view: 64 x 32 canvas, exactly filled
    assert torch.allclose(tiles[1:, 0], torch.ones(2, 32, 32))


# ----------------------------------------------------------------------------- encoder + adaptor
def test_pixel_shuffle_order_and_odd_grid():
    x = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)  # 3x3 grid, 3 channels
    y = pixel_shuffle(x, 3)
    assert y.shape == (2, 4, 12)  # padded to 4x4, 2x2 tokens of 4*3 channels
    grid = x.view(2, 3, 3, 3)  # [N, row, col, C]
    # token 0 holds patches (0,0) (0,1) (1,0) (1,1), channel-major (F.unfold's order)
    want = torch.stack([grid[0, r, c, :] for r, c in ((0, 0), (0, 1), (1, 0), (1, 1))], dim=1)
    assert torch.equal(y[0, 0], want.reshape(-1))
    # token 3 (bottom right) has one real patch (2,2) and three zero pads
    assert torch.equal(y[0, 3].view(3, 4)[:, 0], grid[0, 2, 2])
    assert torch.equal(y[0, 3].view(3, 4)[:, 1:], torch.zeros(3, 3))


def test_tower_shapes_and_layout():
    torch.manual_seed(0)
    v = tiny_vision()
    tower = VisionTower(v, lm_hidden=48).eval()
    img = Image.effect_noise((128, 64), 60).convert("RGB")
    inputs = image_input([img], v)
    assert inputs.grids == [(2, 1)] and inputs.pixel_values.shape == (3, 3, 32, 32)
    with torch.no_grad():
        feats = tower.vision_model(inputs.pixel_values)
        assert feats.shape == (3, 16, 32)  # 4x4 patches of width 32
        tiles = tower.tile_embeddings(inputs.pixel_values)
        assert tiles.shape == (3, 2, 2, 48)  # 2x2 tokens of the LM's width
        out = tower(inputs)
    assert out.shape == (image_token_count(v, (2, 1)), 48) == (17, 48)
    nl, sep = tower.image_newline, tower.view_seperator
    # global: [t00 t01 nl t10 t11 nl], separator, local rows across both tiles
    expect = [
        tiles[0, 0, 0], tiles[0, 0, 1], nl, tiles[0, 1, 0], tiles[0, 1, 1], nl, sep,
        tiles[1, 0, 0], tiles[1, 0, 1], tiles[2, 0, 0], tiles[2, 0, 1], nl,
        tiles[1, 1, 0], tiles[1, 1, 1], tiles[2, 1, 0], tiles[2, 1, 1], nl,
    ]  # fmt: skip
    assert torch.allclose(out, torch.stack(expect).detach())


def test_encoder_matches_transformers_siglip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    v = tiny_vision(num_hidden_layers=2)
    tower = VisionTower(v, lm_hidden=48).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.2)
    hf_cfg = transformers.SiglipVisionConfig(
        **{k: getattr(v, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        vision_use_head=False,
    )
    # the keys as vision.safetensors stores them, under the prefix SigLIP checkpoints use
    from safetensors.torch import save_file

    state = {f"vision_model.{k}": t for k, t in tower.vision_model.state_dict().items()}
    save_file({k: t.contiguous() for k, t in state.items()}, tmp_path / "model.safetensors")
    hf_cfg.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.SiglipVisionModel.from_pretrained(tmp_path, output_loading_info=True)
    hf, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower.vision_model(pixels)
        theirs = hf(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_vision_config_validation_and_round_trip():
    v = tiny_vision()
    assert VisionConfig.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    with pytest.raises(ConfigError, match="vision_config.num_attention_heads"):
        tiny_vision(num_attention_heads=5)
    with pytest.raises(ConfigError, match="vision_config.projector_type"):
        tiny_vision(projector_type="linear")


# -------------------------------------------------------------------------- placeholders and chat
def _vlm(seed: int = 0, **vision) -> tuple[VisionLanguageModel, object]:
    tok = small_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    vlm = VisionLanguageModel.build(cfg, tiny_vision(**vision), tok.special_ids["image"])
    return vlm, tok


def test_image_conversation_round_trips_through_the_template():
    tok = small_tokenizer()
    v = tiny_vision()
    image_id = tok.special_ids["image"]
    messages = [
        {"role": "user", "content": "<image>\nWhat colour is the largest shape?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And this one? <image>"},
        {"role": "assistant", "content": "blue"},
    ]
    imgs = [Image.new("RGB", (128, 64)), Image.new("RGB", (32, 32))]
    ids, trainable, inputs = encode_image_conversation(tok, messages, imgs, v)
    counts = [image_token_count(v, g) for g in inputs.grids]
    assert inputs.grids == [(2, 1), (1, 1)] and counts == [17, 13]
    assert ids.count(image_id) == 30
    assert not any(t for i, t in zip(ids, trainable) if i == image_id)
    # collapsing each run of image ids gives back exactly the template's text
    collapsed = [t for k, t in enumerate(ids) if t != image_id or ids[k - 1] != image_id]
    assert tok.decode(collapsed) == tok.apply_chat_template(messages, tokenize=False)
    assert "<image>" in tok.apply_chat_template(messages, tokenize=False)
    # the runs sit where the placeholders were, in order
    first = ids.index(image_id)
    assert ids[first : first + 17] == [image_id] * 17 and ids[first + 17] != image_id
    # trained text: the two answers and their eos
    trained = tok.decode([t for t, m in zip(ids, trainable) if m])
    assert trained == "red<｜end▁of▁sentence｜>blue<｜end▁of▁sentence｜>"


def test_placeholders_and_images_must_pair_up():
    tok = small_tokenizer()
    v = tiny_vision()
    ids = tok.encode("<image> and <image>", allow_special=True)
    with pytest.raises(ImageError, match="2 <image> placeholder"):
        expand_image_tokens(ids, [(1, 1)], tok.special_ids["image"], v)
    vlm, _ = _vlm()
    inputs = image_input([Image.new("RGB", (32, 32))], vlm.vision.config)
    with pytest.raises(ValueError, match="13 tokens but the input has 1 <image>"):
        vlm(torch.tensor([[tok.special_ids["image"], 5]]), images=inputs)
    with pytest.raises(ValueError, match="no images"):
        vlm(torch.tensor([[tok.special_ids["image"], 5]]))


def test_text_path_unchanged_and_images_change_only_later_logits():
    vlm, tok = _vlm()
    vlm.eval()
    text = torch.tensor([tok.encode("hello there", add_bos=True)])
    with torch.no_grad():
        assert torch.equal(vlm(text), vlm.language_model(text))
    image_id = tok.special_ids["image"]
    ids = torch.tensor([[tok.bos_id, 7, *[image_id] * 13, 9, 11]])
    a = image_input([Image.new("RGB", (32, 32), (255, 0, 0))], vlm.vision.config)
    b = image_input([Image.new("RGB", (32, 32), (0, 0, 255))], vlm.vision.config)
    with torch.no_grad():
        la = vlm(ids, images=a)
        lb = vlm(ids, images=b)
    torch.testing.assert_close(la[:, :2], lb[:, :2])  # causal: nothing before the image changes
    assert not torch.allclose(la[:, -1], lb[:, -1])


# ------------------------------------------------------------------------------------- checkpoint
@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    vlm, tok = _vlm(seed=3)
    with torch.no_grad():  # non-trivial tower weights, so a mix-up would show
        for p in vlm.vision.parameters():
            p.normal_(0, 0.1)
    path = save_vision_language_model(vlm, tmp_path_factory.mktemp("vlm"), tokenizer=tok)
    return path, vlm.eval(), tok


def test_checkpoint_layout(vlm_checkpoint):
    path, vlm, _ = vlm_checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["image_token_id"] == vlm.image_token_id
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    from safetensors import safe_open

    with safe_open(str(path / VISION_FILE), "pt") as f:
        keys = set(f.keys())
    assert {"image_newline", "view_seperator", "projector.layers.0.weight"} <= keys
    assert "vision_model.embeddings.patch_embedding.weight" in keys
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "vision" in k or "projector" in k]
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["candidate_resolutions"][0] == [32, 32] and pre["image_mean"] == [0.5] * 3


def test_checkpoint_round_trip_with_images(vlm_checkpoint):
    path, vlm, tok = vlm_checkpoint
    loaded = load_vision_language_model(path)
    image_id = tok.special_ids["image"]
    img = Image.effect_noise((64, 32), 80).convert("RGB")
    inputs = image_input([img], vlm.vision.config)
    n = image_token_count(vlm.vision.config, inputs.grids[0])
    ids = torch.tensor([[tok.bos_id, *[image_id] * n, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images=inputs), vlm(ids, images=inputs))


def test_language_part_loads_alone_in_nanoseek(vlm_checkpoint, tmp_path, caplog):
    path, vlm, tok = vlm_checkpoint
    with caplog.at_level("INFO"):
        text_model = load_model(path)
    assert "load_vision_language_model" in caplog.text
    assert isinstance(text_model, Transformer)
    assert "vision_config" not in text_model.config.extra
    ids = torch.tensor([tok.encode("a cat", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(text_model(ids), vlm(ids))
    # saved again, it is a plain text checkpoint
    save_model(text_model, tmp_path / "text", tokenizer=tok)
    assert "vision_config" not in json.loads((tmp_path / "text" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="text-only checkpoint"):
        load_vision_language_model(tmp_path / "text")


def test_language_part_loads_in_transformers(vlm_checkpoint):
    transformers = pytest.importorskip("transformers")
    path, vlm, tok = vlm_checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.tensor([tok.encode("the moon and the sun", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, vlm(ids), atol=1e-4, rtol=1e-4)


def test_gguf_export_takes_the_language_part(vlm_checkpoint, tmp_path):
    gguf = pytest.importorskip("gguf")
    from nanoseek.export.gguf import export_gguf

    path, _, _ = vlm_checkpoint
    with pytest.warns(UserWarning, match="language model only"):
        out = export_gguf(path, tmp_path / "m.gguf")
    tensors = {t.name: t.data.tobytes() for t in gguf.GGUFReader(out).tensors}
    assert "token_embd.weight" in tensors
    assert not [n for n in tensors if n.startswith("v.") or "newline" in n or "seperator" in n]
    # the same file, tensor for tensor, as the export of the language model saved on its own
    save_model(load_model(path), tmp_path / "text", tokenizer=load_tokenizer(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text checkpoint: no vision warning
        text_out = export_gguf(tmp_path / "text", tmp_path / "text.gguf")
    assert {t.name: t.data.tobytes() for t in gguf.GGUFReader(text_out).tensors} == tensors


def test_broken_vision_weights_are_refused(vlm_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _, _ = vlm_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(broken / VISION_FILE)
    del tensors["image_newline"]
    tensors["projector.layers.0.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / VISION_FILE)
    with pytest.raises(CheckpointError, match="missing \\['image_newline'\\].*wrong shape"):
        load_vision_language_model(broken)
    (broken / VISION_FILE).unlink()
    with pytest.raises(CheckpointError, match="no vision.safetensors"):
        load_vision_language_model(broken)


def test_model_config_keeps_vision_config_through_json():
    vlm, _ = _vlm()
    cfg = ModelConfig.from_dict(json.loads(json.dumps(vlm.config.to_dict())))
    assert VisionConfig.of(cfg) == vlm.vision.config


# --------------------------------------------------------------------------------------- training
def _colour_batch(task, problems, tok, v, size=(32, 32), seed=0):
    """Short conversations ("<image> What colour ...?" -> the colour): ids, targets, images."""
    rows = []
    inputs = []
    for p in problems:
        messages = [
            {"role": "user", "content": "<image>\n" + task.QUESTION["en"]},
            {"role": "assistant", "content": p.metadata["colours"][0]},
        ]
        ids, trainable, image = encode_image_conversation(
            tok, messages, [task.render(p, seed=seed, size=size)], v
        )
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], trainable[1:])]
        rows.append((ids[:-1], targets))
        inputs.append(image)
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), tok.eos_id)
    y = torch.full((len(rows), T), IGNORE_INDEX)
    for i, (ids, targets) in enumerate(rows):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(targets)] = torch.tensor(targets)
    return x, y, merge_inputs(inputs)


def _first_answer_loss(vlm, x, y, images) -> float:
    """Mean cross-entropy of each row's first answer token: the colour (only the image tells it)."""
    with torch.no_grad():
        logits = vlm(x, images=images)
    first = (y != IGNORE_INDEX).int().argmax(1)
    rows = torch.arange(x.shape[0])
    return torch.nn.functional.cross_entropy(logits[rows, first], y[rows, first]).item()


def test_tiny_vision_language_model_learns_a_visual_task():
    """Difficulty 1 of visual_colour (one shape; name its colour) at 32 x 32 pixels: the loss falls,
    and on new renderings (other positions and sizes) the colour is predicted far better than any
    model that ignores the image could."""
    torch.set_num_threads(1)
    vlm, tok = _vlm(seed=0)
    v = vlm.vision.config
    task = get_visual_task("visual_colour")
    train = task.generate(256, seed=0, difficulty=1, split="train")
    x, y, images = _colour_batch(task, train, tok, v)
    fx, fy, fimages = _colour_batch(task, train[:64], tok, v, seed=1)  # unseen pixels
    blind = math.log(len(COLOURS))  # the best a model that ignores the image can do
    before = _first_answer_loss(vlm.eval(), fx, fy, fimages)
    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    losses = []
    vlm.train()
    for _ in range(250):
        idx = rng.sample(range(len(train)), 16)
        tiles = torch.cat([images.pixel_values[2 * i : 2 * i + 2] for i in idx])
        batch = ImageInput(tiles, [(1, 1)] * len(idx))
        out = vlm(x[idx], y[idx], 0.0, images=batch)  # the trainer's call, plus the images
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    after = _first_answer_loss(vlm.eval(), fx, fy, fimages)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)
    assert after < 0.3 * blind < before, (before, after, blind)


def test_loss_is_on_text_targets_only_and_freezing_selects_what_trains():
    vlm, tok = _vlm()
    image_id = tok.special_ids["image"]
    ids = torch.tensor([[tok.bos_id, 7, *[image_id] * 13, 9, 11]])
    images = image_input([Image.new("RGB", (32, 32), (0, 200, 0))], vlm.vision.config)
    naive = torch.cat([ids[:, 1:], torch.tensor([[5]])], dim=1)  # targets that include the image
    clean = naive.masked_fill(naive == image_id, IGNORE_INDEX)
    a = vlm(ids, naive, 0.0, images=images).lm_loss
    b = vlm(ids, clean, 0.0, images=images).lm_loss
    torch.testing.assert_close(a, b)
    vlm.freeze(language=True)  # VL2's first stage: encoder and adaptor train, the LM does not
    vlm(ids, clean, 0.0, images=images).loss.backward()
    assert all(p.grad is None for p in vlm.language_model.parameters())
    assert vlm.vision.projector.layers[0].weight.grad is not None
    assert vlm.vision.image_newline.grad is not None
    assert vlm.vision.vision_model.embeddings.patch_embedding.weight.grad is not None
