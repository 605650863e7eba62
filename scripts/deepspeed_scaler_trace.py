"""Print DeepSpeed's DynamicLossScaler trace on a fixed overflow sequence: the reference that
tests/test_units.py::test_loss_scaler_matches_deepspeed_trace holds hf_zero's scaler to.

Runs in DeepSpeed's own venv, never in ours (DeepSpeed is not a dependency of hf_zero):
    /work/ds-venv/bin/python scripts/deepspeed_scaler_trace.py
"""

import json

import torch.distributed as tdist

SEQUENCE = [False, True, False, False, True, True, True, True] + [False] * 5


def main() -> None:
    tdist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:29591")
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    dist.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # the scaler logs via rank
    traces = {}
    for hysteresis, consecutive in [(1, False), (2, False), (2, True)]:
        scaler = DynamicLossScaler(init_scale=8.0, scale_window=2, min_scale=1.0, delayed_shift=hysteresis,
                                   consecutive_hysteresis=consecutive, raise_error_at_min_scale=False)
        trace = []
        for overflow in SEQUENCE:
            scaler.update_scale(overflow)
            trace.append(scaler.cur_scale)
        traces[f"{hysteresis},{consecutive}"] = trace
    print(json.dumps({"deepspeed": deepspeed.__version__, "sequence": SEQUENCE, "traces": traces}, indent=1))


if __name__ == "__main__":
    main()
