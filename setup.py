"""Build hook: write ``hf_zero_autostart.pth`` at the root of the wheel (site-packages), beside
the package, from ``_hf_zero_autostart.PTH_LINE`` (read here without importing the module).
Everything else is configured in pyproject.toml. An editable install (``pip install -e .``) does
not carry the file; ``python -m _hf_zero_autostart install`` writes it (scripts/setup_venv.sh and
the Dockerfile run that)."""

import ast
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _module_constant(name: str) -> str:
    with open(os.path.join(HERE, "_hf_zero_autostart.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"_hf_zero_autostart.py defines no {name}")


class BuildPyWithStartupHook(build_py):
    def _pth_path(self) -> str:
        return os.path.join(self.build_lib, _module_constant("PTH_NAME"))

    def run(self):
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        with open(self._pth_path(), "w") as f:
            f.write(_module_constant("PTH_LINE") + "\n")

    def get_outputs(self, *args, **kwargs):
        return super().get_outputs(*args, **kwargs) + [self._pth_path()]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
