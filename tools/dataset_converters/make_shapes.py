"""Write the synthetic shapes dataset (COCO instances + semantic label maps) used by the demo."""
import argparse

from mmdat.datasets import make_synthetic_dataset
from mmdat.utils import one_line_errors


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('out_dir', nargs='?', default='data/shapes', help='where to write it')
    parser.add_argument('--train', type=int, default=200, help='training images')
    parser.add_argument('--val', type=int, default=50, help='validation images')
    parser.add_argument('--size', type=int, nargs=2, default=(256, 320), metavar=('H', 'W'),
                        help='image height and width')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args()


@one_line_errors
def main():
    args = parse_args()
    if args.train < 1 or args.val < 1 or min(args.size) < 32:
        raise SystemExit('--train and --val must be >= 1 and --size at least 32x32')
    files = make_synthetic_dataset(args.out_dir, dict(train=args.train, val=args.val),
                                   image_size=args.size, seed=args.seed)
    for split, path in sorted(files.items()):
        print(f'{split}: {path}')


if __name__ == '__main__':
    main()
