"""mmdat/models/layers imports downwards only: the math, the kernels, the policy, the modules.

Every import statement of every module is read (those inside functions too); a module may
import only modules of lower levels of :data:`LEVELS`, and nothing else of mmdat.
"""
import ast
import shutil
from pathlib import Path
from typing import Dict, List, Set

import mmdat.models.layers as layers_package

PACKAGE = 'mmdat.models.layers'
FOLDER = Path(layers_package.__file__).parent
#: Each module's level: the tracing helpers and the C++ kernels' build code, the attention
#: math, one module per kernel family, the policy (the table of implementations), the modules,
#: modules built on modules, the package's exports. A new module needs a level here.
LEVELS = {
    'tracing': 0, 'cpu_build': 0,
    'attention_math': 1,
    'cpu_deformable': 2, 'cpu_neighborhood': 2, 'cpu_dwconv_gelu': 2, 'triton_deformable': 2, 'natten_kernel': 2,
    'neighborhood_tiles': 2,
    'policy': 3,
    'window_attention': 4, 'neighborhood_attention': 4, 'deformable_attention': 4, 'mlp': 4,
    'deformable_attention_pp': 5,
    '__init__': 6,
}


def imported_modules(source: str, module: str) -> Set[str]:
    """The mmdat modules ``module`` (a module of the package, by its short name) imports, as
    short names for those of the package and full names for the rest of mmdat."""
    found = set()
    package_parts = PACKAGE.split('.')
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the package
                base = package_parts[:len(package_parts) - node.level + 1]
                base = '.'.join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # `from . import x` imports the module x; `from .x import y`, the module x
            names = [f'{base}.{alias.name}' for alias in node.names] if not node.module else [base]
        else:
            continue
        for name in names:
            if name == PACKAGE or not name.startswith('mmdat'):
                continue
            if name.startswith(PACKAGE + '.'):
                name = name[len(PACKAGE) + 1:].split('.')[0]
            found.add(name)
    found.discard(module)
    return found


def import_graph(folder: Path) -> Dict[str, Set[str]]:
    """Module -> the mmdat modules it imports, for every module of a copy of the package."""
    return {path.stem: imported_modules(path.read_text(), path.stem) for path in sorted(folder.glob('*.py'))}


def layering_errors(graph: Dict[str, Set[str]], levels: Dict[str, int]) -> List[str]:
    """What breaks the layering: modules without a level, imports of mmdat outside the package,
    imports of a module of the same or a higher level, and import cycles."""
    errors = [f'{module} has no level' for module in graph if module not in levels]
    for module, imports in graph.items():
        for name in sorted(imports):
            if name not in levels:
                errors.append(f'{module} imports {name}, outside the layers')
            elif module in levels and levels[name] >= levels[module]:
                errors.append(f'{module} (level {levels[module]}) imports {name} (level {levels[name]}): '
                              'upward or sideways')
    # cycles, whatever the levels say
    state = {}

    def visit(module, path):
        state[module] = 'open'
        for name in sorted(graph.get(module, ())):
            if state.get(name) == 'open':
                errors.append('import cycle: ' + ' -> '.join(path[path.index(name):] + [name]))
            elif name not in state:
                visit(name, path + [name])
        state[module] = 'done'

    for module in graph:
        if module not in state:
            visit(module, [module])
    return errors


def test_layers_import_downwards():
    graph = import_graph(FOLDER)
    assert layering_errors(graph, LEVELS) == []
    assert set(graph) == set(LEVELS)  # no level for a module that is gone
    # the kernels import only the math and the build code of the C++ kernels
    for kernel in ('cpu_deformable', 'cpu_neighborhood', 'cpu_dwconv_gelu', 'triton_deformable', 'natten_kernel',
                   'neighborhood_tiles'):
        assert graph[kernel] <= {'tracing', 'attention_math', 'cpu_build'}, kernel
    assert 'policy' not in graph['attention_math']


def test_a_planted_upward_import_inside_a_function_fails(tmp_path):
    """The math calling the policy, as biased_attention once did, hidden inside a function."""
    copy = tmp_path / 'layers'
    shutil.copytree(FOLDER, copy, ignore=shutil.ignore_patterns('csrc', '__pycache__'))
    math_module = copy / 'attention_math.py'
    math_module.write_text(math_module.read_text() + (
        '\n\ndef planted():\n    from .policy import resolve_attn_impl\n    return resolve_attn_impl\n'))
    errors = layering_errors(import_graph(copy), LEVELS)
    assert errors[0] == 'attention_math (level 1) imports policy (level 3): upward or sideways'
    assert 'import cycle: attention_math -> policy -> attention_math' in errors
    assert all('attention_math -> policy' in error for error in errors[1:])  # the cycles it makes


def test_cycles_and_strangers_fail():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'mmdat.models.backbones'}}
    errors = layering_errors(graph, dict(a=2, b=1, c=0))
    assert 'c (level 0) imports a (level 2): upward or sideways' in errors
    assert 'c imports mmdat.models.backbones, outside the layers' in errors
    assert 'import cycle: a -> b -> c -> a' in errors
    assert layering_errors({'new': set()}, {}) == ['new has no level']


def test_imports_are_read_in_every_form():
    source = '\n'.join(['import torch', 'from . import policy', 'from .tracing import is_tracing',
                        'import mmdat.models.layers.natten_kernel', 'from mmdat.registry import MODELS',
                        'def f():', '    from ..utils import recording'])
    assert imported_modules(source, 'x') == {'policy', 'tracing', 'natten_kernel', 'mmdat.registry',
                                             'mmdat.models.utils'}
