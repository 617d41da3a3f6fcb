from setuptools import find_packages, setup

setup(
    name='dtkd',
    version='0.1.0',
    description='DTKD: diffusion-to-transformer knowledge distillation for super-resolution, a BasicSR plugin',
    python_requires='>=3.9',
    packages=find_packages(include=['dtkd', 'dtkd_utils', 'dtkd_arch', 'dtkd_loss', 'dtkd_data', 'dtkd_metric',
                                    'dtkd_teacher', 'dtkd_model']),
    py_modules=['dtkd_compat'],
    install_requires=['basicsr==1.4.2', 'torch', 'torchvision', 'pytorch-wavelets', 'PyWavelets', 'lmdb', 'pyyaml'],
    entry_points={
        'console_scripts': [
            'dtkd-train=dtkd.train:main',
            'dtkd-test=dtkd.test:main',
            'dtkd-infer=dtkd.infer:main',
        ],
    },
)
