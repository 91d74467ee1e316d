"""The continual-learning engine: tasks, trainer, strategies, metrics."""
from .tasks import Task

__all__ = ["Task"]
