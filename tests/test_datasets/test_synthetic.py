import hashlib
import json

import cv2
import numpy as np

from mmdat.datasets import CLASSES, make_synthetic_dataset


def digest(folder):
    return hashlib.sha256(b''.join(p.read_bytes() for p in sorted(folder.rglob('*.*')))).hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    make_synthetic_dataset(str(tmp_path / 'a'), {'train': 3, 'val': 2}, image_size=(64, 96), seed=1)
    make_synthetic_dataset(str(tmp_path / 'b'), {'train': 3, 'val': 2}, image_size=(64, 96), seed=1)
    make_synthetic_dataset(str(tmp_path / 'c'), {'train': 3, 'val': 2}, image_size=(64, 96), seed=2)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b')
    assert digest(tmp_path / 'a') != digest(tmp_path / 'c')


def test_annotations_agree_with_images_and_label_maps(tmp_path):
    files = make_synthetic_dataset(str(tmp_path), {'train': 6, 'val': 3}, image_size=(128, 160), seed=0)
    for split, count in (('train', 6), ('val', 3)):
        coco = json.loads(open(files[split]).read())
        assert len(coco['images']) == count
        assert [c['name'] for c in coco['categories']] == list(CLASSES)
        assert coco['annotations'], 'every split has objects'
        for ann in coco['annotations']:
            x, y, w, h = ann['bbox']
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 160 and y + h <= 128
            assert len(ann['segmentation'][0]) >= 6
            labels = cv2.imread(str(tmp_path / split / 'labels' / f'{ann["image_id"]:05d}.png'),
                                cv2.IMREAD_UNCHANGED)
            box = labels[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))]
            # the label map shows the instance's class inside its box, on most of its area
            assert (box == ann['category_id']).sum() >= 0.7 * ann['area']
        image = cv2.imread(str(tmp_path / split / 'images' / '00000.png'))
        assert image.shape == (128, 160, 3) and image.std() > 10
