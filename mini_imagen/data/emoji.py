"""Emoji: the course's second data set, real drawings with real names.

The captioned scenes (``scenes.py``) are flat shapes that code can check. Emoji are the step
towards Imagen's real training data (Saharia et al., 2022, sec. 4.1: image-text pairs from the
web): about 1,600 detailed, colourful drawings, each captioned with its Unicode (CLDR) name,

    🍎 "red apple"    😎 "smiling face with sunglasses"    🚀 "rocket"    👩‍🚀 "woman astronaut"

so the text encoder meets everyday English instead of a fixed vocabulary of nine colours and six
shapes. Every emoji is seen once per pass, like a tiny LAION: the model must *generalise* from
names to pictures, and the held-out emoji (5%) test whether it can.

Pipeline (``--render``, needs the font):  Unicode emoji list (``emoji`` package) -> keep the
fully-qualified, default-skin-tone, non-country-flag ones -> draw each with Noto Color Emoji
(a colour bitmap font) on a white square -> box-filter down to 64 px -> PNG sprite sheets plus an
``index.json`` in ``data/emoji/``. Using the data set (``EmojiDataset``) needs only that folder.

    python -m mini_imagen.data.emoji --render [--out data/emoji] [--font PATH]
    python -m mini_imagen.data.emoji --grid emoji.png      # look at the shipped copy
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from torch import Tensor
from torch.utils.data import Dataset

EMOJI_DIR = Path(__file__).resolve().parents[2] / "data" / "emoji"  # the shipped copy, in the repository
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # Debian: fonts-noto-color-emoji
FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_SIZE = 109  # the font's only bitmap strike: glyphs are 136 x 128 px
RESOLUTION = 64  # side of the shipped images
BACKGROUND = (255, 255, 255)  # white, as emoji are usually seen
SHEET_GRID = 16  # a sprite sheet is 16 x 16 emoji: 1024 x 1024 px at 64 px
HELDOUT_PERCENT = 5  # emoji whose hash falls in this percentile are never trained on
SPLITS = ("train", "heldout", "all")
CAPTION_MODES = ("name", "random_alias")
RESOLUTIONS = (16, 32, 64)  # 64 px as shipped, or box-filtered down by 2 or 4

SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers U+1F3FB..1F3FF
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)  # 🇺🇸 is two of these
TAG_END = "\U000E007F"  # 🏴󠁧󠁢󠁳󠁣󠁴󠁿 (Scotland) and other subdivision flags end with it
FULLY_QUALIFIED = 2  # the `emoji` package's status code for "fully-qualified" (emoji-test.txt)
# "{}" is the emoji's name or one of its aliases.
TEMPLATES = ("{}", "{} emoji", "an emoji of {}", "{} icon", "a picture of {}")


class FontNotFoundError(FileNotFoundError):
    """The emoji font is not installed where ``--render`` looks for it."""


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji: its characters, its CLDR name ("red apple") and extra keywords ("apple")."""

    emoji: str
    name: str
    aliases: tuple[str, ...] = ()

    def phrases(self) -> tuple[str, ...]:
        """Every way this data set names the emoji: the name first, then the aliases."""
        return (self.name, *self.aliases)


# ----------------------------------------------------------------------------- names and captions
def _normalise(text: str) -> str:
    """Lower case, letters and digits only: "AB button (blood type)" -> "ab button blood type"."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def emoji_record(emoji_chars: str) -> EmojiRecord:
    """Name and aliases of an emoji, from the ``emoji`` package (":red_apple:" -> "red apple").

    Aliases are the GitHub / Slack short codes (":apple:"). We keep those made of letters and spaces,
    at least 3 long, that say something the name does not: "clock830", "u5272" and "+1" are dropped.
    """
    import emoji  # only needed to (re-)make the index, not to use the data set

    data = emoji.EMOJI_DATA.get(emoji_chars)
    if data is None:
        raise ValueError(f"{emoji_chars!r} is not an emoji that the `emoji` package knows")
    name = data["en"].strip(":").replace("_", " ")
    seen, aliases = {_normalise(name)}, []
    for alias in data.get("alias", []):
        alias = alias.strip(":").replace("_", " ")
        if re.fullmatch(r"[a-z ]{3,}", alias) and _normalise(alias) not in seen:
            seen.add(_normalise(alias))
            aliases.append(alias)
    return EmojiRecord(emoji_chars, name, tuple(aliases))


def write_emoji_caption(record: EmojiRecord, rng: random.Random | None = None) -> str:
    """A caption for ``record``: its name when ``rng`` is None, else a random phrase in a random template.

    Half the time the phrase is the name, otherwise one of the aliases (when it has any), so
    "red apple" is also "an emoji of apple" or "apple icon": the same picture, several wordings.
    """
    if rng is None:
        return record.name
    phrase = record.name if not record.aliases or rng.random() < 0.5 else rng.choice(record.aliases)
    return rng.choice(TEMPLATES).format(phrase)


def is_heldout(emoji_chars: str) -> bool:
    """True for the ~5% of emoji kept out of training, chosen by a hash of the characters.

    A hash, not a shuffle: an emoji's split never changes when emoji are added or removed.
    """
    digest = hashlib.sha256(("mini-imagen heldout:" + emoji_chars).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


# ----------------------------------------------------------------------------- rendering (needs the font)
def candidate_emoji() -> tuple[list[str], dict[str, int]]:
    """Emoji worth drawing, in code-point order, and how many of each kind were left out.

    Kept: fully-qualified emoji (🍎, ❤️ with its emoji presentation selector), default skin tone only.
    Left out: unqualified duplicates ("❤" without the selector), skin-tone variants (👍🏽: the same
    drawing recoloured, five near-duplicates each), and the ~260 country and region flags: their
    names are just place names ("Afghanistan") and they are all striped rectangles at 32 px. The
    eight other flags (🏁 🚩 🎌 🏳️ 🏴 🏳️‍🌈 🏳️‍⚧️ 🏴‍☠️) stay.
    """
    import emoji

    kept, skipped = [], {"not_fully_qualified": 0, "skin_tone": 0, "country_flag": 0}
    for chars, data in emoji.EMOJI_DATA.items():
        if data["status"] != FULLY_QUALIFIED:
            skipped["not_fully_qualified"] += 1
        elif SKIN_TONES & set(chars):
            skipped["skin_tone"] += 1
        elif any(ord(c) in REGIONAL_INDICATORS for c in chars) or chars.endswith(TAG_END):
            skipped["country_flag"] += 1
        else:
            kept.append(chars)
    return sorted(kept, key=lambda chars: [ord(c) for c in chars]), skipped


def load_emoji_font(path: str | Path = FONT_PATH) -> ImageFont.FreeTypeFont:
    """Noto Color Emoji at its bitmap size; ``FontNotFoundError`` (one line) when it is not installed."""
    path = Path(path)
    if not path.is_file():
        raise FontNotFoundError(f"emoji font not found at {path}: install the Debian package {FONT_PACKAGE} "
                                f"(sudo apt-get install {FONT_PACKAGE}) or pass --font PATH to NotoColorEmoji.ttf")
    if "CBDT" not in font_tables(path):  # Color Bitmap Data: where Noto Color Emoji keeps its pictures
        raise ValueError(f"{path} is not a colour bitmap (CBDT) emoji font; use NotoColorEmoji.ttf from {FONT_PACKAGE}")
    # Raqm shapes multi-code-point sequences (👩‍🚀 = 👩 + ZWJ + 🚀) into one glyph, as a browser does.
    layout = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    try:
        return ImageFont.truetype(str(path), FONT_SIZE, layout_engine=layout)
    except OSError as error:
        raise ValueError(f"cannot open {path} as a colour bitmap font at size {FONT_SIZE} ({error}); "
                         f"it should be NotoColorEmoji.ttf from {FONT_PACKAGE}") from error


def render_emoji(emoji_chars: str, font: ImageFont.FreeTypeFont, resolution: int = RESOLUTION) -> Image.Image | None:
    """Draw one emoji as a ``resolution``-px RGB square, or None when the font cannot draw it as one glyph.

    The font's 136 x 128 glyph cell is centred on a 136 x 136 square (so the font's own sizes are kept:
    🔸 "small orange diamond" stays smaller than 🔶), composited on ``BACKGROUND`` and box-filtered down:
    each output pixel is the area-weighted mean of the ~2 x 2 glyph pixels it covers.
    """
    ascent, descent = font.getmetrics()
    cell_width, cell_height = round(font.getlength("\U0001F34E")), ascent + descent  # one glyph: 🍎
    _, top, _, bottom = font.getbbox(emoji_chars)
    if round(font.getlength(emoji_chars)) != cell_width or bottom - top < 2:  # several glyphs, or nothing
        return None
    side = max(cell_width, cell_height)
    glyph = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text(((side - cell_width) // 2, (side - cell_height) // 2), emoji_chars,
                               font=font, embedded_color=True)
    if glyph.getchannel("A").getextrema()[1] == 0:  # blank: the font has no picture for it
        return None
    image = Image.new("RGBA", (side, side), BACKGROUND + (255,))
    image.alpha_composite(glyph)  # out = glyph * alpha + background * (1 - alpha)
    return image.convert("RGB").resize((resolution, resolution), Image.Resampling.BOX)


def font_tables(path: str | Path) -> dict[str, int]:
    """The tables of an OpenType font file and their byte offsets: {"head": 220, "CBDT": 15604, ...}."""
    with open(path, "rb") as file:
        version, count = struct.unpack(">4sH", file.read(6).ljust(6, b"\0"))  # sfnt header (12 bytes) ...
        if version not in (b"\0\1\0\0", b"OTTO", b"true"):
            raise ValueError(f"{path} is not a TrueType/OpenType font file")
        file.seek(12)
        data = file.read(16 * count)  # ... then one 16-byte record per table: tag, checksum, offset, length
    return {data[i: i + 4].decode("latin-1"): struct.unpack(">I", data[i + 8: i + 12])[0]
            for i in range(0, len(data) - 15, 16)}


def font_revision(path: str | Path) -> str:
    """The font's version number ("2.042"): the 16.16 fixed-point ``fontRevision`` of its ``head`` table."""
    offset = font_tables(path)["head"]
    with open(path, "rb") as file:
        file.seek(offset + 4)
        return f"{struct.unpack('>i', file.read(4))[0] / 65536:.3f}"


def render_emoji_set(out: str | Path = EMOJI_DIR, font_path: str | Path = FONT_PATH) -> dict[str, Any]:
    """Re-render the whole data set into ``out``: ``sheet_NN.png`` sprite sheets and ``index.json``.

    Emoji ``i`` is cell ``i % 256`` (row-major, 16 per row) of sheet ``i // 256``. Returns the index.
    """
    import emoji

    font = load_emoji_font(font_path)
    chars, skipped = candidate_emoji()
    records, images, not_drawn, seen = [], [], [], {}
    for emoji_chars in chars:
        image = render_emoji(emoji_chars, font)
        if image is None:
            not_drawn.append(emoji_chars)
        elif (key := hashlib.sha256(image.tobytes()).hexdigest()) in seen:
            skipped.setdefault("same_picture_as_another", []).append(emoji_chars)
        else:
            seen[key] = emoji_chars
            records.append(emoji_record(emoji_chars))
            images.append(image)
    if not records:
        raise ValueError(f"{font_path} drew none of the {len(chars)} emoji: is it Noto Color Emoji?")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("sheet_*.png"):
        old.unlink()
    per_sheet, sheets = SHEET_GRID * SHEET_GRID, []
    for start in range(0, len(images), per_sheet):
        sheet = Image.new("RGB", (SHEET_GRID * RESOLUTION,) * 2, BACKGROUND)
        for cell, image in enumerate(images[start: start + per_sheet]):
            sheet.paste(image, ((cell % SHEET_GRID) * RESOLUTION, (cell // SHEET_GRID) * RESOLUTION))
        sheets.append(f"sheet_{start // per_sheet:02d}.png")
        sheet.save(out / sheets[-1], optimize=True)
    header = {
        "format": 1, "count": len(records), "resolution": RESOLUTION, "background": list(BACKGROUND),
        "sheet_grid": SHEET_GRID, "sheets": sheets,
        "font": {"file": Path(font_path).name, "revision": font_revision(font_path), "size": FONT_SIZE},
        "emoji_package": emoji.__version__, "raqm": features.check("raqm"),
        "skipped": skipped | {"not_drawn_by_font": not_drawn},
    }
    entries = [{"emoji": r.emoji, "name": r.name, "aliases": list(r.aliases)} for r in records]
    # One line per emoji: easy to read, and a diff after re-rendering shows which emoji changed.
    text = json.dumps(header, ensure_ascii=False, indent=1)[:-2] + ',\n "emoji": [\n  ' + ",\n  ".join(
        json.dumps(entry, ensure_ascii=False) for entry in entries) + "\n ]\n}\n"
    (out / "index.json").write_text(text, encoding="utf-8")
    _load_emoji_cached.cache_clear()  # the pictures on disk have changed
    return header | {"emoji": entries}


# ----------------------------------------------------------------------------- loading the shipped copy
def load_emoji(root: str | Path = EMOJI_DIR, resolution: int = RESOLUTION) -> tuple[tuple[EmojiRecord, ...], np.ndarray]:
    """All shipped emoji: their records and a read-only uint8 array of pictures, (N, resolution, resolution, 3).

    Decoded once per process and folder (well under a second for the whole set). Below 64 px each
    pixel is the mean of the 2 x 2 (or 4 x 4) pixels it covers, rounded back to uint8.
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS} (64 px as shipped, or box-filtered down), "
                         f"got {resolution}")
    return _load_emoji_cached(str(Path(root).resolve()), resolution)


@lru_cache(maxsize=8)
def _load_emoji_cached(root: str, resolution: int) -> tuple[tuple[EmojiRecord, ...], np.ndarray]:
    if resolution != RESOLUTION:
        records, pixels = _load_emoji_cached(root, RESOLUTION)
        f = RESOLUTION // resolution
        pixels = np.round(pixels.reshape(len(pixels), resolution, f, resolution, f, 3).mean(axis=(2, 4)))
        pixels = pixels.astype(np.uint8)
        pixels.setflags(write=False)  # shared by every data set: nobody may change it
        return records, pixels
    folder = Path(root)
    if not (folder / "index.json").is_file():
        raise FileNotFoundError(f"no emoji data set at {folder} (index.json missing): point root= at a checkout's "
                                f"data/emoji, or make one with `python -m mini_imagen.data.emoji --render --out {folder}`")
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    grid, size = index["sheet_grid"], index["resolution"]
    cells = []
    for sheet in index["sheets"]:
        pixels = np.asarray(Image.open(folder / sheet).convert("RGB"))  # (grid * size, grid * size, 3)
        cells.append(pixels.reshape(grid, size, grid, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3))
    records = tuple(EmojiRecord(e["emoji"], e["name"], tuple(e["aliases"])) for e in index["emoji"])
    pixels = np.concatenate(cells)[: len(records)]
    pixels.setflags(write=False)
    return records, pixels


class EmojiDataset(Dataset):
    """Captioned emoji from the shipped copy; item ``i`` is the same for the same arguments.

    ``dataset[i]`` is ``{"image": (3, H, W) in [-1, 1], "caption": str, "emoji": str, "name": str}``;
    use ``collate_emoji`` (or the default collate) in a ``DataLoader``.

    * ``split``: "train" (~95%), "heldout" (~5%, never trained on: see ``is_heldout``) or "all".
    * ``caption_mode``: "name" (the CLDR name, "red apple") or "random_alias" (a name or alias in a
      template, "an emoji of apple"), drawn from ``random.Random(f"{seed}:{i}")``.
    * ``repeats``: the data set holds every emoji this many times, each copy with its own random
      caption, so one pass over it shows ``repeats`` wordings per emoji.
    """

    def __init__(self, resolution: int = 64, split: str = "train", caption_mode: str = "name", seed: int = 0,
                 repeats: int = 1, root: str | Path = EMOJI_DIR):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if repeats < 1:
            raise ValueError(f"repeats must be a positive number of copies of each emoji, got {repeats}")
        records, pixels = load_emoji(root, resolution)
        keep = [i for i, r in enumerate(records) if split == "all" or is_heldout(r.emoji) == (split == "heldout")]
        self.records = [records[i] for i in keep]
        self.images = torch.from_numpy(pixels[keep]).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        self.resolution, self.split, self.caption_mode = resolution, split, caption_mode
        self.seed, self.repeats = seed, repeats

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def caption(self, index: int) -> str:
        """The caption of item ``index``, without touching its picture."""
        if not 0 <= index < len(self):
            raise IndexError(f"emoji index {index} out of range for a data set of {len(self)} items")
        rng = random.Random(f"{self.seed}:{index}") if self.caption_mode == "random_alias" else None
        return write_emoji_caption(self.records[index % len(self.records)], rng)

    def captions(self) -> list[str]:
        """Every caption of the data set, in order (e.g. for ``precompute_text_embeddings``)."""
        return [self.caption(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        caption = self.caption(index)
        record = self.records[index % len(self.records)]
        image = self.images[index % len(self.records)].float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]
        return {"image": image, "caption": caption, "emoji": record.emoji, "name": record.name}


def collate_emoji(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into ``{"image": (B, 3, H, W), "caption": [str] * B, "emoji": [...], "name": [...]}``."""
    if not samples:
        raise ValueError("collate_emoji needs at least one sample")
    return {"image": torch.stack([s["image"] for s in samples]),
            **{key: [s[key] for s in samples] for key in ("caption", "emoji", "name")}}


def emoji_grid(images: Tensor, columns: int = 16) -> Image.Image:
    """Tile (B, 3, H, W) images in [-1, 1] into one picture, ``columns`` per row, to look at."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sheet = np.full((rows * height, columns * width, 3), 255, np.uint8)
    for i, image in enumerate(pixels):
        sheet[i // columns * height: (i // columns + 1) * height, i % columns * width: (i % columns + 1) * width] = image
    return Image.fromarray(sheet)


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mini_imagen.data.emoji", description=__doc__.split("\n")[0])
    parser.add_argument("--render", action="store_true", help="re-render the data set from the font")
    parser.add_argument("--out", default=str(EMOJI_DIR), help="folder of the data set (default: %(default)s)")
    parser.add_argument("--font", default=str(FONT_PATH), help="NotoColorEmoji.ttf (default: %(default)s)")
    parser.add_argument("--grid", metavar="PNG", help="save the emoji of --out as one grid picture")
    args = parser.parse_args(argv)
    try:
        if args.render:
            index = render_emoji_set(args.out, args.font)
            print(f"rendered {index['count']} emoji into {args.out} ({len(index['sheets'])} sheets); "
                  f"left out: " + ", ".join(f"{k}: {v if isinstance(v, int) else len(v)}"
                                            for k, v in index["skipped"].items()))
        dataset = EmojiDataset(split="all", root=args.out)
        if args.grid:
            emoji_grid(dataset.images.float() / 127.5 - 1, columns=32).save(args.grid)
            print(f"saved a grid of {len(dataset)} emoji to {args.grid}")
        heldout = sum(is_heldout(r.emoji) for r in dataset.records)
        print(f"{len(dataset)} emoji at {args.out}: {len(dataset) - heldout} train, {heldout} held out")
    except (FileNotFoundError, ValueError) as error:  # FontNotFoundError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
