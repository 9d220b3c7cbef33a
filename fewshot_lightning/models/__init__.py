"""Backbones. Every classifier backbone names its last layer ``head`` (ANIL adapts it alone),
and metric-based algorithms use a backbone built with ``out_features=None`` as an embedding."""
from .context import ContextMLP, FiLMConv4
from .conv4 import Conv4
from .mlp import MLP
from .relation import RelationEmbedding, RelationModule

__all__ = ["ContextMLP", "Conv4", "FiLMConv4", "MLP", "RelationEmbedding", "RelationModule"]
