"""fewshot-lightning: meta-learning on PyTorch Lightning, one batch of tasks per step."""
__version__ = "0.1.0"
