"""Every tool that reads a checkpoint: hostile files run no code, broken files and weights that do
not fit stop the tool with one line naming the file."""
import sys
from pathlib import Path

import pytest
import torch

from mmdat.datasets import make_synthetic_dataset
from mmdat.models import DAT
from tests.conftest import REPO_ROOT, TEST_CONFIGS, load_module, load_tool, run_script

DETECTOR = str(TEST_CONFIGS / 'retinanet_dat_shapes_tiny.py')
BACKBONE_ARCH = dict(embed_dims=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2))
HOSTILE = ['raw_pickle', 'legacy', 'zip']
BROKEN = ['empty', 'text', 'truncated_zip', 'truncated_legacy']


TOOLS = {name: load_tool(path) for name, path in [
    ('train', 'train.py'), ('test', 'test.py'), ('demo', 'demo.py'),
    ('visualize', 'visualize_deformable.py'), ('dat2mmdat', 'model_converters/dat2mmdat.py'),
    ('dat_det_seg2mmdat', 'model_converters/dat_det_seg2mmdat.py'),
    ('pytorch2onnx', 'deployment/pytorch2onnx.py')]}
SEGMENTER = str(TEST_CONFIGS / 'upernet_dat_shapes_tiny.py')


# the hostile-file writers of the checkpoint reader's tests
hf = load_module(REPO_ROOT / 'tests' / 'test_models' / 'test_utils' / 'hostile_files.py')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_synthetic_dataset(str(root), {'train': 4, 'val': 2}, seed=0)
    return root


@pytest.fixture
def shapes_env(shapes, monkeypatch):
    monkeypatch.setenv('SHAPES_ROOT', f'{shapes}/')
    return shapes


@pytest.fixture(scope='module')
def backbone_config(tmp_path_factory):
    root = tmp_path_factory.mktemp('backbone')
    config = root / 'dat_backbone.py'
    config.write_text(f'model = dict(type="DAT", arch={BACKBONE_ARCH!r}, drop_path_rate=0.0)\n')
    return str(config)


def run(tool, argv, monkeypatch=None):
    """Run a tool's main in this process; returns the SystemExit message."""
    if tool in ('dat2mmdat', 'dat_det_seg2mmdat'):  # they read sys.argv
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, 'argv', [tool] + argv)
            with pytest.raises(SystemExit) as stop:
                TOOLS[tool].main()
    else:
        with pytest.raises(SystemExit) as stop:
            TOOLS[tool].main(argv)
    return str(stop.value.code)


def tool_calls(image, backbone_config, checkpoint, tmp_path):
    """How each tool is given ``checkpoint``."""
    out = str(tmp_path / 'out.png')
    return {
        'dat2mmdat': [checkpoint, str(tmp_path / 'dst.pth')],
        'dat_det_seg2mmdat': [checkpoint, str(tmp_path / 'dst.pth')],
        'test': [DETECTOR, checkpoint, '--work-dir', str(tmp_path / 'test')],
        'train': [DETECTOR, '--resume', checkpoint, '--work-dir', str(tmp_path / 'train')],
        'demo': [image, DETECTOR, checkpoint, '--out', out],
        'visualize': [image, '--config', backbone_config, '--checkpoint', checkpoint, '--out', out],
    }


@pytest.fixture(scope='module')
def image(shapes):
    return str(shapes / 'val' / 'images' / '00000.png')


@pytest.mark.parametrize('kind', HOSTILE)
def test_hostile_checkpoints_run_no_code_in_any_tool(kind, hostile_checkpoints, image, backbone_config,
                                                    shapes_env, tmp_path):
    hostile, _, marker = hostile_checkpoints
    for tool, argv in tool_calls(image, backbone_config, str(hostile[kind]), tmp_path).items():
        message = run(tool, argv)
        assert message.count('\n') == 0 and str(hostile[kind]) in message, (tool, message)
        assert 'refused to load posix.system' in message, (tool, message)
        assert not marker.exists(), tool


#: Tools that only read the file (the others build a runner or inferencer first).
LIGHT_TOOLS = ('dat2mmdat', 'dat_det_seg2mmdat', 'visualize')


@pytest.mark.slow
@pytest.mark.parametrize('kind', BROKEN)
def test_broken_checkpoints_give_one_line_in_every_tool(kind, hostile_checkpoints, image,
                                                       backbone_config, shapes_env, tmp_path):
    """Every kind of broken file through the tools that only read it; one kind through all."""
    path = str(hostile_checkpoints[1][kind])
    for tool, argv in tool_calls(image, backbone_config, path, tmp_path).items():
        if tool in LIGHT_TOOLS or kind == 'truncated_zip':
            message = run(tool, argv)
            assert message.count('\n') == 0 and f'{path} is not a readable checkpoint' in message, \
                (tool, message)


def cli(*args):
    return run_script(*args, cwd=REPO_ROOT)


@pytest.mark.slow
def test_command_lines_print_one_line_and_fail(hostile_checkpoints, tmp_path):
    """The tools stop with ``SystemExit(message)`` (tested above in-process): as commands, that
    is the message alone on stderr and exit code 1."""
    hostile, broken, marker = hostile_checkpoints
    results = [
        cli('tools/model_converters/dat2mmdat.py', hostile['legacy'], tmp_path / 'a.pth'),
        cli('tools/model_converters/dat_det_seg2mmdat.py', broken['truncated_zip'], tmp_path / 'b.pth'),
    ]
    for result in results:
        assert result.returncode == 1, result.stderr[-2000:]
        assert 'Traceback' not in result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(
            ('--trust-checkpoint)', 'a truncated or damaged zip archive'))
    assert not marker.exists()


def test_a_trusted_file_is_read_in_full(tmp_path, hostile_checkpoints):
    """--trust-checkpoint is the one way past the restricted reader (here a harmless class)."""
    path = tmp_path / 'with_object.pth'
    torch.save({'model': {'patch_proj.0.weight': torch.zeros(1)}, 'args': Path('x')}, path)
    assert 'refused to load pathlib' in run('dat2mmdat', [str(path), str(tmp_path / 'dst.pth')])
    assert not (tmp_path / 'dst.pth').exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, 'argv', ['dat2mmdat', str(path), str(tmp_path / 'dst.pth'), '--trust-checkpoint'])
        TOOLS['dat2mmdat'].main()
    assert torch.load(tmp_path / 'dst.pth')['state_dict'].keys() == {'patch_embed.conv.weight'}


def test_weights_of_another_model_are_refused(image, backbone_config, shapes_env, tmp_path):
    other = DAT(dict(BACKBONE_ARCH, embed_dims=16))
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in other.state_dict().items()}},
               tmp_path / 'other.pth')
    path = str(tmp_path / 'other.pth')
    calls = tool_calls(image, backbone_config, path, tmp_path)
    for tool in ('test', 'demo'):
        message = run(tool, calls[tool])
        assert f'{path} leaves 100% of the model\'s parameters at random init' in message
        assert '--allow-partial-weights' in message and '\n' not in message
    # the backbone alone: every weight has another shape
    with pytest.raises(ValueError, match='cannot be fitted'):
        TOOLS['visualize'].main(calls['visualize'])


def test_allow_partial_weights(image, backbone_config, tmp_path):
    """A backbone checkpoint without stage 3's second block (over 10% of the parameters)."""
    model = DAT(BACKBONE_ARCH, drop_path_rate=0.0)
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith('stages.2.blocks.1.')},
               tmp_path / 'partial.pth')
    argv = tool_calls(image, backbone_config, str(tmp_path / 'partial.pth'), tmp_path)['visualize']
    assert 'leaves' in run('visualize', argv + ['--stage', '3'])
    TOOLS['visualize'].main(argv + ['--stage', '3', '--allow-partial-weights'])
    assert (tmp_path / 'out.png').stat().st_size > 0


def every_route(image, backbone_config, source, tmp_path):
    """Each tool and each way a tool reads ``source``: both converters, test, train's --resume and
    load_from, the mmdet and mmseg inferencers (demo), visualize, pytorch2onnx."""
    calls = tool_calls(image, backbone_config, source, tmp_path)
    calls['train load_from'] = [DETECTOR, '--cfg-options', f'load_from={source}', '--work-dir',
                                str(tmp_path / 'train_load_from')]
    calls['demo mmseg'] = [image, SEGMENTER, source, '--out', str(tmp_path / 'seg.png')]
    calls['pytorch2onnx'] = [DETECTOR, str(tmp_path / 'out.onnx'), '--checkpoint', source]
    return calls


@pytest.mark.parametrize('kind, where', [
    ('zip', 'address'), pytest.param('negating', 'hub_cache', marks=pytest.mark.slow),
    pytest.param('negating', 'path', marks=pytest.mark.slow)])
def test_hostile_addresses_in_every_tool(kind, where, hostile_checkpoints, image, backbone_config,
                                         shapes_env, tmp_path, monkeypatch):
    """A file that runs code (served on the loopback interface) and one that would negate every
    later tensor (already in torch's hub cache, with no network, and as a path): every route
    refuses it with one line, nothing runs, and weights loaded afterwards are unchanged."""
    hostile, _, marker = hostile_checkpoints
    path = hostile['zip'] if kind == 'zip' else hf.negating_defaults(tmp_path)
    reason = 'refused to load posix.system' if kind == 'zip' else 'refused to set the state of'
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    with hf.LoopbackServer() as server:
        if where == 'path':
            source = str(path)
        elif where == 'address':
            server.files['/weights/hostile.pth'] = path.read_bytes()
            source = f'{server.url}/weights/hostile.pth'
        else:
            cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
            cache.mkdir(parents=True)
            cache.joinpath('hostile.pth').write_bytes(path.read_bytes())
            source = 'http://127.0.0.1:9/weights/hostile.pth'  # nothing listens on port 9
        for route, argv in every_route(image, backbone_config, source, tmp_path).items():
            message = run(route.split()[0], argv)
            assert message.count('\n') == 0 and source in message and reason in message, \
                (route, message)
            assert not marker.exists(), route
        assert server.requests in ([], ['/weights/hostile.pth'])  # downloaded once at most
    good = hf.good_weights(tmp_path)
    assert torch.equal(torch.load(good, weights_only=True)['state_dict']['w'],
                       torch.arange(1.0, 5.0))
