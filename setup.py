import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# Installed into site-packages: at start-up it makes BasicSR's own runner find the DTKD classes
# (dtkd/basicsr_plugin.py; DTKD_BASICSR_PLUGIN=0 turns it off).
PTH_NAME = 'dtkd_basicsr.pth'
PTH_SOURCE = os.path.join('dtkd', PTH_NAME)


class BuildPyWithPth(build_py):
    """Wheels (``pip install .``): the .pth goes to the wheel's root, which pip installs into site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH_NAME), preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


class EditableWheelWithPth(editable_wheel):
    """``pip install -e .``: an editable wheel holds links to the sources, not build_py's output; the .pth is
    added to the root of the unpacked wheel (installed into site-packages), next to setuptools' own .pth.

    (``data_files`` are not an option: setuptools' editable_wheel skips them.)"""

    def _run_build_commands(self, dist_name, unpacked_wheel, *args, **kwargs):
        result = super()._run_build_commands(dist_name, unpacked_wheel, *args, **kwargs)
        self.copy_file(PTH_SOURCE, os.path.join(str(unpacked_wheel), PTH_NAME), preserve_mode=False)
        return result


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
    cmdclass={'build_py': BuildPyWithPth, 'editable_wheel': EditableWheelWithPth},
)
