"""Entry point of one training process:
`python -m peg.train.worker CONFIG OUTPUT_DIR [--resume] [--checkpoint-key KEY] [--pretrain]`.

Started by `peg.train.launch` through torch.distributed.run, or directly as the command of a
PyTorchJob pod (torchrun there too), where CONFIG is the run config YAML. A training worker reads
its inputs (`TrainInputs`) from OUTPUT_DIR/inputs.json when `launch` wrote one, else from CONFIG.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from peg.config import load_config
from peg.console import LOG_FILE_ENV, capture
from peg.errors import PegError
from peg.process import die_with_parent
from peg.train.trainer import INPUTS_FILE, TrainInputs, run_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peg.train.worker")
    parser.add_argument("config")
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-key", help="Store key prefix each checkpoint is also uploaded to.")
    parser.add_argument("--pretrain", action="store_true", help="Run the pretraining loop (peg.train.pretrain).")
    args = parser.parse_args(argv)
    die_with_parent()  # torchrun starts workers in their own sessions: a group kill would miss them
    rank0 = os.environ.get("RANK", "0") == "0"
    if LOG_FILE_ENV in os.environ:  # started by a peg command: its log file; the launcher talks to the user
        capture("train", show_logs=False)
    try:
        if args.pretrain:
            from peg.train.pretrain import run_pretrain_worker

            run_pretrain_worker(load_config(args.config), Path(args.output_dir), args.resume, args.checkpoint_key)
        else:
            inputs_file = Path(args.output_dir) / INPUTS_FILE  # written by `launch` beside config.yaml
            inputs = TrainInputs.read(inputs_file) if inputs_file.is_file() else None
            run_worker(load_config(args.config), Path(args.output_dir), args.resume, args.checkpoint_key, inputs)
    except PegError as e:
        if rank0:
            print(f"peg train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
