import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))
#: What OpenMMLab's tools (``mim search``, ``mim train`` ...) look for in ``mmdat/.mim/``: the
#: configs, the training/testing tools and the model index with its metafiles (under configs/).
MIM_FILES = ('configs', 'tools', 'model-index.yml')


def read(*parts):
    with open(osp.join(HERE, *parts), encoding='utf-8') as f:
        return f.read()


def get_version():
    # Parse mmdat/version.py instead of importing mmdat: importing it needs torch.
    namespace = {}
    exec(compile(read('mmdat', 'version.py'), 'mmdat/version.py', 'exec'), namespace)
    return namespace['__version__']


def parse_requirements(fname):
    """Requirement lines of a requirements file, following ``-r`` includes."""
    reqs = []
    for line in read(fname).splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        if line.startswith('-r '):
            reqs += parse_requirements(osp.join(osp.dirname(fname), line[3:].strip()))
        else:
            reqs.append(line)
    return reqs


class BuildPyWithMim(build_py):
    """``build_py`` that also puts :data:`MIM_FILES` into ``mmdat/.mim``.

    Wheels (``pip install .``, ``pip wheel .``, ``python -m build``) get copies in the build
    folder, so the source tree stays clean. Editable installs (``pip install -e .``) get relative
    symlinks in the source tree (``mmdat/.mim`` is git-ignored), so edits to configs show at once.
    """

    def run(self):
        super().run()
        editable = getattr(self, 'editable_mode', False)  # set by setuptools >= 64
        mim_dir = osp.join(HERE if editable else self.build_lib, 'mmdat', '.mim')
        os.makedirs(mim_dir, exist_ok=True)
        for name in MIM_FILES:
            src, dst = osp.join(HERE, name), osp.join(mim_dir, name)
            if osp.islink(dst) or osp.isfile(dst):
                os.remove(dst)
            elif osp.isdir(dst):
                shutil.rmtree(dst)
            if editable:
                os.symlink(osp.relpath(src, mim_dir), dst)
            elif osp.isdir(src):
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
            else:
                shutil.copyfile(src, dst)


setup(
    name='mmdat',
    version=get_version(),
    description='DAT (Vision Transformer with Deformable Attention) backbone '
    'for OpenMMLab mmdet 3.x and mmseg 1.x',
    long_description=read('README.md'),
    long_description_content_type='text/markdown',
    author='mmdat contributors',
    # mmdat has no public home of its own yet: the url is the official DAT code it ports.
    url='https://github.com/LeapLabTHU/DAT',
    project_urls={
        'DAT paper': 'https://arxiv.org/abs/2201.00520',
        'DAT++ paper': 'https://arxiv.org/abs/2309.01430',
    },
    license='Apache License 2.0',
    keywords='computer vision, vision transformer, deformable attention, object detection, '
    'semantic segmentation, openmmlab',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    # the C++ source of the CPU deformable attention kernel, compiled on first use
    package_data={'mmdat': ['models/layers/csrc/*.cpp', 'models/layers/csrc/*.h']},
    python_requires='>=3.8',
    install_requires=parse_requirements('requirements/runtime.txt'),
    extras_require={
        'all': parse_requirements('requirements.txt'),
        'mim': parse_requirements('requirements/mminstall.txt'),
        'tests': parse_requirements('requirements/tests.txt'),
    },
    classifiers=[
        'Development Status :: 4 - Beta',
        'License :: OSI Approved :: Apache Software License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Topic :: Scientific/Engineering :: Image Recognition',
    ],
    cmdclass={'build_py': BuildPyWithMim},
    zip_safe=False,
)
