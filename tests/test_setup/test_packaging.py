"""mmdat is packaged the OpenMMLab way: configs, tools and the model index in ``mmdat/.mim``."""
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_carries_configs_tools_and_model_index(built):
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ('mmdat/.mim/configs/retinanet_dat_t_coco.py', 'mmdat/.mim/configs/demo/retinanet_dat_demo_shapes.py',
                 'mmdat/.mim/configs/metafiles/retinanet.yml', 'mmdat/.mim/tools/train.py',
                 'mmdat/.mim/tools/test.py', 'mmdat/.mim/tools/dist_train.sh', 'mmdat/.mim/model-index.yml',
                 'mmdat/models/backbones/dat.py'):
        assert name in names, name
    configs = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / 'configs').rglob('*.py')
               if '__pycache__' not in p.parts}
    assert {'mmdat/.mim/' + c for c in configs} <= names  # every config, _base_ ones included
    # the C++ kernels' sources and their shared header: the kernels are built from them on first use
    kernel_sources = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / 'mmdat/models/layers/csrc').iterdir()}
    assert kernel_sources and {s for s in kernel_sources if s.endswith('.h')} and kernel_sources <= names
    assert not [n for n in names if '__pycache__' in n or n.endswith('.pyc')]
    metadata = zipfile.ZipFile(wheel).read(f'{wheel.name.split("-py3")[0]}.dist-info/METADATA').decode()
    assert 'License: Apache License 2.0' in metadata
    assert 'Requires-Python: >=3.8' in metadata


@pytest.mark.slow
def test_sdist_has_the_sources_of_mim_but_no_copies(built):
    sdist, _ = built
    names = {n.split('/', 1)[1] for n in tarfile.open(sdist).getnames() if '/' in n}
    assert {'LICENSE', 'model-index.yml', 'configs/retinanet_dat_t_coco.py', 'tools/train.py',
            'requirements/runtime.txt', 'mmdat/models/layers/csrc/vector_math.h',
            'mmdat/models/layers/csrc/dwconv_gelu_cpu.cpp'} <= names
    assert not [n for n in names if '.mim' in n]


@pytest.mark.slow
def test_editable_install_links_mim_into_the_source_tree(checkout_copy, tmp_path):
    """An editable install (``pip install -e .``, as tools/setup_env.sh runs it) makes relative
    symlinks, so edits to configs show at once. Runs the PEP 660 hook pip calls, without
    installing anything into this environment."""
    src = checkout_copy
    subprocess.run([sys.executable, '-c', f'import setuptools.build_meta as b; b.build_editable({str(tmp_path)!r})'],
                   cwd=src, check=True, capture_output=True)
    mim = src / 'mmdat' / '.mim'
    for name in ('configs', 'tools', 'model-index.yml'):
        assert (mim / name).is_symlink(), name
        assert os.readlink(mim / name) == os.path.join('..', '..', name)
    assert (mim / 'configs' / 'retinanet_dat_t_coco.py').is_file()


def test_gitignore_covers_mim():
    assert '/mmdat/.mim/' in (REPO_ROOT / '.gitignore').read_text().splitlines()


# --- model index ----------------------------------------------------------------------------

def load_models():
    index = yaml.safe_load((REPO_ROOT / 'model-index.yml').read_text())
    models = []
    for path in index['Import']:
        meta = yaml.safe_load((REPO_ROOT / path).read_text())
        collections = {c['Name'] for c in meta['Collections']}
        for model in meta['Models']:
            assert model['In Collection'] in collections, model['Name']
            models.append(model)
    return models


def readme_rows():
    """``{config: {column: cell}}`` from the results tables of docs/configs.md (header
    ``| config | ...``)."""
    rows, header = {}, None
    for line in (REPO_ROOT / 'docs' / 'configs.md').read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| config |'):
            header = cells
        elif header and re.match(r'\| `\w+_(coco|ade20k)\.py`', line):
            rows[cells[0].strip('`')] = dict(zip(header, cells))
        elif not line.startswith('|'):
            header = None
    return rows


def readme_results():
    """``{config: {metric: value}}``: the last column holds ``box [/ mask]`` AP (COCO) or
    ``single / multi-scale`` mIoU (ADE20K)."""
    results = {}
    for config, row in readme_rows().items():
        values = [float(v) for v in re.findall(r'\d+\.\d+', list(row.values())[-1])]
        names = ('mIoU', 'mIoU (multi-scale)') if 'ade20k' in config else ('box AP', 'mask AP')
        results[config] = dict(zip(names, values))
    return results


def test_model_index_lists_every_config_once():
    models = load_models()
    configs = sorted(p.name for p in (REPO_ROOT / 'configs').glob('*.py'))
    listed = sorted(Path(m['Config']).name for m in models)
    assert listed == configs
    for model in models:
        assert (REPO_ROOT / model['Config']).is_file()
        assert model['Name'] == Path(model['Config']).stem


def test_model_index_numbers_are_the_readme_numbers():
    """The metafiles repeat the tables of docs/configs.md (the paper's / the official numbers): both agree,
    and each model says where its numbers come from."""
    expected = readme_results()
    models = load_models()
    assert len(expected) == len(models)
    for model in models:
        metrics = {k: v for result in model['Results'] for k, v in result['Metrics'].items()}
        name = Path(model['Config']).name
        assert metrics == expected[name], name
        row = readme_rows()[name]
        assert model['Metadata']['Drop Path Rate'] == float(row['drop path'].split()[0]), name
        assert model['Metadata']['Batch Size'] == int(row['batch'].split()[0]), name
        source = model['Metadata']['Results From']
        assert ('official' if '_datpp_' in name else 'DAT paper') in source, name
        assert 'not reproduced' in source


def test_readme_summary_is_the_configs_page():
    """The README's short table (model x schedule rows, backbone columns) repeats docs/configs.md:
    every cell names a config that exists, with the same numbers, and every config is in it."""
    families = {'RetinaNet': 'retinanet', 'Mask R-CNN': 'mask_rcnn',
                'Cascade Mask R-CNN': 'cascade_mask_rcnn', 'UperNet': 'upernet',
                'Semantic FPN': 'fpn'}
    expected = readme_results()
    seen = set()
    header = None
    for line in (REPO_ROOT / 'README.md').read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('| model | schedule |'):
            header = cells
            continue
        if not line.startswith('|'):
            header = None
            continue
        if header is None or set(cells[0]) <= {'-'}:
            continue
        family, schedule = families[cells[0]], cells[1]
        for backbone, cell in zip(header[2:], cells[2:]):
            size = backbone[len('DAT-')].lower()
            version = 'datpp' if backbone.endswith('++') else 'dat'
            suffix = '_3x' if schedule == '3x' else ''
            dataset = 'ade20k' if family in ('upernet', 'fpn') else 'coco'
            config = f'{family}_{version}_{size}{suffix}_{dataset}.py'
            if cell == '-':
                assert config not in expected, config
                continue
            values = [float(v) for v in cell.split('/')]
            assert list(expected[config].values())[:len(values)] == values, config
            seen.add(config)
    assert seen == set(expected)


def test_backbone_weights_are_the_readme_links():
    readme = (REPO_ROOT / 'docs' / 'weights.md').read_text()
    links = dict(re.findall(r'^\| (DAT-[TSB](?:\+\+)?), 224 \| [\d.]+ \| \[TsinghuaCloud\]\((\S+)\) \|$', readme,
                            re.M))
    for model in load_models():
        backbone = model['Metadata']['Backbone']
        assert model['Metadata']['Backbone Weights'] == links[backbone]
        assert 'ImageNet-1k' in model['Metadata']['Backbone Weights Are']
        size = re.search(r'_dat(?:pp)?_([tsb])_', model['Name']).group(1)
        assert backbone == f'DAT-{size.upper()}' + ('++' if '_datpp_' in model['Name'] else '')
        assert 'Weights' not in model  # no detector/segmenter checkpoint is published for them
