"""A small synthetic dataset for trying the whole pipeline without COCO or ADE20K.

Images show simple shapes on textured backgrounds. Each split gets COCO-format instance
annotations (boxes and polygon masks) and ADE20K-style semantic label maps (PNG, one class id per
pixel). Everything is drawn from a seed, so the same call always writes the same files.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

#: Object classes; in the label maps 0 is the background and class ``i`` is ``i + 1``.
CLASSES = ('circle', 'square', 'triangle')
SEG_CLASSES = ('background', ) + CLASSES


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour gradient plus stripes and noise, so that the shapes are not trivial to find."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-0.3, 0.3, (2, 3))
    image = base + ys[..., None] * slope[0] + xs[..., None] * slope[1]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
    image += stripes[..., None] * rng.uniform(5, 25, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, label: int, cx: float, cy: float, size: float) -> np.ndarray:
    if CLASSES[label] == 'circle':
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], 1)
    if CLASSES[label] == 'square':
        theta = rng.uniform(0, np.pi / 2)
        angles = theta + np.arange(4) * np.pi / 2 + np.pi / 4
        return np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], 1)
    theta = rng.uniform(0, 2 * np.pi)
    angles = theta + np.arange(3) * 2 * np.pi / 3
    return np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], 1)


def _draw_image(rng: np.random.Generator, height: int, width: int,
                max_objects: int) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
    image = _background(rng, height, width)
    label_map = np.zeros((height, width), np.uint8)
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(CLASSES)))
        size = rng.uniform(0.06, 0.2) * min(height, width)
        cx, cy = rng.uniform(size, width - size), rng.uniform(size, height - size)
        points = _polygon(rng, label, cx, cy, size)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        contour = np.round(points).astype(np.int32)
        cv2.fillPoly(image, [contour], colour)
        cv2.fillPoly(label_map, [contour], label + 1)
        objects.append(dict(label=label, points=points))
    # Later shapes cover earlier ones: keep the instances that are still mostly visible.
    instances = []
    for index, obj in enumerate(objects):
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [np.round(obj['points']).astype(np.int32)], 1)
        for later in objects[index + 1:]:
            cv2.fillPoly(mask, [np.round(later['points']).astype(np.int32)], 0)
        if mask.sum() < 0.7 * cv2.contourArea(obj['points'].astype(np.float32)):
            continue
        x0, y0 = obj['points'].min(0).clip(0)
        x1, y1 = obj['points'].max(0).clip(max=(width, height))
        instances.append(dict(label=obj['label'], bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                              segmentation=[obj['points'].round(1).flatten().tolist()],
                              area=float(mask.sum())))
    return image, label_map, instances


def make_synthetic_dataset(out_dir: str,
                           num_images: Dict[str, int] = None,
                           image_size: Sequence[int] = (256, 320),
                           max_objects: int = 4,
                           seed: int = 0) -> Dict[str, str]:
    """Write the dataset under ``out_dir`` and return the annotation file of each split.

    Layout: ``{split}/images/*.png``, ``{split}/labels/*.png`` (semantic maps) and
    ``annotations/instances_{split}.json`` (COCO) for ``split`` in ``num_images``.

    Args:
        out_dir (str): Where to write.
        num_images (dict): Images per split. Defaults to ``{'train': 200, 'val': 50}``.
        image_size (tuple[int, int]): ``(height, width)`` of every image.
        max_objects (int): Most shapes drawn in one image (at least one is drawn).
        seed (int): Seed of everything drawn.
    """
    num_images = num_images or {'train': 200, 'val': 50}
    height, width = image_size
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    annotation_files = {}
    for split_index, (split, count) in enumerate(sorted(num_images.items())):
        rng = np.random.default_rng([seed, split_index])
        for sub in ('images', 'labels'):
            os.makedirs(osp.join(out_dir, split, sub), exist_ok=True)
        coco = dict(images=[], annotations=[],
                    categories=[dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)])
        for image_id in range(count):
            image, label_map, instances = _draw_image(rng, height, width, max_objects)
            file_name = f'{image_id:05d}.png'
            cv2.imwrite(osp.join(out_dir, split, 'images', file_name), image)
            cv2.imwrite(osp.join(out_dir, split, 'labels', file_name), label_map)
            coco['images'].append(dict(id=image_id, file_name=file_name, height=height, width=width))
            for inst in instances:
                coco['annotations'].append(
                    dict(id=len(coco['annotations']) + 1, image_id=image_id, category_id=inst['label'] + 1,
                         bbox=inst['bbox'], area=inst['area'], segmentation=inst['segmentation'],
                         iscrowd=0))
        path = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        with open(path, 'w') as f:
            json.dump(coco, f)
        annotation_files[split] = path
    return annotation_files
