"""``dtkd-test -opt options/test/<file>.yml``: BasicSR's test runner with the DTKD classes.

Also ``python dtkd/test.py -opt ...`` (as ``python basicsr/test.py`` in BasicSR) and
``python -m dtkd.test -opt ...``; same flags as ``basicsr/test.py``.
"""
if not __package__:  # run as a script, python dtkd/test.py: import from the repository, not from dtkd/
    import os
    import sys

    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (_here, _root)]
    sys.path.insert(0, _root)

import dtkd_compat  # noqa: E402, F401  (before anything from basicsr: the torchvision shim)
from dtkd.launch import run  # noqa: E402


def main():
    from basicsr import test

    run(test, 'test_pipeline', is_train=False)


if __name__ == '__main__':
    main()
