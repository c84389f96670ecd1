"""MaskCo: contrastive mask prediction (Zhao et al., ICCV 2021) — the method and the trainer.

Nothing in this package knows which data backend produced a batch; see ``pipelines``.
"""
__version__ = "0.1.0"
