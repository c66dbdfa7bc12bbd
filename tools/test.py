"""Evaluate a trained mmdet or mmseg model (e.g. one with a DAT backbone) on its test set."""
import argparse
import gc
import os.path as osp
from typing import Optional, Sequence

import torch
from mmengine.config import DictAction
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from mmdat.models.utils import check_weights_fit, trust_checkpoint
from mmdat.utils import (add_checkpoint_arguments, adapt_to_cpu, check_dataset_files,
                         load_tool_config, one_line_errors)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation logs go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true', help='mixed precision inference')
    add_checkpoint_arguments(parser)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. test_dataloader.batch_size=2')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args(argv)


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):  # addresses: when read
        raise SystemExit(f'Checkpoint file not found: {args.checkpoint}')
    if args.trust_checkpoint:
        trust_checkpoint(args.checkpoint)
    cfg.load_from = None  # loaded below, to check that it fits the model
    if args.amp:
        cfg.test_cfg.fp16 = True
    adapt_to_cpu(cfg)
    check_dataset_files(cfg, ['test_dataloader'])
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    checkpoint = runner.load_checkpoint(args.checkpoint)
    check_weights_fit(model, checkpoint, args.checkpoint, args.allow_partial_weights)
    runner.test()
    if torch.distributed.is_initialized():
        # Free the runner (kept alive by reference cycles) and with it DDP's reference to the
        # process group first: a gloo group still held by a model at exit may abort the process.
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
