"""hf_zero's start-up hook: ``HF_ZERO_CONFIG`` alone turns hf_zero on, even in a process that
never imports it (plain ``torchrun train.py`` on a stock script).

``hf_zero_autostart.pth`` (installed into site-packages beside the package) runs one line,
:data:`PTH_LINE`, when any interpreter of the environment starts: it imports this module only when
``HF_ZERO_CONFIG`` is set and ``HF_ZERO_AUTOSTART`` is not ``0``. The file is not tracked; it is
written from :data:`PTH_LINE` by setup.py into a wheel, and by ``python -m _hf_zero_autostart
install`` into an environment with an editable install (scripts/setup_venv.sh, the Dockerfile). It exists so that the "never silent" promise holds
on every launch route: with ``HF_ZERO_CONFIG`` set, a stock Trainer / Accelerator runs on hf_zero
(what ``python -m hf_zero.run`` and ``hf_zero.enable()`` do) instead of silently training plain DDP.

Invariants:
    * Without ``HF_ZERO_CONFIG`` (or with ``HF_ZERO_AUTOSTART=0``) start-up only reads two
      environment variables (in the .pth line): no import, no finder, nothing patched.
    * With it, start-up still imports nothing: one small finder waits on ``sys.meta_path`` for the
      first import of ``transformers`` or ``accelerate``. Only then does it step aside and load
      hf_zero's bootstrap (which imports torch, never transformers or accelerate, so the import
      that woke it proceeds unchanged) and call :func:`hf_zero.integrations.bootstrap.enable`.
    * A broken hf_zero install never breaks the interpreter: the ImportError is reported once on
      stderr and the process continues without hf_zero. A configuration error from ``enable``
      (accelerate set for DeepSpeed without a config file) is raised: it names the fix.
"""

import os
import sys

_TRIGGERS = ("transformers", "accelerate")

PTH_NAME = "hf_zero_autostart.pth"
#: the .pth file's one line (site.py executes lines that start with "import")
PTH_LINE = (
    'import os, sys; exec("try:\\n import _hf_zero_autostart\\nexcept ImportError as e:\\n sys.stderr.write('
    'f\\"hf_zero: HF_ZERO_CONFIG is set but the start-up hook could not load ({e}); continuing WITHOUT '
    'hf_zero\\\\n\\")") if os.environ.get("HF_ZERO_CONFIG") and os.environ.get("HF_ZERO_AUTOSTART", "1") != "0" '
    'else None'
)


class _WakeOnFirstImport:
    """A meta-path finder that finds nothing: it runs the bootstrap once, before the first import
    of a library the bootstrap patches, then removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name in _TRIGGERS:
            _step_aside(self)
            _enable()
        return None


def _enable() -> None:
    try:
        from hf_zero.integrations.bootstrap import enable
    except ImportError as exc:
        print(f"hf_zero: HF_ZERO_CONFIG is set but hf_zero could not be loaded ({exc}); "
              "continuing WITHOUT hf_zero", file=sys.stderr, flush=True)
        return
    enable()


def _step_aside(finder) -> None:
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def activate(environ=os.environ) -> bool:
    """Install the finder when ``HF_ZERO_CONFIG`` asks for hf_zero; returns whether it did."""
    if not environ.get("HF_ZERO_CONFIG") or environ.get("HF_ZERO_AUTOSTART", "1") == "0":
        return False
    if any(isinstance(f, _WakeOnFirstImport) for f in sys.meta_path):
        return False
    if any(name in sys.modules for name in _TRIGGERS):  # too late to wait: patch now
        _enable()
        return True
    sys.meta_path.insert(0, _WakeOnFirstImport())
    return True


def install(directory=None) -> str:
    """Write the .pth into ``directory`` (default: this environment's site-packages) unless it
    is there already with the same line; returns its path."""
    import sysconfig

    path = os.path.join(directory or sysconfig.get_paths()["purelib"], PTH_NAME)
    text = PTH_LINE + "\n"
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        raise SystemExit("usage: python -m _hf_zero_autostart install")
    print(install())
else:
    activate()
