"""The emoji data set: the shipped copy in data/emoji/, its captions, splits and the render command.

These tests read the shipped sprite sheets; they need no font (one optional test re-renders an
emoji and compares it with the shipped pixels when the Debian font is installed).
"""

import json
import random
import shutil
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mini_imagen.data.emoji import (
    EMOJI_DIR,
    FONT_PATH,
    TEMPLATES,
    EmojiDataset,
    collate_emoji,
    emoji_record,
    is_heldout,
    load_emoji,
    load_emoji_font,
    main,
    render_emoji,
    write_emoji_caption,
)


@pytest.fixture(scope="module")
def everything() -> EmojiDataset:
    return EmojiDataset(split="all")


def test_shipped_copy_is_small_and_complete():
    files = list(EMOJI_DIR.iterdir())
    assert sum(f.stat().st_size for f in files) < 6 * 2**20  # hard cap: 6 MB
    assert {"README.md", "LICENSE-OFL.txt", "index.json"} <= {f.name for f in files}
    assert "SIL OPEN FONT LICENSE Version 1.1" in (EMOJI_DIR / "LICENSE-OFL.txt").read_text()
    index = json.loads((EMOJI_DIR / "index.json").read_text(encoding="utf-8"))
    assert index["count"] == len(index["emoji"]) == 1632  # the count data/emoji/README.md documents


def test_count_shapes_and_range(everything):
    assert len(everything) == 1632 == len({r.emoji for r in everything.records})
    sample = everything[0]
    assert set(sample) == {"image", "caption", "emoji", "name"}
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    images = everything.images.float() / 127.5 - 1
    assert images.min() >= -1 and images.max() == 1  # the white background is exactly +1
    assert torch.equal(everything[5]["image"], images[5])


def test_loading_is_fast_and_cached(tmp_path):
    copy = shutil.copytree(EMOJI_DIR, tmp_path / "emoji")  # a folder not loaded yet in this process
    start = time.perf_counter()
    records, pixels = load_emoji(copy)
    assert time.perf_counter() - start < 2.0
    assert pixels.shape == (len(records), 64, 64, 3) and pixels.dtype == np.uint8
    assert load_emoji(str(copy))[1] is pixels and not pixels.flags.writeable  # decoded once, shared read-only


def test_images_are_not_blank_and_all_differ(everything):
    pixels = everything.images.float()  # (N, 3, 64, 64) in [0, 255]
    ink = (pixels < 240).any(dim=1).float().mean(dim=(1, 2))  # fraction of non-background pixels
    assert ink.min() > 0.02, f"{everything.records[int(ink.argmin())].name} is (almost) blank"
    assert (pixels.std(dim=(2, 3)).amax(dim=1) > 5).all()
    assert len({bytes(image.numpy()) for image in everything.images}) == len(everything)
    # Centred: the mean centre of the ink of all emoji is within 2 px of the image centre.
    weights = (255 - pixels.mean(dim=1)).clamp(min=0)
    coords = torch.arange(64, dtype=torch.float32)
    cy = (weights.sum(2) * coords).sum(1) / weights.sum((1, 2))
    cx = (weights.sum(1) * coords).sum(1) / weights.sum((1, 2))
    assert abs(cy.mean() - 31.5) < 2 and abs(cx.mean() - 31.5) < 2


def test_captions_are_the_emoji_names(everything):
    by_emoji = {r.emoji: r for r in everything.records}
    expected = {"🍎": "red apple", "😎": "smiling face with sunglasses", "🚀": "rocket",
                "👩‍🚀": "woman astronaut", "❤️": "red heart", "🔶": "large orange diamond"}
    for chars, name in expected.items():
        assert by_emoji[chars] == emoji_record(chars)  # shipped index == the `emoji` package
        assert by_emoji[chars].name == name
    assert "apple" in by_emoji["🍎"].aliases and "sunglasses" in by_emoji["😎"].aliases
    index = [r.emoji for r in everything.records].index("🍎")
    assert everything[index]["caption"] == everything[index]["name"] == "red apple"
    assert everything[index]["emoji"] == "🍎"


def test_left_out_kinds_are_absent(everything):
    chars = "".join(r.emoji for r in everything.records)
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for c in chars)  # no skin tones
    assert not any(0x1F1E6 <= ord(c) <= 0x1F1FF for c in chars)  # no country flags
    assert "🏁" in chars and "🏴‍☠️" in chars  # other flags stay


def test_random_alias_captions_are_templated_names_or_aliases():
    dataset = EmojiDataset(split="all", caption_mode="random_alias", seed=3, repeats=2)
    phrasings = {template.format(phrase) for r in dataset.records for phrase in r.phrases() for template in TEMPLATES}
    captions = dataset.captions()
    assert len(captions) == 2 * len(dataset.records) and set(captions) <= phrasings
    apple = [r.emoji for r in dataset.records].index("🍎")
    record = dataset.records[apple]
    apple_captions = {template.format(p) for p in record.phrases() for template in TEMPLATES}
    assert dataset[apple]["caption"] in apple_captions and dataset[apple]["name"] == "red apple"
    assert len(set(captions)) > 0.8 * len(captions)  # the two copies of an emoji mostly differ
    names = sum(c in {r.name for r in dataset.records} for c in captions)
    assert 0.1 < names / len(captions) < 0.3  # a bare name needs template "{}" and the name (~1/5 * ~0.8)
    rng = random.Random(0)
    assert {write_emoji_caption(record, rng) for _ in range(200)} == apple_captions  # all 10 wordings occur


def test_determinism():
    a = EmojiDataset(resolution=32, split="train", caption_mode="random_alias", seed=7)
    b = EmojiDataset(resolution=32, split="train", caption_mode="random_alias", seed=7)
    c = EmojiDataset(resolution=32, split="train", caption_mode="random_alias", seed=8)
    assert a.captions() == b.captions() != c.captions()
    for i in (0, 100, len(a) - 1):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["image"], c[i]["image"])


def test_heldout_split_is_disjoint_and_about_five_percent(everything):
    train, heldout = EmojiDataset(split="train"), EmojiDataset(split="heldout")
    train_set, heldout_set = {r.emoji for r in train.records}, {r.emoji for r in heldout.records}
    assert not train_set & heldout_set
    assert train_set | heldout_set == {r.emoji for r in everything.records}
    assert 0.03 < len(heldout) / len(everything) < 0.07
    assert all(is_heldout(e) for e in heldout_set) and not any(is_heldout(e) for e in train_set)
    assert EmojiDataset(split="heldout", seed=99).records == heldout.records  # the split ignores the seed


def test_32px_is_the_2x2_box_filter_of_64px(everything):
    small = EmojiDataset(resolution=32, split="all")
    assert small[0]["image"].shape == (3, 32, 32)
    big = everything.images.float()
    mean = big.reshape(len(big), 3, 32, 2, 32, 2).mean(dim=(3, 5))
    assert (small.images.float() - mean).abs().max() <= 0.5  # rounded back to uint8
    assert EmojiDataset(resolution=16, split="heldout")[0]["image"].shape == (3, 16, 16)


def test_batches_with_collate_emoji_and_default_collate():
    dataset = EmojiDataset(resolution=32, split="heldout")
    batch = collate_emoji([dataset[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == len(batch["emoji"]) == 4
    default = next(iter(DataLoader(dataset, batch_size=4)))
    assert torch.equal(default["image"], batch["image"]) and default["caption"] == batch["caption"]


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        EmojiDataset(split="test")
    with pytest.raises(ValueError, match="caption_mode must be one of"):
        EmojiDataset(caption_mode="alias")
    with pytest.raises(ValueError, match="resolution must be one of"):
        EmojiDataset(resolution=48)
    with pytest.raises(ValueError, match="repeats"):
        EmojiDataset(repeats=0)
    with pytest.raises(IndexError):
        EmojiDataset(split="heldout")[10_000]
    with pytest.raises(FileNotFoundError, match="--render"):
        EmojiDataset(root=tmp_path)


def test_render_without_font_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "NoSuchFont.ttf"
    assert main(["--render", "--font", str(missing), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "fonts-noto-color-emoji" in lines[0]
    assert not (tmp_path / "out").exists() and captured.out == ""
    not_a_font = tmp_path / "notes.ttf"
    not_a_font.write_text("not a font")
    assert main(["--render", "--font", str(not_a_font), "--out", str(tmp_path / "out")]) == 2
    assert "is not a TrueType/OpenType font" in capsys.readouterr().err


@pytest.mark.skipif(not FONT_PATH.is_file(), reason="Noto Color Emoji font not installed")
def test_rendering_reproduces_the_shipped_pixels(everything):
    font = load_emoji_font()
    index = [r.emoji for r in everything.records].index("🍎")
    rendered = np.asarray(render_emoji("🍎", font))
    assert np.array_equal(rendered, everything.images[index].permute(1, 2, 0).numpy())
    assert render_emoji("\U0001FAE9", font) is None  # Emoji 16.0 "face with bags under eyes": not in the font
