import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


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


setup(
    name='mmdat',
    version=get_version(),
    description='DAT (Vision Transformer with Deformable Attention) backbone '
    'for OpenMMLab mmdet 3.x and mmseg 1.x',
    long_description=read('README.md'),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools')),
    python_requires='>=3.8',
    install_requires=parse_requirements('requirements/runtime.txt'),
    extras_require={
        'all': parse_requirements('requirements.txt'),
        'mim': parse_requirements('requirements/mminstall.txt'),
        'tests': parse_requirements('requirements/tests.txt'),
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    zip_safe=False,
)
