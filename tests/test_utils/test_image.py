"""mmdat.utils.read_image: a huge image is refused or decoded reduced, never decoded at full size."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmdat.utils import ImageError, read_image
from mmdat.utils import image as image_module


def png_header_only(path, width, height):
    """A PNG whose header declares ``width x height`` and whose pixel data is a few bytes: what
    the tools read before deciding to decode (decoding it would fail)."""

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack(
            '>I', zlib.crc32(kind + data) & 0xffffffff)

    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8,
                                                                       2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b''))
    return str(path)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail any full decode of an image file."""

    def refuse(self, *args, **kwargs):
        raise AssertionError('the image was decoded')

    monkeypatch.setattr(Image.Image, 'load', refuse)
    monkeypatch.setattr(Image.Image, 'convert', refuse)


def test_a_small_image_is_read_as_it_is(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'small.png')
    image, scale = read_image(str(tmp_path / 'small.png'))
    assert scale == 1.0 and image.dtype == np.uint8 and np.array_equal(image, pixels)


def test_a_huge_png_is_refused_before_it_is_decoded(tmp_path, no_decoding):
    """Seen: tools/demo.py on a 20000x20000 PNG: 4.47 GiB ArrayMemoryError."""
    path = png_header_only(tmp_path / 'huge.png', 20000, 20000)
    with pytest.raises(ImageError, match=r'^.*huge.png is 20000x20000 pixels, over the limit of 100 '
                       r'million pixels that the tools decode: shrink it first \(the tools use at '
                       r'most 2048 pixels a side\)$'):
        read_image(path)


def test_a_large_image_is_shrunk_to_the_working_size(tmp_path):
    Image.new('RGB', (600, 300), (10, 200, 30)).save(tmp_path / 'wide.png')
    image, scale = read_image(str(tmp_path / 'wide.png'), max_side=200)
    assert image.shape == (100, 200, 3) and scale == pytest.approx(1 / 3)
    assert np.abs(image.astype(int) - (10, 200, 30)).max() <= 1


def test_a_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    """Its decoder skips what would be thrown away: a JPEG over the pixel limit is accepted,
    the same image as a PNG is not."""
    picture = Image.new('RGB', (1600, 1200), (120, 60, 200))
    picture.save(tmp_path / 'photo.jpg', quality=95)
    picture.save(tmp_path / 'photo.png')
    decoded = []
    real_load = Image.Image.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, 'load', load)
    image, scale = read_image(str(tmp_path / 'photo.jpg'), max_side=200, max_pixels=100_000)
    assert image.shape == (150, 200, 3) and scale == pytest.approx(1 / 8)
    assert decoded[0] == (200, 150)  # decoded at 1/8 scale
    assert np.abs(image.astype(int) - (120, 60, 200)).max() <= 3
    with pytest.raises(ImageError, match='1600x1200 pixels, over the limit of 0 million'):
        read_image(str(tmp_path / 'photo.png'), max_side=200, max_pixels=100_000)


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.new('RGB', (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    picture.save(tmp_path / 'turned.jpg', exif=exif)
    image, scale = read_image(str(tmp_path / 'turned.jpg'))
    assert image.shape == (40, 20, 3) and scale == 1.0
    image, scale = read_image(str(tmp_path / 'turned.jpg'), max_side=10)
    assert image.shape == (10, 5, 3) and scale == pytest.approx(0.25)


@pytest.mark.parametrize('content, expected', [
    (b'', 'Cannot read image .*: cannot identify image file'),
    (b'not an image', 'Cannot read image .*: cannot identify image file'),
])
def test_unreadable_files(tmp_path, content, expected):
    (tmp_path / 'bad.png').write_bytes(content)
    with pytest.raises(ImageError, match=expected):
        read_image(str(tmp_path / 'bad.png'))
    with pytest.raises(ImageError, match='^Image not found: .*absent.png$'):
        read_image(str(tmp_path / 'absent.png'))


def test_the_limits_are_restored():
    assert Image.MAX_IMAGE_PIXELS is not None
    assert image_module.MAX_IMAGE_PIXELS == 100_000_000 and image_module.MAX_IMAGE_SIDE == 2048
