"""Meta-learning algorithms, one ``LightningModule`` each, on the shared :class:`MetaLearner`."""
from .base import MetaLearner
from .maml import ANIL, MAML, MetaSGD

__all__ = ["ANIL", "MAML", "MetaLearner", "MetaSGD"]
