"""The bench's two baselines, measured on the same files and threads as the backends: the decode
ceiling (libjpeg-turbo decode only) and the reference MoCo v2 input pipeline as people write it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from maskco.bench.timing import loader_rate, timed


# ---- 1. decode ceiling
def decode_ceiling(paths: list[str], threads: int, device, repeats: int) -> dict:
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

    def decode_all():
        with ThreadPoolExecutor(threads) as pool:  # decode_jpeg releases the GIL
            list(pool.map(lambda p: decode_jpeg(read_file(p), mode=ImageReadMode.RGB), paths))

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread per decode thread
    try:
        return timed(decode_all, len(paths), torch.device("cpu"), repeats)
    finally:
        torch.set_num_threads(previous)  # what the rest of the bench (and of a test session) runs with


# ---- 2. the reference MoCo v2 loader
def baseline_loader(root: str, batch_size: int, image_size: int, threads: int, device, batches: int):
    from PIL import ImageFilter
    import random
    from torchvision import datasets, transforms

    class Blur:  # MoCo v2's GaussianBlur (PIL), as in facebookresearch/moco main_moco.py
        def __call__(self, image):
            return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    class TwoCrops:
        def __init__(self, transform):
            self.transform = transform

        def __call__(self, image):
            return self.transform(image), self.transform(image)

    moco_v2 = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([Blur()], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    dataset = datasets.ImageFolder(root, TwoCrops(moco_v2))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=threads,
                                         pin_memory=device.type == "cuda", drop_last=True, persistent_workers=True)
    return loader_rate(loader, batches, batch_size, device, lambda b: [t.to(device, non_blocking=True) for t in b[0]])
