"""Meta-learning algorithms, one ``LightningModule`` each, on the shared :class:`MetaLearner`."""
from .base import MetaLearner
from .blackbox import AttentionLearner
from .cavia import CAVIA
from .cnp import CNP
from .imaml import iMAML
from .maml import ANIL, MAML, MAMLPlusPlus, MetaSGD
from .maml_rl import MAMLRL
from .matchingnet import MatchingNet
from .protonet import ProtoNet
from .relationnet import RelationNet
from .reptile import Reptile

__all__ = [
    "ANIL",
    "AttentionLearner",
    "CAVIA",
    "CNP",
    "MAML",
    "MAMLPlusPlus",
    "MAMLRL",
    "MatchingNet",
    "MetaLearner",
    "MetaSGD",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "iMAML",
]
