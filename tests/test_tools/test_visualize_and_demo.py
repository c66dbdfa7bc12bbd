"""tools/visualize_deformable.py and tools/demo.py end to end on a CPU, with tiny random models."""
import functools
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mmdat.datasets import make_synthetic_dataset
from mmdat.utils import read_image
from tests.conftest import TEST_CONFIGS, load_tool, small_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'test_utils'))  # png_header_only

DETECTOR = str(TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py')
SEGMENTER = str(TEST_CONFIGS / 'upernet_dat_shapes_tiny.py')
BACKBONE_ARCH = dict(embed_dims=16, depths=(1, 1, 4, 2), num_heads=(1, 2, 4, 4), offset_groups=(0, 0, 2, 4))


visualize = load_tool('visualize_deformable.py')
demo = load_tool('demo.py')


@pytest.fixture(scope='module')
def image_file(tmp_path_factory):
    """A synthetic image of an odd size (150 x 205), unlike the configs' 256 x 320 resize."""
    root = tmp_path_factory.mktemp('shapes')
    make_synthetic_dataset(str(root), {'val': 1}, image_size=(150, 205), seed=1)
    return str(root / 'val' / 'images' / '00000.png')


@pytest.fixture(scope='module')
def backbone_config(tmp_path_factory):
    """A backbone-only config and a checkpoint of that backbone with non-trivial offsets."""
    root = tmp_path_factory.mktemp('backbone')
    config = root / 'dat_backbone.py'
    config.write_text(f'model = dict(type="DAT", arch={BACKBONE_ARCH!r}, drop_path_rate=0.0)\n')
    model = small_backbone(arch=BACKBONE_ARCH)
    for name, param in model.named_parameters():
        if name.endswith('offset_net.proj.weight'):
            param.data.normal_(0, 1.0)
    torch.save({'state_dict': model.state_dict()}, root / 'dat_backbone.pth')
    return str(config), str(root / 'dat_backbone.pth'), model.eval()


def spy_on_drawing(monkeypatch):
    """Keep what the tool hands to the drawing function."""
    calls = []
    real = visualize.draw_deformable_attention

    def spy(image, record, *args):
        calls.append((image, record, args))
        return real(image, record, *args)

    monkeypatch.setattr(visualize, 'draw_deformable_attention', spy)
    return calls



def assert_bad_out_refused(main, argv, tmp_path, no_extension_message):
    """``--out`` in a missing folder, or without an extension, stops the tool with one line."""
    for bad_out, message in [(str(tmp_path / 'no_dir' / 'x.png'), 'folder .*no_dir does not exist'),
                             (str(tmp_path / 'no_extension'), no_extension_message)]:
        with pytest.raises(SystemExit, match=message):
            main(argv + ['--out', bad_out])

def test_visualize_backbone_draws_what_the_model_computed(image_file, backbone_config, tmp_path,
                                                          monkeypatch):
    config, checkpoint, model = backbone_config
    calls = spy_on_drawing(monkeypatch)
    out = tmp_path / 'deformable.png'
    visualize.main([image_file, '--config', config, '--checkpoint', checkpoint, '--stage', '3',
                    '--block', '1', '--query', '10', '20', '--query', '200', '149', '--out', str(out)])
    assert cv2.imread(str(out)) is not None
    (image, record, (stride, scale_factor, *_)), = calls
    assert image.shape == (150, 205, 3) and (stride, scale_factor) == (16, (1.0, 1.0))
    assert (record.stage, record.block, record.map_size) == (2, 1, (10, 13))
    assert record.query_indices == [1 * 13 + 0, 9 * 13 + 12]  # pixel (10, 20) is in map pixel (0, 1)

    # The same backbone run here: the tool drew the positions this block computed for this image.
    pixels = torch.from_numpy(cv2.imread(image_file)[..., ::-1].copy()).float()
    inputs = ((pixels - torch.tensor(visualize.IMAGENET_MEAN)) / torch.tensor(visualize.IMAGENET_STD))
    attn = model.stages[2].blocks[1].attn
    queries = []
    handle = attn.proj_q.register_forward_hook(lambda m, i, o: queries.append(o))
    with torch.no_grad():
        model(inputs.permute(2, 0, 1)[None])
    handle.remove()
    _, positions = attn.sampling_positions(queries[0])
    torch.testing.assert_close(record.positions.flatten(0, 1), positions, rtol=0, atol=1e-6)
    assert (positions - record.reference).abs().max() > 0.05


# (config, --stage, expected stride, scale factor, record (stage, block, map size), attention shape)
PIPELINE_CASES = [
    # the demo detector: 150x205 resized to fit 256x192 (x 1.2488), stage 3 of its small DAT
    (DETECTOR, 3, 16, (256 / 205, 187 / 150), (2, 1, (12, 16)), (1, 4, 2, 192)),
    # UperNet: 150x205 resized to fit 320x256 (x 1.5609), then DAT's ceil(size / 32) maps
    (SEGMENTER, 4, 32, (320 / 205, 234 / 150), (3, 1, (8, 10)), (1, 4, 2, 80)),
]


@pytest.mark.parametrize('config, stage, stride, scale, where, attention_shape', PIPELINE_CASES,
                         ids=['detector', 'segmenter'])
def test_visualize_through_the_test_pipeline(config, stage, stride, scale, where, attention_shape,
                                             image_file, tmp_path, monkeypatch):
    calls = spy_on_drawing(monkeypatch)
    out = tmp_path / 'deformable.png'
    visualize.main([image_file, '--config', config, '--stage', str(stage), '--num-queries', '2',
                    '--out', str(out)])
    assert cv2.imread(str(out)) is not None
    (image, record, (drawn_stride, scale_factor, *_)), = calls
    assert drawn_stride == stride and scale_factor == pytest.approx(scale, abs=1e-3)
    assert (record.stage, record.block, record.map_size) == where
    assert len(record.query_indices) == 2 and record.attention.shape == attention_shape


def test_visualize_errors(image_file, backbone_config, tmp_path):
    config, _, _ = backbone_config
    out = str(tmp_path / 'x.png')
    cases = [
        ([str(tmp_path / 'missing.png'), '--config', config], 'Image not found'),
        ([image_file, '--config', str(tmp_path / 'missing.py')], 'Config file not found'),
        ([image_file, '--config', config, '--checkpoint', str(tmp_path / 'w.pth')], 'Checkpoint not found'),
        ([image_file, '--config', config, '--stage', '2'], r'stages \(1-based\) with deformable blocks: \[3, 4\]'),
        ([image_file, '--config', config, '--block', '2'], r'--block 2 .* stage 3; choose one of \[1, 3\]'),
        ([image_file, '--config', config, '--query', '205', '10'], 'outside the 205x150 image'),
        ([image_file, '--config', config, '--top-k', '0'], '--top-k must be >= 1'),
    ]
    not_an_image = tmp_path / 'notes.png'
    not_an_image.write_text('not an image')
    cases.append(([str(not_an_image), '--config', config], 'Cannot read image'))
    resnet = tmp_path / 'resnet.py'
    resnet.write_text("default_scope = 'mmdet'\nmodel = dict(type='RetinaNet', backbone=dict(type='ResNet', depth=18))\n")
    cases.append(([image_file, '--config', str(resnet)], "no DAT backbone.*'ResNet'"))
    short = tmp_path / 'short.py'  # a backbone whose last stage never runs
    short.write_text(f'model = dict(type="DAT", arch={BACKBONE_ARCH!r}, out_indices=(0, 1, 2))\n')
    cases.append(([image_file, '--config', str(short), '--stage', '4'],
                  r'stops after stage 3 \(out_indices \[0, 1, 2\]'))
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            visualize.main(argv + ['--out', out])
    # --out is checked before the model runs
    assert_bad_out_refused(visualize.main, [image_file, '--config', config], tmp_path,
                           r'extension picks the image format; use one of .*\.png')


@pytest.mark.parametrize('config', [DETECTOR, SEGMENTER], ids=['detector', 'segmenter'])
def test_demo_draws_over_the_image(config, image_file, tmp_path, capsys):
    out = tmp_path / 'demo.png'
    demo.main([image_file, config, '--out', str(out)])
    drawing = cv2.imread(str(out))
    assert drawing.shape == (150, 205, 3)
    assert np.abs(drawing.astype(int) - cv2.imread(image_file)).mean() > 1  # something was drawn
    printed = capsys.readouterr().out
    if config == SEGMENTER:  # class names of the config, not mmseg's Cityscapes default
        assert 'classes present:' in printed and 'road' not in printed
    else:
        assert 'detections with score >= 0.3' in printed and 'person' not in printed


def test_demo_with_a_checkpoint(image_file, tmp_path, capsys):
    """A checkpoint as the runner saves it: weights and class names are taken from it."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    model = MODELS.build(Config.fromfile(SEGMENTER).model)
    # weights that make every pixel class 1, whatever the image
    model.decode_head.conv_seg.bias.data = torch.tensor([0.0, 1e4, 0.0, 0.0])
    classes = ('sky', 'disc', 'box', 'wedge')
    palette = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': {'classes': classes, 'palette': palette}}}, tmp_path / 'seg.pth')
    out = tmp_path / 'demo.png'
    demo.main([image_file, SEGMENTER, str(tmp_path / 'seg.pth'), '--out', str(out), '--opacity', '1'])
    assert 'classes present: disc\n' in capsys.readouterr().out
    drawing = cv2.imread(str(out))
    assert drawing.shape == (150, 205, 3)
    # opacity 1: the class colour (red, BGR here) everywhere but under the class name label
    assert (drawing == [0, 0, 255]).all(-1).mean() > 0.9


def test_demo_errors(image_file, backbone_config, tmp_path):
    config, _, _ = backbone_config
    out = str(tmp_path / 'x.png')
    not_an_image = tmp_path / 'notes.jpg'
    not_an_image.write_bytes(b'\x00' * 10)
    cases = [
        ([str(tmp_path / 'missing.png'), DETECTOR], 'Image not found'),
        ([str(not_an_image), DETECTOR], 'Cannot read image'),
        ([image_file, str(tmp_path / 'missing.py')], 'Config file not found'),
        ([image_file, DETECTOR, str(tmp_path / 'missing.pth')], 'Checkpoint not found'),
        ([image_file, config], 'backbone-only config'),
        ([image_file, DETECTOR, '--score-thr', '2'], r'--score-thr must be in \[0, 1\]'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            demo.main(argv + ['--out', out])
    assert_bad_out_refused(demo.main, [image_file, DETECTOR], tmp_path,
                           r'use one of \.bmp, \.jpeg, \.jpg, \.png')


def test_demo_shrinks_a_large_image_before_the_model_sees_it(tmp_path, capsys):
    large = tmp_path / 'large.png'
    picture = np.zeros((1300, 2600, 3), np.uint8)
    picture[200:900, 300:1500] = (40, 180, 220)
    cv2.imwrite(str(large), picture)
    out = tmp_path / 'demo.png'
    demo.main([str(large), DETECTOR, '--out', str(out)])
    assert cv2.imread(str(out)).shape == (1024, 2048, 3)  # drawn at the working size
    assert f'{large} shrunk by 0.788 to 2048x1024' in capsys.readouterr().out


def test_demo_and_visualize_refuse_a_huge_image_before_decoding_it(tmp_path, backbone_config):
    """Seen: a 20000x20000 PNG: 4.47 GiB ArrayMemoryError. This one only declares that size."""
    from test_image import png_header_only
    huge = png_header_only(tmp_path / 'huge.png', 20000, 20000)
    message = (f'^{re.escape(huge)} is 20000x20000 pixels, over the limit of 100 million pixels '
               'that the tools decode')
    with pytest.raises(SystemExit, match=message):
        demo.main([huge, DETECTOR, '--out', str(tmp_path / 'demo.png')])
    with pytest.raises(SystemExit, match=message):
        visualize.main([huge, '--config', backbone_config[0], '--out', str(tmp_path / 'v.png')])


def test_visualize_queries_stay_in_the_pixels_of_the_file(image_file, backbone_config, tmp_path,
                                                          monkeypatch):
    """The 205x150 image shrunk to 100 pixels a side: --query is still given in the file's pixels."""
    config, checkpoint, _ = backbone_config
    monkeypatch.setattr(visualize, 'read_image', functools.partial(read_image, max_side=100))
    calls = spy_on_drawing(monkeypatch)
    out = str(tmp_path / 'v.png')
    visualize.main([image_file, '--config', config, '--checkpoint', checkpoint, '--query', '200',
                    '149', '--out', out])
    (image, record, (stride, *_)), = calls
    assert image.shape == (73, 100, 3) and record.map_size == (5, 7)  # stage 3 of a 73x100 input
    assert record.query_indices == [4 * 7 + 6]  # (200, 149) * 100/205: the last map pixel
    with pytest.raises(SystemExit, match=r'outside the 205x150 image'):
        visualize.main([image_file, '--config', config, '--query', '205', '10', '--out', out])
