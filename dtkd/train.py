"""``dtkd-train -opt options/train_dtkd.yml``: BasicSR's training runner with the DTKD classes.

Same flags as ``basicsr/train.py``: ``--launcher {none,pytorch,slurm}``, ``--auto_resume``,
``--debug``, ``--local_rank``, ``--force_yml``. Multi-GPU / multi-node / multi-process CPU:
``torchrun --nproc_per_node=N -m dtkd.train -opt ... --launcher pytorch``.
"""
from dtkd.launch import run


def main():
    from basicsr import train

    run(train, 'train_pipeline', is_train=True)


if __name__ == '__main__':
    main()
