"""Evaluate a trained mmdet or mmseg model (e.g. one with a DAT backbone) on its test set."""
import argparse
import gc
import os.path as osp

import torch
from mmengine.config import DictAction
from mmengine.runner import Runner

from mmdat.utils import adapt_to_cpu, check_dataset_files, load_tool_config


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation logs go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--amp', action='store_true', help='mixed precision inference')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. test_dataloader.batch_size=2')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f'Checkpoint file not found: {args.checkpoint}')
    cfg.load_from = args.checkpoint
    if args.amp:
        cfg.test_cfg.fp16 = True
    adapt_to_cpu(cfg)
    check_dataset_files(cfg, ['test_dataloader'])
    Runner.from_cfg(cfg).test()
    if torch.distributed.is_initialized():
        # Free the runner (kept alive by reference cycles) and with it DDP's reference to the
        # process group first: a gloo group still held by a model at exit may abort the process.
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
