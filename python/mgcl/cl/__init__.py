"""The continual-learning engine: tasks, trainer, strategies, metrics."""
from . import strategies
from .config import TrainConfig
from .evaluate import evaluate, zero_shot_head
from .metrics import macro_auc, summarize
from .tasks import Task
from .trainer import ContinualTrainer

__all__ = ["Task", "ContinualTrainer", "TrainConfig", "strategies", "summarize", "evaluate", "zero_shot_head",
           "macro_auc"]
