"""Build hook: ship ``hf_zero_autostart.pth`` at the root of the wheel (site-packages), beside
the package. Everything else is configured in pyproject.toml. An editable install
(``pip install -e .``) does not carry the file; ``scripts/setup_venv.sh`` copies it into the
repository's ``.venv`` so the two behave the same."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "hf_zero_autostart.pth"


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, *args, **kwargs):
        return super().get_outputs(*args, **kwargs) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
