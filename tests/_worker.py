"""Entry point of one launched test process (see launch.py)."""

import importlib
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    name, out_dir = sys.argv[1], Path(sys.argv[2])
    module, _, func = name.rpartition(":")  # "module:function", or a function of scenarios.py
    payload = json.loads((out_dir / "payload.json").read_text())
    result = getattr(importlib.import_module(module or "scenarios"), func)(payload, out_dir)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
