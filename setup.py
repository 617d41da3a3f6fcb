from setuptools import find_packages, setup

setup(
    name='dtkd',
    version='0.1.0',
    description='DTKD: diffusion-to-transformer knowledge distillation for super-resolution, a BasicSR plugin',
    python_requires='>=3.9',
    packages=find_packages(include=['dtkd_arch', 'dtkd_loss', 'dtkd_data', 'dtkd_metric', 'dtkd_model']),
    py_modules=['dtkd_compat'],
    package_data={'dtkd_arch': ['csrc/*.cpp', 'csrc/*.h']},
    install_requires=['basicsr==1.4.2', 'torch', 'torchvision', 'pytorch-wavelets', 'PyWavelets', 'lmdb', 'pyyaml'],
    entry_points={
        'console_scripts': [
            'dtkd-train=dtkd_model.train:main',
            'dtkd-test=dtkd_model.test:main',
            'dtkd-infer=dtkd_model.infer:main',
        ],
    },
)
