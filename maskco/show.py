"""``python -m maskco.show [preset ...] [--key=value ...] [--out=views.png] [--images=8]``

Writes a PNG grid, one row per image: the query view with the masked box (yellow), the query view as
the model sees it (augmented, masked), and the key view with the positive box (green) and a few of
the negative boxes (red, thin); column titles and the colour key are in the picture. This is how a
user checks the augmentation and the box pairing of a backend.
"""
from __future__ import annotations

import math
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

import pipelines
from maskco import augment, cli
from maskco.config import ConfigError, build_config
from maskco.method import MethodSpec, ready_inputs
from maskco.build import resolve_data

POSITIVE, NEGATIVE, MASKED = (40, 220, 40), (230, 40, 40), (250, 220, 0)
SHOWN_NEGATIVES = 4  # of the M negative boxes: drawn thin, so that the key view stays visible
MIN_SIDE = 192  # small views are enlarged (nearest, an integer factor) so that boxes and titles read
GAP, HEADER, FOOTER = 4, 22, 40
TITLES = ("query view + masked box", "model input (augmented, masked)", "key view + positive, negatives")


def _image(chw_uint8: torch.Tensor, scale: int) -> Image.Image:
    image = Image.fromarray(chw_uint8.permute(1, 2, 0).cpu().numpy())
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _draw(image: Image.Image, box, color, scale: int, width=2) -> None:
    ImageDraw.Draw(image).rectangle([float(v) * scale for v in box], outline=color, width=width)


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(augment.IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(augment.IMAGENET_STD, device=x.device)[:, None, None]
    return ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _legend(draw: ImageDraw.ImageDraw, top: int, width: int, negatives: int, shown: int) -> None:
    """Colour key, two lines under the grid."""
    font = _font(12)
    entries = [(MASKED, "masked box (query view; filled in the model input)"),
               (POSITIVE, "positive: the same region in the key view"),
               (NEGATIVE, f"negatives: {shown} of the {negatives} drawn" if negatives > shown else "negatives")]
    x, y = GAP, top + 4
    for colour, text in entries:
        entry = 22 + draw.textlength(text, font=font) + 16
        if x > GAP and x + entry > width:
            x, y = GAP, y + 17
        draw.rectangle([x, y + 2, x + 14, y + 12], outline=colour, width=2)
        draw.text((x + 20, y), text, fill=(0, 0, 0), font=font)
        x += entry


def render(batch, inputs, images: int) -> Image.Image:
    """One row per image: raw query view + masked box, model input, key view + key boxes; column titles
    on top and the colour key below, so the picture reads without the terminal."""
    size = batch.view_q.shape[-1]
    scale = max(1, math.ceil(MIN_SIDE / size))
    side = size * scale
    rows = min(images, batch.view_q.shape[0])
    negatives = 0 if inputs.boxes_k is None else inputs.boxes_k.shape[1] - 1
    shown = min(SHOWN_NEGATIVES, negatives)
    grid = Image.new("RGB", (3 * side + 2 * GAP, HEADER + rows * (side + GAP) + FOOTER), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(12 if side >= 190 else 10)
    for column, title in enumerate(TITLES):
        left = column * (side + GAP)
        width = draw.textlength(title, font=font)
        draw.text((left + max(0, (side - width) / 2), 4), title, fill=(0, 0, 0), font=font)
    for i in range(rows):
        query, key = _image(batch.view_q[i], scale), _image(batch.view_k[i], scale)
        seen = _image(_denormalise(inputs.x_q[i]), scale)
        if inputs.boxes_q is not None:
            _draw(query, inputs.boxes_q[i, 0], MASKED, scale)
            for box in inputs.boxes_k[i, 1:1 + shown]:
                _draw(key, box, NEGATIVE, scale, 1)
            _draw(key, inputs.boxes_k[i, 0], POSITIVE, scale)
            if not bool(inputs.valid[i]):
                ImageDraw.Draw(query).text((4, 4), "invalid: crops barely overlap", fill=(255, 0, 0), font=font)
        for column, picture in enumerate((query, seen, key)):
            grid.paste(picture, (column * (side + GAP), HEADER + i * (side + GAP)))
    _legend(draw, HEADER + rows * (side + GAP), grid.width, negatives, shown)
    return grid


SUMMARY = """Writes a PNG grid of what the model is fed: per image, the query view with the masked box, the
query as the model sees it, and the key view with the positive (green) and negative (red) boxes.
Presets and config keys as for maskco.train. Example: python -m maskco.show cpu_demo --backend=dali-cpu"""
OWN = "  --out PATH    the PNG to write (default: runs/show.png)\n  --images N    rows, one per image (default: 8)"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = cli.parse_config_args(args, {"out": "runs/show.png", "images": 8})
        if parsed.help:
            print(cli.usage_text("python -m maskco.show", SUMMARY, OWN, " [--out PATH] [--images N]"))
            return 0
        cfg = build_config(parsed.config)
        cli.check_device(cfg.device)
    except ConfigError as error:
        return cli.fail("maskco.show", error)
    out, images = parsed.options["out"], parsed.options["images"]
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    loader = pipelines.build_loader(
        cfg.backend, resolve_data(cfg, 0), batch_size=max(images, 2), image_size=cfg.image_size, device=device,
        seed=cfg.seed, workers=0 if cfg.backend == "torch" else None, crop_scale=cfg.crop_scale,
        crop_ratio=cfg.crop_ratio, flip_prob=cfg.flip_prob,
    )
    loader.set_epoch(0)
    batch = next(iter(loader))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    inputs = ready_inputs(batch, MethodSpec.from_config(cfg, shuffle_bn=False), generator)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    render(batch, inputs, images).save(out)
    print(f"wrote {out}: {min(images, len(batch))} rows (query view + masked box | model input | "
          f"key view + positive (green) and negatives (red))")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (pipelines.DataError, ImportError, ConfigError) as error:  # bad input: one clear line, no traceback
        sys.exit(cli.fail("maskco.show", error))
