"""Reading the image of tools/demo.py and tools/visualize_deformable.py without decoding a huge
file at full size.

The size is read from the file's header first (PIL opens lazily). A JPEG is decoded reduced by
its decoder (1/2, 1/4 or 1/8 scale, ``Image.draft``); another format above
:data:`MAX_IMAGE_PIXELS` is refused with one line before it is decoded. An image with a side
over :data:`MAX_IMAGE_SIDE` is shrunk to it: the models' test pipelines resize far below that.
"""
import contextlib
import math
import os.path as osp
import tempfile
from typing import Iterator, Tuple

import numpy as np

#: Images with more pixels than this are refused unless their decoder can reduce them below it
#: (JPEG): decoding one at full size takes 3 bytes a pixel and seconds to minutes.
MAX_IMAGE_PIXELS = 100_000_000
#: The tools shrink larger images to this many pixels a side (aspect ratio kept).
MAX_IMAGE_SIDE = 2048
#: EXIF orientations that turn the picture by 90 degrees (width and height swap).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(ValueError):
    """An image file that is missing, unreadable or too large; the message is one line."""


def read_image(path: str, max_side: int = MAX_IMAGE_SIDE,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Tuple[np.ndarray, float]:
    """Read an image as ``(H, W, 3)`` RGB uint8, upright (EXIF orientation applied), at most
    ``max_side`` pixels a side.

    Args:
        path (str): The image file.
        max_side (int): Longer images are shrunk to this side.
        max_pixels (int): Larger images (in the file) are refused before decoding, unless the
            decoder can reduce them below it.

    Returns:
        tuple[ndarray, float]: The image, and the factor by which it was shrunk (new size /
        size in the file; 1.0 if it was not).

    Raises:
        ImageError: The file is missing, not an image, damaged, or too large.
    """
    from PIL import Image, ImageOps
    if not osp.isfile(path):
        raise ImageError(f'Image not found: {path}')
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own limit, below
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: nothing decoded yet
            target = max_side / max(width, height)
            if image.format == 'JPEG' and target < 1:
                # The decoder skips detail it would throw away: a 1/8 decode is 64x cheaper.
                image.draft('RGB', (math.ceil(width * target), math.ceil(height * target)))
            decoded_pixels = image.size[0] * image.size[1]
            if decoded_pixels > max_pixels:
                raise ImageError(
                    f'{path} is {width}x{height} pixels, over the limit of {max_pixels / 1e6:.0f} '
                    f'million pixels that the tools decode: shrink it first (the tools use at most '
                    f'{max_side} pixels a side)')
            orientation = image.getexif().get(0x0112, 1)  # (a PNG is decoded to find it)
            image.load()
            # Each of these copies the image: only when needed.
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode != 'RGB':
                image = image.convert('RGB')
    except ImageError:
        raise
    except Exception as error:  # PIL reports unknown and damaged files with many error types
        lines = str(error).strip().splitlines()
        raise ImageError(f'Cannot read image {path}: {lines[0] if lines else type(error).__name__}') \
            from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    scale = min(1.0, max_side / max(width, height))
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BILINEAR, reducing_gap=2.0)
        scale = size[0] / width
    return np.asarray(image), scale


@contextlib.contextmanager
def image_file(path: str, image: np.ndarray, scale: float) -> Iterator[str]:
    """A file holding what :func:`read_image` returned, for pipelines that read files: ``path``
    itself, or (``scale < 1``) a temporary PNG of the shrunk image, removed on exit."""
    if scale >= 1:
        yield path
        return
    import mmcv  # only the tools need mmcv
    print(f'{path} shrunk by {scale:.3g} to {image.shape[1]}x{image.shape[0]}')
    with tempfile.TemporaryDirectory() as folder:
        shrunk = osp.join(folder, 'image.png')
        mmcv.imwrite(image[..., ::-1], shrunk)  # RGB in, BGR on disk
        yield shrunk
