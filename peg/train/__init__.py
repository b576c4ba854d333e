"""Training: torchrun processes + DeepSpeed ZeRO, GradCache, checkpoints with exact resume.

    from peg.train import train
    model_dir = train(config, output_dir, resume=False)   # sentence-transformers folder
"""

from peg.train.batches import BatchError, BatchPlan, RankBatch, load_dataset
from peg.train.trainer import TrainError, train

__all__ = ["BatchError", "BatchPlan", "RankBatch", "TrainError", "load_dataset", "train"]
