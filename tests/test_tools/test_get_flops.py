"""tools/analysis_tools/get_flops.py on two-stage detectors (Mask R-CNN, Cascade Mask R-CNN)."""

import pytest
import torch

from tests.conftest import REPO_ROOT, load_tool

SHAPE = (64, 96)
TINY_ARCH = 'dict(embed_dims=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), offset_groups=(0, 0, 2, 4))'


get_flops = load_tool('analysis_tools/get_flops.py')


def tiny_config(tmp_path, base):
    """``configs/<base>`` with a small DAT (the demo's arch), so a count takes seconds."""
    path = tmp_path / f'tiny_{base}'
    path.write_text(f"_base_ = '{REPO_ROOT / 'configs' / base}'\n"
                    f"model = dict(backbone=dict(arch=dict(_delete_=True, **{TINY_ARCH})),\n"
                    f"             neck=dict(in_channels=[32, 64, 128, 256]))\n")
    return str(path)


def count(model, proposals):
    """A count with the RPN keeping at most ``proposals`` (the same weights and image each time)."""
    model.model.rpn_head.test_cfg['max_per_img'] = proposals
    torch.manual_seed(0)
    return get_flops.count(model, SHAPE)


@pytest.fixture(scope='module')
def mask_rcnn_counts(tmp_path_factory):
    model = get_flops.build_model(tiny_config(tmp_path_factory.mktemp('cfg'), 'mask_rcnn_dat_t_coco.py'), SHAPE)
    return {n: count(model, n) for n in (4, 8, 16)}


@pytest.mark.slow
def test_mask_rcnn_roi_heads_are_counted_per_proposal(mask_rcnn_counts):
    for n, result in mask_rcnn_counts.items():
        assert result['proposals'] == n  # an untrained RPN keeps as many as allowed
    # The RoI heads run on every proposal (the mask head on the first 100): the count grows
    # linearly, by the same amount per proposal.
    step = mask_rcnn_counts[8]['flops'] - mask_rcnn_counts[4]['flops']
    assert step > 0
    assert mask_rcnn_counts[16]['flops'] - mask_rcnn_counts[8]['flops'] == 2 * step


@pytest.mark.slow
def test_cascade_mask_rcnn(tmp_path, mask_rcnn_counts, capsys):
    cascade = get_flops.main([tiny_config(tmp_path, 'cascade_mask_rcnn_dat_t_3x_coco.py'), '--shape',
                              *map(str, SHAPE), '--cfg-options', 'model.test_cfg.rpn.max_per_img=8'])
    assert cascade['proposals'] == 8
    assert 'RoI heads counted on 8 proposals' in capsys.readouterr().out
    # Three box heads (4 convs + 1 fc each) and three mask heads against one of each.
    assert cascade['flops'] > 2 * mask_rcnn_counts[8]['flops']
    assert cascade['params'] > mask_rcnn_counts[8]['params']


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit, match='--cfg-options applies to a config'):
        get_flops.main(['tiny', '--cfg-options', 'model.backbone.arch=small'])
    with pytest.raises(SystemExit, match='target must be one of'):
        get_flops.main(['configs/no_such_config.py'])


@pytest.mark.slow
def test_peer_models(capsys):
    swin = get_flops.main(['Swin-T'])
    assert 'Model: Swin-T' in capsys.readouterr().out
    # Swin-T's published count at 224x224 is 4.5 G (28 M parameters with its classifier)
    assert 4.45e9 < swin['flops'] < 4.55e9
    assert set(swin['by_op']) >= {'linear', 'matmul'}  # the window attention's products
    # a DAT of the peer table is the arch of that name
    assert get_flops.main(['DAT-T'])['flops'] == get_flops.main(['tiny'])['flops']
    with pytest.raises(SystemExit, match='--cfg-options applies to a config'):
        get_flops.main(['Swin-T', '--cfg-options', 'model.backbone.depths=[2,2,2,2]'])
