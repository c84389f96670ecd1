"""Evaluation and transfer of pretrained backbones."""
