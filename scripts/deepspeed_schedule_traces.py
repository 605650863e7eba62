"""Record the learning rate that each optimizer step uses under DeepSpeed's own WarmupLR,
WarmupDecayLR and WarmupCosineLR (the ``scheduler`` types a DeepSpeed config names), for the cases
tests/test_schedulers.py checks hf_zero's schedules against. The lr is read before each
``optimizer.step()``, then the scheduler is stepped, as DeepSpeed's engine does.

Runs in DeepSpeed's own venv, never in ours (DeepSpeed is not a dependency of hf_zero):
    /work/ds-venv/bin/python scripts/deepspeed_schedule_traces.py tests/data/deepspeed_schedules.json
(DeepSpeed logs to stdout, so the JSON goes to the file named.)
"""

import json
import sys

import torch

STEPS = 15
BASE_LR = 1e-3


def cases():
    for kind in ("linear", "log"):
        for warmup in (1, 4):
            yield {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": BASE_LR,
                                                   "warmup_num_steps": warmup, "warmup_type": kind}}
            yield {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": BASE_LR,
                                                        "warmup_num_steps": warmup, "warmup_type": kind,
                                                        "total_num_steps": 12}}
            for min_ratio, cos_min in ((0.0, 0.0001), (0.1, 0.05)):
                yield {"type": "WarmupCosineLR", "params": {"total_num_steps": 12, "warmup_num_steps": warmup,
                                                             "warmup_type": kind, "warmup_min_ratio": min_ratio,
                                                             "cos_min_ratio": cos_min}}


def main() -> None:
    import deepspeed
    from deepspeed.runtime import lr_schedules

    out = {"deepspeed": deepspeed.__version__, "base_lr": BASE_LR, "steps": STEPS, "cases": []}
    for case in cases():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        sched = getattr(lr_schedules, case["type"])(opt, **case["params"])
        lrs = []
        for _ in range(STEPS):
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            sched.step()
        out["cases"].append({**case, "lrs": lrs})
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
