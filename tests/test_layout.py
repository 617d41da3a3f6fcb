"""The package layers of docs/layout.md: a package imports only lower layers (or itself), at any depth
of its code (imports inside functions count too), and the library packages import no entry point."""
import ast
import os

import pytest

from conftest import REPO

# package -> layer; a package may import packages of a strictly lower layer, and itself.
LAYERS = {
    'dtkd_compat': 0,
    'dtkd_utils': 1,
    'dtkd_arch': 2, 'dtkd_loss': 2, 'dtkd_data': 2,
    'dtkd_metric': 3, 'dtkd_teacher': 3,
    'dtkd_model': 4,
    'dtkd': 5,
}


def imported_packages(path):
    """(line, top-level package) of every project import in a file, including those inside functions."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split('.')[0]) for name in names if name.split('.')[0] in LAYERS]
    return found


def package_files(package):
    if package == 'dtkd_compat':
        return [os.path.join(REPO, 'dtkd_compat.py')]
    folder = os.path.join(REPO, package)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.py'))


@pytest.mark.parametrize('package', sorted(LAYERS))
def test_package_imports_only_lower_layers(package):
    bad = []
    for path in package_files(package):
        for line, other in imported_packages(path):
            if other != package and LAYERS[other] >= LAYERS[package]:
                bad.append(f'{os.path.relpath(path, REPO)}:{line} imports {other} (layer {LAYERS[other]})')
    assert not bad, f'{package} (layer {LAYERS[package]}) imports a peer or higher layer:\n' + '\n'.join(bad)


def test_every_package_is_placed_in_a_layer():
    packages = {d for d in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, d, '__init__.py'))}
    assert packages - {'tests'} <= set(LAYERS), sorted(packages - set(LAYERS))


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / 'probe.py'
    path.write_text('def f():\n    from dtkd_model.options import validate_options\n    import dtkd.launch\n')
    assert imported_packages(str(path)) == [(2, 'dtkd_model'), (3, 'dtkd')]
