"""Every source of a checkpoint goes through mmdat's one reader: addresses (served here on the
loopback interface), files in torch's hub cache, ``file://`` URLs and mmengine's named models;
schemes without a safe loader and failed downloads give one line."""
import shutil

import hostile_files as hf
import pytest
import torch
from mmengine.model import BaseModule
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner import load_checkpoint as mmengine_load_checkpoint

from mmdat.models import DAT
from mmdat.models.utils import CheckpointError, load_checkpoint_file, trust_checkpoint

ARCH = dict(embed_dims=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), offset_groups=(0, 0, 1, 2))


@pytest.fixture
def server():
    with hf.LoopbackServer() as running:
        yield running


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch's hub cache in a temporary TORCH_HOME."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    return tmp_path / 'torch_home' / 'hub' / 'checkpoints'


@pytest.fixture
def files(tmp_path, hostile_checkpoints):
    good = hf.good_weights(tmp_path)
    return {'good': good, 'hostile': hostile_checkpoints[0]['zip'],
            'negating': hf.negating_defaults(tmp_path), 'marker': hostile_checkpoints[2]}


def one_line_error(source, match):
    with pytest.raises(CheckpointError, match=match) as error:
        load_checkpoint_file(source)
    assert '\n' not in str(error.value) and source in str(error.value)
    return str(error.value)


def assert_good(checkpoint):
    assert torch.equal(checkpoint['state_dict']['w'], torch.arange(1.0, 5.0))


def test_an_address_is_downloaded_to_the_hub_cache_and_read_safely(server, hub_cache, files):
    server.files['/w/good.pth'] = files['good'].read_bytes()
    server.files['/w/hostile.pth'] = files['hostile'].read_bytes()
    assert_good(load_checkpoint_file(f'{server.url}/w/good.pth'))
    assert (hub_cache / 'good.pth').read_bytes() == files['good'].read_bytes()
    assert_good(load_checkpoint_file(f'{server.url}/w/good.pth?download=1'))  # same cache name
    assert server.requests == ['/w/good.pth']  # the cached file is read, not downloaded again
    message = one_line_error(f'{server.url}/w/hostile.pth', 'refused to load posix.system')
    assert f'(cached as {hub_cache / "hostile.pth"})' in message
    assert not files['marker'].exists()
    assert sorted(p.name for p in hub_cache.iterdir()) == ['good.pth', 'hostile.pth']


def test_a_file_in_the_hub_cache_is_read_the_same_way(hub_cache, files):
    """Named by any address, with no network (nothing listens on port 9)."""
    hub_cache.mkdir(parents=True)
    shutil.copy(files['hostile'], hub_cache / 'model.pth')
    shutil.copy(files['negating'], hub_cache / 'negating.pth')
    one_line_error('http://127.0.0.1:9/any/model.pth', 'refused to load posix.system')
    one_line_error('https://127.0.0.1:9/negating.pth', 'refused to set the state of the global')
    assert not files['marker'].exists()
    assert_good(load_checkpoint_file(str(files['good'])))


@pytest.mark.parametrize('path, reason', [
    ('/missing.pth', 'could not be downloaded: HTTP 404 Not Found'),
    ('/truncated/file.pth', 'could not be downloaded: the connection closed after 1\\d+ of'),
    ('/', 'names no file to download'),
])
def test_failed_downloads_give_one_line_and_cache_nothing(server, hub_cache, files, path, reason):
    server.files['/truncated/file.pth'] = files['good'].read_bytes()
    one_line_error(f'{server.url}{path}', reason)
    assert not hub_cache.exists() or list(hub_cache.iterdir()) == []


def test_an_unreachable_server_gives_one_line(hub_cache):
    import socket
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    one_line_error(f'http://127.0.0.1:{port}/x.pth', 'could not be downloaded: .*refused')


class Note:
    """A class only a trusted file may hold."""


def test_trusting_an_address_trusts_its_cached_file(server, hub_cache, tmp_path):
    torch.save({'w': torch.zeros(1), 'note': Note()}, tmp_path / 'own.pth')
    server.files['/a/own.pth'] = server.files['/b/own.pth'] = (tmp_path / 'own.pth').read_bytes()
    one_line_error(f'{server.url}/a/own.pth', f'refused to load {__name__}.Note.*--trust-checkpoint')
    trust_checkpoint(f'{server.url}/a/own.pth')
    assert isinstance(load_checkpoint_file(f'{server.url}/a/own.pth')['note'], Note)
    # another address with the same cache name is not trusted
    one_line_error(f'{server.url}/b/own.pth', 'refused to load')
    assert isinstance(load_checkpoint_file(f'{server.url}/b/own.pth', trusted=True)['note'], Note)


def test_file_urls_are_local_paths(files, hostile_checkpoints):
    assert_good(load_checkpoint_file(files['good']))  # a pathlib.Path
    assert_good(load_checkpoint_file(f'file://{files["good"]}'))
    assert_good(load_checkpoint_file(f'file://localhost{files["good"]}'))
    one_line_error(f'file://{files["hostile"]}', 'refused to load posix.system')
    one_line_error(f'file://elsewhere{files["good"]}', 'a file:// URL on another host')
    with pytest.raises(FileNotFoundError, match='Checkpoint file not found'):
        load_checkpoint_file(f'file://{files["good"]}.missing')
    assert not files['marker'].exists()


@pytest.mark.parametrize('source', ['s3://bucket/x.pth', 'petrel://bucket/x.pth',
                                    'open-mmlab:s3://bucket/x.pth', 'pavi://model', 'ftp://host/x.pth',
                                    'anything://x'])
def test_schemes_without_a_safe_loader_give_one_line(source):
    for load in (load_checkpoint_file, mmengine_checkpoint._load_checkpoint):
        with pytest.raises(CheckpointError, match='copy the file here and pass its path') as error:
            load(source)
        assert '\n' not in str(error.value)


def test_named_models_resolve_to_addresses(server, hub_cache, files, monkeypatch):
    server.files['/zoo/good.pth'] = files['good'].read_bytes()
    server.files['/zoo/hostile.pth'] = files['hostile'].read_bytes()
    table = {'good_net': f'{server.url}/zoo/good.pth', 'bad_net': f'{server.url}/zoo/hostile.pth'}
    monkeypatch.setattr(mmengine_checkpoint, 'get_external_models', lambda: table)
    assert_good(load_checkpoint_file('open-mmlab://good_net'))
    one_line_error('openmmlab://bad_net', 'refused to load posix.system')
    one_line_error('open-mmlab://no_such_net', "no model of that name in mmengine's open-mmlab table")
    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models', lambda: table)
    assert_good(load_checkpoint_file('torchvision://good_net'))
    one_line_error('modelzoo://bad_net', 'refused to load posix.system')
    # mmcls:// keeps the backbone's weights, as mmengine does
    torch.save({'state_dict': {'backbone.w': torch.ones(2), 'head.fc': torch.ones(1)}},
               files['good'].parent / 'classifier.pth')
    server.files['/zoo/classifier.pth'] = (files['good'].parent / 'classifier.pth').read_bytes()
    monkeypatch.setattr(mmengine_checkpoint, 'get_mmcls_models',
                        lambda: {'net': f'{server.url}/zoo/classifier.pth'})
    assert load_checkpoint_file('mmcls://net')['state_dict'].keys() == {'w'}
    assert not files['marker'].exists()


@pytest.mark.parametrize('source', [
    'weights.pth', '/abs/weights.pth', 'file:///w.pth', 'http://h/w.pth', 'https://h/w.pth',
    's3://b/w.pth', 'open-mmlab:s3://b/w.pth', 'petrel://b/w.pth', 'pavi://m', 'torchvision://m',
    'modelzoo://m', 'open-mmlab://m', 'openmmlab://m', 'mmcls://m'])
def test_mmengine_reads_every_source_with_mmdat(source):
    loader = mmengine_checkpoint.CheckpointLoader._get_checkpoint_loader(source)
    assert loader.__module__ == 'mmdat.models.utils.checkpoint', loader


@pytest.mark.parametrize('where', ['address', 'hub_cache'])
def test_hostile_address_through_mmengine_and_init_cfgs(server, hub_cache, files, where):
    """mmengine's load_checkpoint (runner load_from/resume, pytorch2onnx, inferencers), the
    Pretrained init_cfg of DAT and of any mmengine module."""
    if where == 'address':
        server.files['/h/hostile.pth'] = files['hostile'].read_bytes()
        source = f'{server.url}/h/hostile.pth'
    else:
        hub_cache.mkdir(parents=True)
        shutil.copy(files['hostile'], hub_cache / 'hostile.pth')
        source = 'http://127.0.0.1:9/hostile.pth'
    model = torch.nn.Linear(1, 1)
    with pytest.raises(CheckpointError, match='refused to load posix.system'):
        mmengine_load_checkpoint(model, source)
    with pytest.raises(CheckpointError, match='refused to load posix.system'):
        DAT(ARCH, init_cfg=dict(type='Pretrained', checkpoint=source)).init_weights()

    class Module(BaseModule):

        def __init__(self):
            super().__init__(init_cfg=dict(type='Pretrained', checkpoint=source))
            self.linear = torch.nn.Linear(1, 1)

    with pytest.raises(CheckpointError, match='refused to load posix.system'):
        Module().init_weights()
    assert not files['marker'].exists()
