"""``python -m hf_zero.run SCRIPT [ARGS...]`` (or ``-m MODULE [ARGS...]``): run an unmodified
training script as ``__main__`` with hf_zero's bootstrap installed.

Launch it as any script: ``torchrun --nproc_per_node N -m hf_zero.run train.py --deepspeed
zero.json ...`` or ``accelerate launch -m hf_zero.run train.py ...``; ``hf-zero launch
--config_file accel.yaml train.py ...`` (an accelerate YAML with ``distributed_type: DEEPSPEED``,
:mod:`hf_zero.cli_launch`) starts it this way too. The script sees the
``sys.argv`` and ``sys.path[0]`` it would see when run directly; every Trainer / Accelerator it
builds with a ZeRO config (``--deepspeed``, ``HF_ZERO_CONFIG``, accelerate's DeepSpeed config
file) runs on hf_zero (see :mod:`hf_zero.integrations.bootstrap`).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

USAGE = "usage: python -m hf_zero.run SCRIPT [ARGS...]  |  python -m hf_zero.run -m MODULE [ARGS...]"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__, file=sys.stderr)
        raise SystemExit(0 if argv else 2)
    module = None
    if argv[0] in ("-m", "--module"):
        if len(argv) < 2:
            raise SystemExit(f"hf_zero.run: -m needs a module name\n{USAGE}")
        module, rest = argv[1], argv[2:]
    else:
        script, rest = argv[0], argv[1:]
        if not os.path.isfile(script):
            raise SystemExit(f"hf_zero.run: no such script: {script!r}\n{USAGE}")

    from .integrations.bootstrap import enable

    enable()
    if module is not None:
        sys.argv = [module, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
