"""Meta-learning algorithms, one ``LightningModule`` each, on the shared :class:`MetaLearner`."""
from .base import MetaLearner
from .blackbox import AttentionLearner
from .cnp import CNP
from .maml import ANIL, MAML, MetaSGD
from .maml_rl import MAMLRL
from .matchingnet import MatchingNet
from .protonet import ProtoNet
from .relationnet import RelationNet

__all__ = [
    "ANIL",
    "AttentionLearner",
    "CNP",
    "MAML",
    "MAMLRL",
    "MatchingNet",
    "MetaLearner",
    "MetaSGD",
    "ProtoNet",
    "RelationNet",
]
