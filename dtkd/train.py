"""``dtkd-train -opt options/train_dtkd.yml``: BasicSR's training runner with the DTKD classes.

Also ``python dtkd/train.py -opt ...`` (as ``python basicsr/train.py`` in BasicSR) and
``python -m dtkd.train -opt ...``. Same flags as ``basicsr/train.py``: ``--launcher {none,pytorch,slurm}``,
``--auto_resume``, ``--debug``, ``--local_rank``, ``--force_yml``. Multi-GPU / multi-node / multi-process
CPU: ``torchrun --nproc_per_node=N -m dtkd.train -opt ... --launcher pytorch``.
"""
if not __package__:  # run as a script, python dtkd/train.py: import from the repository, not from dtkd/
    import os
    import sys

    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (_here, _root)]
    sys.path.insert(0, _root)

import dtkd_compat  # noqa: E402, F401  (before anything from basicsr: the torchvision shim)
from dtkd.launch import run  # noqa: E402


def main():
    from basicsr import train

    run(train, 'train_pipeline', is_train=True)


if __name__ == '__main__':
    main()
