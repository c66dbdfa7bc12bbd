"""Train an mmdet or mmseg model (e.g. one with a DAT backbone) from a config."""
import argparse
import gc

import torch
from mmengine.config import DictAction
from mmengine.runner import Runner

from mmdat.utils import adapt_to_cpu, check_backbone_weights, check_dataset_files, load_tool_config


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file, e.g. configs/retinanet_dat_t_coco.py')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or from the latest one in the work dir '
                        'when no path is given')
    parser.add_argument('--amp', action='store_true', help='mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)  # for torch.distributed.launch
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp and cfg.optim_wrapper.get('type', 'OptimWrapper') != 'AmpOptimWrapper':
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise SystemExit('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    adapt_to_cpu(cfg)
    check_dataset_files(cfg, ['train_dataloader', 'val_dataloader'])
    check_backbone_weights(cfg)
    Runner.from_cfg(cfg).train()
    if torch.distributed.is_initialized():
        # Free the runner (kept alive by reference cycles) and with it DDP's reference to the
        # process group first: a gloo group still held by a model at exit may abort the process.
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
