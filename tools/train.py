"""Train an mmdet or mmseg model (e.g. one with a DAT backbone) from a config."""
import argparse
import gc
from typing import Optional, Sequence

import torch
from mmengine.config import DictAction
from mmengine.runner import Runner

from mmdat.engine import set_up_resume
from mmdat.models.utils import trust_checkpoint
from mmdat.utils import (ConfigError, adapt_to_cpu, check_backbone_weights,
                         check_checkpoint_files, check_dataset_files, load_tool_config,
                         one_line_errors, use_atomic_checkpoints)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='config file, e.g. configs/retinanet_dat_t_coco.py')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const=True, metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or, when no path is given, from the newest '
                        'complete checkpoint in the work dir (from the beginning if it has none)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='read the checkpoint to resume from (and the config\'s load_from) '
                        'with an unrestricted unpickler: only for files you trust, it may run '
                        'code they hold')
    parser.add_argument('--amp', action='store_true', help='mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual total batch size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)  # for torch.distributed.launch
    return parser.parse_args(argv)


@one_line_errors
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    cfg = load_tool_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp and cfg.optim_wrapper.get('type', 'OptimWrapper') != 'AmpOptimWrapper':
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise ConfigError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    set_up_resume(cfg, args.resume, trusted=args.trust_checkpoint)
    check_dataset_files(cfg, ['train_dataloader', 'val_dataloader'])
    check_backbone_weights(cfg)
    check_checkpoint_files(cfg)
    if args.trust_checkpoint and cfg.get('load_from'):
        trust_checkpoint(cfg.load_from)
    use_atomic_checkpoints(cfg)
    adapt_to_cpu(cfg)
    Runner.from_cfg(cfg).train()
    if torch.distributed.is_initialized():
        # Free the runner (kept alive by reference cycles) and with it DDP's reference to the
        # process group first: a gloo group still held by a model at exit may abort the process.
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
