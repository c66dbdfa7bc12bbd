"""Convert an official DAT/DAT++ detection or segmentation checkpoint to mmdet 3 / mmseg 1.

The official DAT-Detection (mmdet 2.x) and DAT-Segmentation (mmseg 0.x) checkpoints hold a whole
model. The backbone is converted to mmdat's layout; necks and heads keep their names; the
training meta is dropped. With ``--config``, the result is loaded (strictly) into the model that
config builds, so that ``tools/test.py CONFIG DST`` evaluates it.

Usage:
    python tools/model_converters/dat_det_seg2mmdat.py mrcn_tiny_3x.pth mrcn_tiny_3x_mmdat.pth \
        --config configs/mask_rcnn_datpp_t_3x_coco.py
"""
import argparse
import os.path as osp

import torch

from mmdat.models.utils import (dat_det_seg_converter, extract_state_dict,
                                is_official_dat_det_seg, load_checkpoint_file)
from mmdat.utils import one_line_errors, read_config, register_scope


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (e.g. from DAT-Detection)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='read SRC with an unrestricted unpickler: only for a file you trust, '
                        'it may run code it holds (by default only tensors, plain containers, '
                        'numpy arrays and a pickled config are read)')
    parser.add_argument('dst', help='where to save the converted checkpoint')
    parser.add_argument('--config', help='mmdat config of the same model: check that every weight '
                        'of the model is in the converted checkpoint, and nothing else')
    return parser.parse_args()


def check_against_config(state_dict, config):
    """Compare ``state_dict`` with the model ``config`` builds; exit naming every difference."""
    from mmengine.registry import init_default_scope

    import mmdat  # noqa: F401  registers DAT into mmdet and mmseg
    cfg = read_config(config)
    scope = register_scope(cfg)
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    model_state = registry.build(cfg.model).state_dict()
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    shapes = [f'{k}: {tuple(v.shape)} in the checkpoint, {tuple(model_state[k].shape)} in the model'
              for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    problems = ([f'missing from the checkpoint: {", ".join(missing)}'] if missing else []) + \
        ([f'not in the model: {", ".join(unexpected)}'] if unexpected else []) + shapes
    if problems:
        raise SystemExit(f'The converted weights do not fit {config}:\n' + '\n'.join(problems))


@one_line_errors
def main():
    args = parse_args()
    if args.config:
        read_config(args.config)  # a config it cannot read stops it before the conversion
    try:
        state_dict = extract_state_dict(load_checkpoint_file(args.src, trusted=args.trust_checkpoint))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error))
    if not is_official_dat_det_seg(state_dict):
        raise SystemExit(f'{args.src} does not look like an official DAT detection or segmentation '
                         'checkpoint (no backbone.patch_proj.0.weight or '
                         'backbone.stages.0.layer_norms.0.norm.weight)')
    dst_dir = osp.dirname(osp.abspath(args.dst))
    if not osp.isdir(dst_dir):
        raise SystemExit(f'Output folder does not exist: {dst_dir}')
    converted = dat_det_seg_converter(state_dict)
    if args.config:
        check_against_config(converted, args.config)
    torch.save({'state_dict': converted}, args.dst)
    print(f'Converted {len(state_dict)} official tensors into {len(converted)} tensors: {args.dst}')


if __name__ == '__main__':
    main()
