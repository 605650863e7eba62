"""Entry point of one launched test process (see launch.py).

After the scenario it destroys the process group and releases what still pins it (as hf_zero's
exit callback does), then checks that no gloo worker thread is left for interpreter finalization:
one that is left can abort the process at exit, rarely and only under load (issue 13 item 10). A
new pin therefore fails here every time, naming the threads, instead of failing CI by chance.
"""

import importlib
import json
import os
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
    from hf_zero.engine.teardown import release_destroyed_groups

    release_destroyed_groups()
    tasks = Path("/proc/self/task")
    alive = sorted(n for n in ((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks)) if "gloo" in n)
    if alive:
        print(f"_worker: gloo threads still alive before finalization: {alive}", file=sys.stderr, flush=True)
        sys.exit(3)
