"""Localisation (maskco.evaluate.localise) and the checkpoint picture of maskco.show."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from maskco import checkpoint, show
from maskco.config import build_config
from maskco.evaluate import localise
from maskco.method import ready_inputs
from pipelines import Batch

SMALL = ["--arch=resnet18", "--stem=cifar", "--width=0.25", "--mph_width=32", "--mph_heads=4", "--head_hidden=64"]


def write_checkpoint(path, argv, seed=0) -> str:
    cfg = build_config(list(argv))
    encoder_q, encoder_k = localise.encoder_pair(cfg, seed=seed)
    with torch.no_grad():  # a key encoder that differs from the query encoder
        for p in encoder_k.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"format": checkpoint.FORMAT, "config": cfg.to_dict(), "encoder_q": encoder_q.state_dict(),
                "encoder_k": encoder_k.state_dict()}, path)
    return str(path)


def identical_views(n: int, size: int, seed: int) -> Batch:
    """n images seen twice through the same full-image crop: the key view is the query view."""
    generator = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=generator),
                                             size=(size, size), mode="bilinear")
    views = (255 * smooth).to(torch.uint8)
    crops = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(n, 1)
    return Batch(view_q=views, view_k=views.clone(), crop_q=crops, crop_k=crops.clone())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_one_encoder_no_mask_no_mph_no_augmentation_the_peak_is_in_the_positive_box(seed):
    # C5 at stride 8 on 64 px views: 8 x 8 cells; boxes at least one cell wide
    cfg = build_config(SMALL + ["--image_size=64", "--mph=none", "--mask_mode=none", "--box_min_size=8",
                                "--jitter_prob=0", "--gray_prob=0", "--blur_prob=0", f"--seed={seed}"])
    encoder, _ = localise.encoder_pair(cfg)
    batch = identical_views(16, 64, seed)
    inputs = ready_inputs(batch, localise.task_spec(cfg), torch.Generator().manual_seed(seed))
    assert torch.equal(inputs.boxes_q[:, 0], inputs.boxes_k[:, 0])  # the same region in both views
    found = localise.similarity_maps(encoder, encoder, inputs, 64)
    assert found.sims.shape == (16, 8, 8)
    assert bool(localise.inside(found.peak, inputs.boxes_k[:, 0]).all())
    assert float(found.sims.amax(dim=(1, 2)).min()) > 0.98  # the cell on the box pools (nearly) the box itself


def test_the_batched_map_equals_pooling_each_cell_on_its_own():
    cfg = build_config(SMALL + ["--image_size=32"])
    torch.manual_seed(0)
    encoder_q, encoder_k = localise.encoder_pair(cfg)
    with torch.no_grad():
        for p in list(encoder_k.parameters()) + list(encoder_q.mph.expand.parameters()):
            p.add_(0.05 * torch.randn_like(p))  # a live MPH and a key encoder of its own
    batch = identical_views(4, 32, 0)
    batch.crop_k = torch.tensor([[0.1, 0.0, 0.9, 0.8, 1.0]]).repeat(4, 1)  # another (flipped) crop of the image
    inputs = ready_inputs(batch, localise.task_spec(cfg), torch.Generator().manual_seed(0))
    found = localise.similarity_maps(encoder_q, encoder_k, inputs, 32)
    sims = found.sims
    # reference: one cell at a time, the box built by hand, through the training forward
    with torch.no_grad():
        q = encoder_q(inputs.x_q, inputs.boxes_q)[:, 0]
        positive = inputs.boxes_k[:, 0]
        w, h = positive[:, 2] - positive[:, 0], positive[:, 3] - positive[:, 1]
        for row in range(4):
            for column in range(4):
                x, y = 0.5 + 8 * column, 0.5 + 8 * row
                cx = torch.clamp(torch.full_like(w, x), w / 2, 32 - w / 2)
                cy = torch.clamp(torch.full_like(h, y), h / 2, 32 - h / 2)
                box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)[:, None]
                k = encoder_k(inputs.x_k, box)[:, 0]
                torch.testing.assert_close(sims[:, row, column], (q * k).sum(1), atol=1e-5, rtol=1e-5)
                if (row, column) == divmod(int(sims[0].argmax()), 4):
                    torch.testing.assert_close(found.peak[0], torch.stack([cx[0], cy[0]]))


def test_mph_attention_is_the_last_layers_softmax_for_the_masked_cell():
    cfg = build_config(SMALL + ["--image_size=32", "--mph=attn"])
    torch.manual_seed(0)
    encoder, _ = localise.encoder_pair(cfg)
    x = torch.randn(3, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [10.0, 18.0, 20.0, 30.0], [24.0, 2.0, 32.0, 14.0]])
    maps = localise.mph_attention(encoder, x, boxes)
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))
    # reference: the attention written out from the last layer's projection weights
    with torch.no_grad():
        mph = encoder.mph
        c5 = encoder.trunk(x)
        tokens = mph.reduce(c5).flatten(2).transpose(1, 2)
        tokens = tokens + localise.sine_position_embedding(4, 4, tokens.shape[-1])
        for layer in mph.encoder.layers[:-1]:
            tokens = layer(tokens)
        last = mph.encoder.layers[-1]
        y = last.norm1(tokens)
        d, heads = y.shape[-1], last.self_attn.num_heads
        q, k, _ = torch.nn.functional.linear(y, last.self_attn.in_proj_weight, last.self_attn.in_proj_bias).split(d, -1)
        q, k = (t.view(3, 16, heads, d // heads).transpose(1, 2) for t in (q, k))
        attention = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1).mean(1)  # [N, 16, 16]
    cells = [0 * 4 + 0, 3 * 4 + 2, 1 * 4 + 3]  # the cell holding each box's centre (row * 4 + column)
    torch.testing.assert_close(maps.flatten(1), attention[torch.arange(3), cells], atol=1e-5, rtol=1e-4)
    assert localise.mph_attention(localise.encoder_pair(build_config(SMALL + ["--mph=conv"]))[0], x, boxes) is None


def run_module(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_localise_and_show_read_maskco_and_mocov2_checkpoints(tmp_path, sample_root):
    data = [f"--data={sample_root}", "--image_size=64", "--box_min_size=8", "--workers=0"]
    maskco_ckpt = write_checkpoint(tmp_path / "maskco.pt", SMALL + data)
    mocov2_ckpt = write_checkpoint(tmp_path / "mocov2.pt", SMALL + data + ["--method=mocov2", "--queue_size=64"])
    for name, path in (("maskco", maskco_ckpt), ("mocov2", mocov2_ckpt)):
        record = localise.main([f"--checkpoint={path}", "--images=24", f"--out={tmp_path / name}.json"])
        assert 0 <= record["localise_top1"] <= 100 and 0 < record["chance"] < 100 and record["images"] <= 24
        assert json.load(open(tmp_path / f"{name}.json"))["localise_top1"] == record["localise_top1"]
        out = tmp_path / f"{name}.png"
        assert show.main([f"--checkpoint={path}", f"--out={out}", "--images=3"]) == 0
        picture = show.Image.open(out)
        assert picture.width > 3 * 192  # the similarity column (and the attention one for MaskCo) added
    random = localise.main(["--random-init", *SMALL, *data, "--images=24"])
    assert random["checkpoint"].startswith("random init")


def test_bad_checkpoint_inputs_are_one_line_and_exit_2(tmp_path, sample_root):
    path = write_checkpoint(tmp_path / "c.pt", SMALL + [f"--data={sample_root}", "--image_size=64"])
    for args, message in (([f"--checkpoint={path}", "--arch=resnet34"], "different model configuration"),
                          ([f"--checkpoint={tmp_path / 'none.pt'}"], "does not exist"),
                          ([f"--checkpoint={path}", f"--data={tmp_path}"], "no images")):
        for module in ("maskco.evaluate.localise", "maskco.show"):
            result = run_module(module, *args)
            assert result.returncode == 2, (module, args, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], (module, args, result.stderr)
