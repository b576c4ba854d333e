"""Training: torchrun processes + DeepSpeed ZeRO, GradCache, checkpoints with exact resume.

    from peg.train import train
    model_dir = train(config, output_dir, resume=False)   # sentence-transformers folder
"""

from peg.train.batches import BatchError, BatchPlan, PairFile, RankBatch, prepare_step
from peg.train.trainer import TrainError, TrainInputs, train

__all__ = ["BatchError", "BatchPlan", "PairFile", "RankBatch", "TrainError", "TrainInputs", "prepare_step", "train"]
