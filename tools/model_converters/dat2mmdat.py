"""Convert an official DAT or DAT++ classification checkpoint to an mmdat backbone checkpoint.

Usage: python tools/model_converters/dat2mmdat.py dat_pp_tiny_in1k_224.pth dat_tiny_pp_mmdat.pth

The result loads into ``DAT(arch='tiny'|'small'|'base')`` for a DAT (v1) file and
``DAT(arch='tiny++'|'small++'|'base++')`` for a DAT++ file.
"""
import argparse
import os.path as osp

import torch

from mmdat.models.utils import (dat_converter, extract_state_dict, is_official_dat,
                                is_official_dat_det_seg, is_official_datpp, load_checkpoint_file)
from mmdat.utils import one_line_errors


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (e.g. dat_tiny_in1k_224.pth)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='read SRC with an unrestricted unpickler: only for a file you trust, '
                        'it may run code it holds (by default only tensors, plain containers, '
                        'numpy arrays and a pickled config are read)')
    parser.add_argument('dst', help='where to save the mmdat checkpoint')
    return parser.parse_args()


@one_line_errors
def main():
    args = parse_args()
    try:
        state_dict = extract_state_dict(load_checkpoint_file(args.src, trusted=args.trust_checkpoint))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error))
    if is_official_dat_det_seg(state_dict):
        raise SystemExit(f'{args.src} is a whole official detection/segmentation model; convert it '
                         'with tools/model_converters/dat_det_seg2mmdat.py')
    if not is_official_dat(state_dict):
        raise SystemExit(f'{args.src} does not look like an official DAT checkpoint '
                         '(no patch_proj.0.weight or stages.0.layer_norms.0.norm.weight)')
    converted = dat_converter(state_dict)
    dst_dir = osp.dirname(osp.abspath(args.dst))
    if not osp.isdir(dst_dir):
        raise SystemExit(f'Output folder does not exist: {dst_dir}')
    torch.save({'state_dict': converted}, args.dst)
    version = 'DAT++' if is_official_datpp(state_dict) else 'DAT (v1)'
    print(f'Converted {len(state_dict)} official {version} tensors into {len(converted)} mmdat '
          f'tensors: {args.dst}')


if __name__ == '__main__':
    main()
