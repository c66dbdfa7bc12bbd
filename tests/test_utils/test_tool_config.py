"""mmdat.utils.tool_config: reading a config for the tools; every problem is a ConfigError."""
import pytest
from mmengine.config import Config

from mmdat import registry
from mmdat.utils import (ConfigError, check_checkpoint_files, check_dataset_files, read_config,
                         register_scope)
from mmdat.utils import tool_config


def test_read_config(tmp_path):
    (tmp_path / 'base.py').write_text('a = 1\nb = dict(c=2)\n')
    (tmp_path / 'child.py').write_text("_base_ = './base.py'\nb = dict(d=3)\n")
    cfg = read_config(str(tmp_path / 'child.py'), {'b.c': 5})
    assert (cfg.a, cfg.b.c, cfg.b.d) == (1, 5, 3)


@pytest.mark.parametrize('text, expected', [
    ('a = dict(\n', r"^Cannot read config .*bad.py: SyntaxError: '\(' was never closed"),
    ("_base_ = './absent.py'\n", r'^Cannot read config .*bad.py: .*absent.py'),
    ('a = undefined_name\n', r"^Cannot read config .*bad.py: NameError: .*'undefined_name'"),
])
def test_a_config_that_cannot_be_read(tmp_path, text, expected):
    (tmp_path / 'bad.py').write_text(text)
    with pytest.raises(ConfigError, match=expected) as raised:
        read_config(str(tmp_path / 'bad.py'))
    assert '\n' not in str(raised.value)


def test_missing_config_and_options_that_do_not_fit(tmp_path):
    with pytest.raises(ConfigError, match=f'^Config file not found: {tmp_path / "none.py"}$'):
        read_config(str(tmp_path / 'none.py'))
    (tmp_path / 'list.py').write_text('a = [1, 2]\n')
    with pytest.raises(ConfigError, match=r'^--cfg-options do not fit .*list.py: '):
        read_config(str(tmp_path / 'list.py'), {'a.5': 1})


def test_one_list_of_scopes():
    assert tool_config.SCOPES is registry.SCOPES
    with pytest.raises(ConfigError, match=r"default_scope must be one of \('mmdet', 'mmseg'\)"):
        register_scope(Config(dict(default_scope='mmpretrain')))


def test_missing_files_are_config_errors(tmp_path):
    cfg = Config(dict(default_scope='mmdet', load_from=str(tmp_path / 'none.pth'),
                      model=dict(backbone=dict())))
    with pytest.raises(ConfigError, match=r'^Checkpoint file not found: .*none.pth \(load_from\)$'):
        check_checkpoint_files(cfg)
    cfg = Config(dict(default_scope='mmdet', train_dataloader=dict(
        dataset=dict(data_root=str(tmp_path), ann_file='a.json'))))
    with pytest.raises(ConfigError, match='^Dataset files not found:\n  .*a.json\nDownload COCO'):
        check_dataset_files(cfg, ['train_dataloader'])
