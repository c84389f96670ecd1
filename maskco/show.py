"""``python -m maskco.show [preset ...] [--key=value ...] [--out=views.png] [--images=8]``

Writes a PNG grid, one row per image: the query view with the masked box (yellow), the query view as
the model sees it (augmented, masked), and the key view with the positive box (green) and a few of
the negative boxes (red, thin); column titles and the colour key are in the picture. This is how a
user checks the augmentation and the box pairing of a backend.

With ``--checkpoint=PATH`` (a pretraining checkpoint; its model, views and boxes, presets and overrides on
top) each row also shows what the model does with the masked box (the supplementary's MPH figure): the
similarity of the masked region's query embedding with a box of the positive's size on every key cell
(``maskco.evaluate.localise``), upsampled over the key view as a heatmap, the positive box on top and the
peak marked; and, for the attention MPH, which cells of the query view the masked position attends to.
"""
from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from maskco import cli
from maskco.config import ConfigError, build_config

if TYPE_CHECKING:  # torch, the data and the method load where they are used: --help answers without them
    import torch

POSITIVE, NEGATIVE, MASKED, PEAK = (40, 220, 40), (230, 40, 40), (250, 220, 0), (255, 255, 255)
SHOWN_NEGATIVES = 4  # of the M negative boxes: drawn thin, so that the key view stays visible
MIN_SIDE = 192  # small views are enlarged (nearest, an integer factor) so that boxes and titles read
GAP, HEADER, FOOTER = 4, 22, 40
TITLES = ("query view + masked box", "model input (augmented, masked)", "key view + positive, negatives")
MAP_TITLES = ("similarity in the key view (+ peak)", "MPH attention of the masked cell")
COLOURMAP, ALPHA = "viridis", 0.6  # heatmap colours (low -> high) and their weight over the view


def _image(chw_uint8: torch.Tensor, scale: int) -> Image.Image:
    image = Image.fromarray(chw_uint8.permute(1, 2, 0).cpu().numpy())
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _draw(image: Image.Image, box, color, scale: int, width=2) -> None:
    ImageDraw.Draw(image).rectangle([float(v) * scale for v in box], outline=color, width=width)


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    import torch

    from maskco import augment

    mean = torch.tensor(augment.IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(augment.IMAGENET_STD, device=x.device)[:, None, None]
    return ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _legend(draw: ImageDraw.ImageDraw, top: int, width: int, negatives: int, shown: int, peak: bool = False) -> None:
    """Colour key, two lines under the grid."""
    font = _font(12)
    entries = [(MASKED, "masked box (query view; filled in the model input)"),
               (POSITIVE, "positive: the same region in the key view"),
               (NEGATIVE, f"negatives: {shown} of the {negatives} drawn" if negatives > shown else "negatives")]
    entries += [((0, 0, 0), "x: the similarity peak (where the model finds the masked region)")] * peak
    x, y = GAP, top + 4
    for colour, text in entries:
        entry = 22 + draw.textlength(text, font=font) + 16
        if x > GAP and x + entry > width:
            x, y = GAP, y + 17
        draw.rectangle([x, y + 2, x + 14, y + 12], outline=colour, width=2)
        draw.text((x + 20, y), text, fill=(0, 0, 0), font=font)
        x += entry


def _colours(values: torch.Tensor) -> torch.Tensor:
    """values in [0, 1], any shape -> uint8 RGB ``[..., 3]`` of the colour map."""
    import torch
    from matplotlib import colormaps  # a dependency of the project (the bench's chart)

    table = torch.from_numpy(colormaps[COLOURMAP](torch.linspace(0, 1, 256).numpy())[:, :3] * 255)
    return table.round().to(torch.uint8)[(values.clamp(0, 1) * 255).round().long()]


def _heatmap(view: torch.Tensor, values: torch.Tensor, scale: int) -> Image.Image:
    """A ``[H, W]`` map, min-max scaled, upsampled (bilinear) and blended over a uint8 view ``[3, S, S]``."""
    import torch

    side = view.shape[-1] * scale
    low, high = values.min(), values.max()
    unit = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    unit = torch.nn.functional.interpolate(unit[None, None].float(), size=(side, side), mode="bilinear",
                                           align_corners=False)[0, 0]
    base = torch.nn.functional.interpolate(view[None].float(), size=(side, side), mode="nearest")[0].permute(1, 2, 0)
    blended = (1 - ALPHA) * base + ALPHA * _colours(unit).float()
    return Image.fromarray(blended.round().clamp(0, 255).to(torch.uint8).numpy())


def _mark(image: Image.Image, point, scale: int) -> None:
    """A cross with a dark outline at ``point`` (view pixels)."""
    x, y = (float(v) * scale for v in point)
    draw, r = ImageDraw.Draw(image), max(5, scale * 2)
    for colour, width in (((0, 0, 0), 5), (PEAK, 2)):
        draw.line([x - r, y - r, x + r, y + r], fill=colour, width=width)
        draw.line([x - r, y + r, x + r, y - r], fill=colour, width=width)


def _colour_bar(grid: Image.Image, top: int) -> None:
    """The heatmaps' key under the grid: the colour map from each row's lowest to its highest value."""
    import torch

    draw, font = ImageDraw.Draw(grid), _font(12)
    width, left = 160, GAP
    bar = _colours(torch.linspace(0, 1, width))[None].expand(10, -1, -1)  # [10, width, 3]
    label = "heatmaps: each row's lowest"
    draw.text((left, top), label, fill=(0, 0, 0), font=font)
    left += draw.textlength(label, font=font) + 6
    grid.paste(Image.fromarray(bar.contiguous().numpy()), (int(left), top + 3))
    draw.text((left + width + 6, top), "highest value (the tile's corner gives both)", fill=(0, 0, 0), font=font)


def render(batch, inputs, images: int, maps: dict | None = None) -> Image.Image:
    """One row per image: raw query view + masked box, model input, key view + key boxes; with ``maps``
    (a checkpoint's ``similarity`` [N, H, W], ``peak`` [N, 2] and ``attention`` [N, H, W] or None) the
    similarity heatmap over the key view (positive box, peak cross) and the MPH's attention over the model
    input. Column titles on top, the colour key (and colour bar) below: the picture reads on its own."""
    size = batch.view_q.shape[-1]
    scale = max(1, math.ceil(MIN_SIDE / size))
    side = size * scale
    rows = min(images, batch.view_q.shape[0])
    negatives = 0 if inputs.boxes_k is None else inputs.boxes_k.shape[1] - 1
    shown = min(SHOWN_NEGATIVES, negatives)
    titles = TITLES
    if maps is not None:
        titles += MAP_TITLES[:1 + (maps.get("attention") is not None)]
    footer = FOOTER + (22 if maps is not None else 0)
    grid = Image.new("RGB", (len(titles) * side + (len(titles) - 1) * GAP, HEADER + rows * (side + GAP) + footer),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(12 if side >= 190 else 10)
    for column, title in enumerate(titles):
        left = column * (side + GAP)
        width = draw.textlength(title, font=font)
        draw.text((left + max(0, (side - width) / 2), 4), title, fill=(0, 0, 0), font=font)
    for i in range(rows):
        query, key = _image(batch.view_q[i], scale), _image(batch.view_k[i], scale)
        seen = _image(_denormalise(inputs.x_q[i]), scale)
        pictures = [query, seen, key]
        if inputs.boxes_q is not None:
            _draw(query, inputs.boxes_q[i, 0], MASKED, scale)
            for box in inputs.boxes_k[i, 1:1 + shown]:
                _draw(key, box, NEGATIVE, scale, 1)
            _draw(key, inputs.boxes_k[i, 0], POSITIVE, scale)
            if not bool(inputs.valid[i]):
                ImageDraw.Draw(query).text((4, 4), "invalid: crops barely overlap", fill=(255, 0, 0), font=font)
        if maps is not None:
            found = _heatmap(batch.view_k[i], maps["similarity"][i], scale)
            _draw(found, inputs.boxes_k[i, 0], POSITIVE, scale)
            _mark(found, maps["peak"][i], scale)
            _range(found, maps["similarity"][i], font)
            pictures.append(found)
            if maps.get("attention") is not None:
                attended = _heatmap(_denormalise(inputs.x_q[i]), maps["attention"][i], scale)
                _draw(attended, inputs.boxes_q[i, 0], MASKED, scale)
                _range(attended, maps["attention"][i], font)
                pictures.append(attended)
        for column, picture in enumerate(pictures):
            grid.paste(picture, (column * (side + GAP), HEADER + i * (side + GAP)))
    _legend(draw, HEADER + rows * (side + GAP), grid.width, negatives, shown, maps is not None)
    if maps is not None:
        _colour_bar(grid, HEADER + rows * (side + GAP) + FOOTER)
    return grid


def _range(image: Image.Image, values: torch.Tensor, font) -> None:
    """The tile's lowest and highest value, in its top-left corner."""
    text = f"{float(values.min()):.2f} .. {float(values.max()):.2f}"
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, draw.textlength(text, font=font) + 6, 15], fill=(255, 255, 255))
    draw.text((3, 1), text, fill=(0, 0, 0), font=font)


SUMMARY = """Writes a PNG grid of what the model is fed: per image, the query view with the masked box, the
query as the model sees it, and the key view with the positive (green) and negative (red) boxes. With
--checkpoint, also where that model finds the masked region in the key view (similarity heatmap, peak) and,
for the attention MPH, what the masked position attends to; the checkpoint's settings are the base, presets
and config keys apply on top but may not change the model. Presets and config keys as for maskco.train.
Examples: python -m maskco.show cpu_demo --backend=dali-cpu
          python -m maskco.show --checkpoint=runs/quality/maskco/checkpoint_last.pt --data=data/fmnist/test"""
OWN = ("  --out PATH         the PNG to write (default: runs/show.png)\n  --images N         rows, one per image "
       "(default: 8)\n  --checkpoint PATH  a pretraining checkpoint: also draw what its model predicts")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parsed = cli.parse_config_args(args, {"out": "runs/show.png", "images": 8, "checkpoint": ""})
    if parsed.help:
        print(cli.usage_text("python -m maskco.show", SUMMARY, OWN, " [--out PATH] [--images N] [--checkpoint PATH]"))
        return 0
    import torch

    import pipelines
    from pipelines.sample_data import resolve_source
    from maskco.evaluate import localise
    from maskco.method import MethodSpec, ready_inputs

    out, images, path = parsed.options["out"], parsed.options["images"], parsed.options["checkpoint"]
    if images < 1:
        raise ConfigError(f"--images must be >= 1, got {images}")
    if path:
        cfg, encoder_q, encoder_k = localise.load_encoders(path, parsed.config)
    else:
        cfg = build_config(parsed.config)
    cli.check_device(cfg.device)
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    source = resolve_source(cfg.data, cfg.sample_dir, cfg.sample_images)
    loader = pipelines.build_loader(
        cfg.backend, source, batch_size=max(images, 2), image_size=cfg.image_size, device=device,
        seed=cfg.seed, workers=0 if cfg.backend == "torch" else None, crop_scale=cfg.crop_scale,
        crop_ratio=cfg.crop_ratio, flip_prob=cfg.flip_prob,
    )
    try:
        loader.set_epoch(0)
        batch = next(iter(loader))
    finally:
        loader.close()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    maps = None
    if path:  # the localisation task of the checkpoint's config (boxes even for MoCo v2)
        inputs = ready_inputs(batch, localise.task_spec(cfg), generator)
        encoder_q, encoder_k = encoder_q.to(device), encoder_k.to(device)
        found = localise.similarity_maps(encoder_q, encoder_k, inputs, cfg.image_size)
        maps = {"similarity": found.sims, "peak": found.peak,
                "attention": localise.mph_attention(encoder_q, inputs.x_q, inputs.boxes_q[:, 0])}
    else:
        inputs = ready_inputs(batch, MethodSpec.from_config(cfg, shuffle_bn=False), generator)
    picture = render(batch, inputs, images, maps)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        picture.save(out)
    except (OSError, ValueError) as error:  # ValueError: PIL cannot tell the format from the name
        raise ConfigError(f"cannot write --out={out}: {error}") from None
    columns = "query view + masked box | model input | key view + positive (green) and negatives (red)"
    if maps is not None:
        columns += " | similarity heatmap + peak" + " | MPH attention" * (maps["attention"] is not None)
    print(f"wrote {out}: {min(images, len(batch))} rows ({columns})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, ImportError) as error:  # bad input (ConfigError, DataError, CheckpointError): one line
        sys.exit(cli.fail("maskco.show", error))
