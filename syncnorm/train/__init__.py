"""`syncnorm train`: a small CNN with batch norm on scikit-learn's digits, on any
number of workers (torchrun, local processes, or Ray)."""

from syncnorm.train.config import TrainConfig, TrainResult
from syncnorm.train.loop import train_worker

__all__ = ["TrainConfig", "TrainResult", "train_worker"]
