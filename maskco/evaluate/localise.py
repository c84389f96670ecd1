"""Where does the model find the masked region in the other view? (the supplementary's MPH figure, in numbers)

For a masked box of the query view, the query embedding is computed exactly as in training (query
encoder on the masked, augmented view, MPH, the box pooled by ``Encoder.pool``, head, L2 norm). The key
view's similarity map places a box of the positive box's size on every cell of the key encoder's C5 map
(centred on the cell's receptive-field centre, shifted inside the view where it would stick out), pools
it through the same box -> feature-map mapping and head, and takes its cosine with the query embedding:
``[N, H, W]``. The peak is the best cell's box; its centre, in view pixels, is where the model "looks".

**Localisation accuracy** (``localise_top1``): the share of valid masked boxes whose peak cell centre
falls inside their positive box in the key view, over ``--images`` images of a split, with the
trainer's own views, boxes, augmentation and masking (the checkpoint's settings, seeded). Encoders run in
evaluation mode (BatchNorm's running statistics). A MoCo v2 checkpoint (no MPH) is measured the same
way: the same boxes, masks and pooling on its global-pooling-trained network; random init uses one
random network as both encoders.

    python -m maskco.evaluate.localise --checkpoint=runs/quality/maskco/checkpoint_last.pt --images=512
    python -m maskco.evaluate.localise --checkpoint=... --data=data/fmnist/test --backend=dali-cpu
"""
from __future__ import annotations

from maskco import tool_args

if __name__ == "__main__":  # the flags first, then torch: --help and a bad flag answer at once (tool_args)
    tool_args.run_as_main("maskco.evaluate.localise", tool_args.localise_args, (ValueError, ImportError))

import copy
import json
import os
from typing import NamedTuple

import torch
from torch import nn

import pipelines
from pipelines.sample_data import resolve_source
from maskco import checkpoint as checkpoint_lib
from maskco import cli
from maskco.build import encoder_of
from maskco.config import Config, build_config, config_from_dict
from maskco.method import MethodSpec, ready_inputs
from maskco.model import Encoder, unwrap
from maskco.mph import AttentionMPH, sine_position_embedding

DEFAULT_IMAGES = tool_args.DEFAULT_IMAGES


def load_encoders(path: str, argv=(), device: torch.device | str = "cpu") -> tuple[Config, nn.Module, nn.Module]:
    """A pretraining checkpoint -> (its config with ``argv``'s presets and overrides on top, encoder_q,
    encoder_k), both in evaluation mode on ``device``. A preset or override that changes the model
    (``ARCHITECTURE_KEYS``: arch, stem, width, MPH, head, ...) -> CheckpointError naming the keys."""
    state = checkpoint_lib.load(path)
    stored = config_from_dict(state["config"], where=path)
    cfg = build_config(list(argv), base=stored.to_dict())
    checkpoint_lib.check_compatible(state, cfg.to_dict(), path)
    encoder_q, encoder_k = encoder_pair(cfg, device)
    encoder_q.load_state_dict(state["encoder_q"])
    encoder_k.load_state_dict(state["encoder_k"])
    return cfg, encoder_q, encoder_k


def encoder_pair(cfg: Config, device: torch.device | str = "cpu", seed: int | None = None):
    """Two encoders of ``cfg``'s shape in evaluation mode: the second a copy of the first (random init:
    one random network as both encoders; seeded by ``seed``, else ``cfg.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        encoder_q = encoder_of(cfg)
    encoder_q = encoder_q.to(device).eval()
    return encoder_q, copy.deepcopy(encoder_q)


def cell_centres(height: int, width: int, stride: int, centre: float, device=None) -> torch.Tensor:
    """Receptive-field centres of a C5 map's cells in view pixels, ``[H*W, 2]`` (x, y), row-major."""
    ys = centre + stride * torch.arange(height, device=device, dtype=torch.float32)
    xs = centre + stride * torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)  # [H*W, 2]


def cell_boxes(boxes: torch.Tensor, centres: torch.Tensor, image_size: int) -> torch.Tensor:
    """One box per cell: the size of ``boxes`` ``[N, 4]`` (view pixels), centred on each of ``centres``
    ``[L, 2]``, shifted to lie inside the ``image_size`` view -> ``[N, L, 4]``."""
    half = ((boxes[:, 2:] - boxes[:, :2]) / 2)[:, None]  # [N, 1, 2]
    centre = torch.minimum(torch.maximum(centres[None], half), image_size - half)  # [N, L, 2]
    return torch.cat([centre - half, centre + half], dim=-1)  # [N, L, 4]


class Similarity(NamedTuple):
    sims: torch.Tensor  # [N, H, W] cosine of the query embedding with each cell's box in the key view
    centres: torch.Tensor  # [N, H*W, 2] (x, y) view pixels: the centre of each cell's box (inside the view)
    peak: torch.Tensor  # [N, 2] the centre of the best cell's box: where the model finds the region


@torch.no_grad()
def similarity_maps(encoder_q: Encoder, encoder_k: Encoder, inputs, image_size: int) -> Similarity:
    """The masked region's query embedding against a box of the positive's size on every key cell.
    ``inputs``: ``method.Inputs`` with boxes (the masked box; the positive first among the key boxes)."""
    encoder_q, encoder_k = unwrap(encoder_q), unwrap(encoder_k)
    q = encoder_q(inputs.x_q, inputs.boxes_q)[:, 0]  # [N, D], as in training
    features = encoder_k.features(inputs.x_k)  # [N, C, H, W]
    height, width = features.shape[-2:]
    cells = cell_centres(height, width, encoder_k.stride, encoder_k.cell_centre, features.device)  # [H*W, 2]
    boxes = cell_boxes(inputs.boxes_k[:, 0], cells, image_size)  # [N, H*W, 4]
    sims = torch.einsum("nd,nld->nl", q, encoder_k.embed(features, boxes))  # [N, H*W]
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [N, H*W, 2]
    peak = centres[torch.arange(len(sims), device=sims.device), sims.argmax(dim=1)]  # [N, 2]
    return Similarity(sims.view(-1, height, width), centres, peak)


def inside(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """points ``[N, 2]`` (x, y) inside boxes ``[N, 4]`` (edges included) -> bool ``[N]``."""
    return ((points >= boxes[:, :2]) & (points <= boxes[:, 2:])).all(dim=1)


@torch.no_grad()
def mph_attention(encoder: Encoder, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor | None:
    """Which cells the masked position attends to in the attention MPH's last layer (mean over heads):
    ``[N, H, W]``, rows of the cell that holds the masked box's centre; None for another MPH.
    x: the query view as the model sees it ``[N, 3, S, S]``; boxes: the masked box ``[N, 4]``."""
    encoder = unwrap(encoder)
    mph = encoder.mph
    if not isinstance(mph, AttentionMPH):
        return None
    c5 = encoder.trunk(x)  # [N, C, H, W]
    n, _, height, width = c5.shape
    tokens = mph.reduce(c5).flatten(2).transpose(1, 2)  # [N, H*W, D]
    tokens = tokens + sine_position_embedding(height, width, tokens.shape[-1], tokens.device, tokens.dtype)
    layers = mph.encoder.layers
    for layer in layers[:-1]:
        tokens = layer(tokens)
    last = layers[-1]
    normed = last.norm1(tokens) if last.norm_first else tokens
    _, weights = last.self_attn(normed, normed, normed, need_weights=True, average_attn_weights=True)  # [N, L, L]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2] view pixels
    cell = ((centre - encoder.cell_centre) / encoder.stride).round().long()  # [N, 2] (column, row)
    column, row = cell[:, 0].clamp(0, width - 1), cell[:, 1].clamp(0, height - 1)
    return weights[torch.arange(n), row * width + column].view(n, height, width)


def task_spec(cfg: Config) -> MethodSpec:
    """The localisation task of ``cfg``: its boxes, augmentation and mask, also for a MoCo v2 config (whose
    training draws no boxes); no shuffle (evaluation mode)."""
    mask_mode = cfg.mask_mode if cfg.method != "mocov2" else Config.mask_mode
    return MethodSpec.from_config(cfg, shuffle_bn=False, method="maskco", mask_mode=mask_mode, virtual_gpus=1)


@torch.no_grad()
def localise(cfg: Config, encoder_q: Encoder, encoder_k: Encoder, images: int = DEFAULT_IMAGES,
             device: torch.device | str = "cpu", workers: int | None = None) -> dict:
    """Localisation accuracy over the first valid masked boxes of ``images`` images of ``cfg.data``
    (epoch 0 of ``cfg.seed``'s views, ``cfg.batch_size`` at a time): ``{"localise_top1": %, "images": counted,
    "chance": %}``; chance is
    the share of the key view's cell boxes centred in the positive box (a uniformly random peak)."""
    device = torch.device(device)
    source = resolve_source(cfg.data, cfg.sample_dir, cfg.sample_images)
    loader = pipelines.build_loader(cfg.backend, source, batch_size=min(cfg.batch_size, images),
                                    image_size=cfg.image_size, device=device, seed=cfg.seed, workers=workers,
                                    crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio, flip_prob=cfg.flip_prob)
    spec = task_spec(cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    hits = chance = counted = seen = 0
    try:
        loader.set_epoch(0)
        for batch in loader:
            inputs = ready_inputs(batch, spec, generator)
            found = similarity_maps(encoder_q, encoder_k, inputs, cfg.image_size)
            positive = inputs.boxes_k[:, 0]
            take = inputs.valid.clone()
            take[max(0, images - seen):] = False  # no more than `images` images in all
            hits += int((inside(found.peak, positive) & take).sum())
            cells = found.centres.shape[1]
            covered = inside(found.centres.reshape(-1, 2), positive.repeat_interleave(cells, dim=0)).view(-1, cells)
            chance += float(covered.float().mean(dim=1)[take].sum())
            counted += int(take.sum())
            seen += len(positive)
            if seen >= images:
                break
    finally:
        loader.close()
    if counted == 0:
        raise ValueError(f"no valid masked box in {seen} images of {cfg.data}: the crops never overlap enough")
    return {"localise_top1": 100 * hits / counted, "images": counted, "chance": 100 * chance / counted}


def main(argv=None) -> dict:
    """Parse ``argv`` (``tool_args.localise_args``) and :func:`run`: the localisation record."""
    return run(tool_args.localise_args(argv))


def run(parsed: cli.ConfigArgs) -> dict:
    """Localisation accuracy of ``parsed``'s checkpoint (or random init): prints the record (and writes ``--out``)."""
    options = parsed.options
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options["checkpoint"]:
        cfg, encoder_q, encoder_k = load_encoders(options["checkpoint"], parsed.config, device)
    else:
        cfg = build_config(parsed.config)
        encoder_q, encoder_k = encoder_pair(cfg, device)
    if cfg.device != "auto":
        cli.check_device(cfg.device)
    result = localise(cfg, encoder_q, encoder_k, options["images"], device)
    record = {"checkpoint": options["checkpoint"] or f"random init ({cfg.arch})", "data": cfg.data, **result}
    print(json.dumps(record))
    if options["out"]:
        os.makedirs(os.path.dirname(os.path.abspath(options["out"])), exist_ok=True)
        with open(options["out"], "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
    return record

