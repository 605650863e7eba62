"""``hf-zero launch --config_file accel.yaml train.py [ARGS...]``: start a script described by an
accelerate config YAML that says ``distributed_type: DEEPSPEED``, on hf_zero.

accelerate's own launcher refuses such a config when the deepspeed package is absent (it raises
before the script starts), although hf_zero reads the very DeepSpeed-format JSON the YAML names.
This command reads the YAML itself and starts ``torchrun ... -m hf_zero.run train.py ARGS`` on
this machine, with the ZeRO config in ``HF_ZERO_CONFIG`` (see :mod:`hf_zero.run`).

Read from the YAML: ``num_processes`` (over all machines, as accelerate counts them),
``num_machines``, ``machine_rank``, ``main_process_ip``, ``main_process_port``,
``mixed_precision``, ``use_cpu``, ``gpu_ids`` and ``deepspeed_config``: either ``deepspeed_config_file``
(a path, relative to the working directory or else to the YAML's folder) or accelerate's inline
keys (``zero_stage``, ``offload_optimizer_device``, ``offload_param_device``, their
``*_nvme_path``, ``gradient_accumulation_steps``, ``gradient_clipping``), which become a config.

Invariants:

* The YAML is validated before anything starts; an error names the file, the key and the fix.
* What the processes get is what accelerate's launcher would give a non-DeepSpeed run of the
  same YAML (``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_CPU``, ``CUDA_VISIBLE_DEVICES`` from
  ``gpu_ids``), plus ``HF_ZERO_CONFIG``;
  accelerate's DeepSpeed switch (``ACCELERATE_USE_DEEPSPEED``) is removed: hf_zero replaces it.
* One machine per invocation, as torchrun: on several machines run it on each, with that
  machine's ``machine_rank`` in its YAML (static rendezvous at ``main_process_ip:port``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

#: accelerate's inline DeepSpeed keys hf_zero turns into a config (others are refused by name).
INLINE_KEYS = ("zero_stage", "offload_optimizer_device", "offload_param_device", "offload_optimizer_nvme_path",
               "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping")
#: inline keys that describe DeepSpeed's own machinery and have no meaning for hf_zero.
IGNORED_KEYS = ("zero3_init_flag", "zero3_save_16bit_model", "deepspeed_multinode_launcher", "deepspeed_hostfile",
                "deepspeed_exclusion_filter", "deepspeed_inclusion_filter")


class LaunchConfigError(ValueError):
    """The accelerate YAML cannot be launched on hf_zero; the message names the key and the fix."""


@dataclass(frozen=True)
class LaunchPlan:
    """What one ``hf-zero launch`` starts on this machine."""

    source: str                 # the YAML's path
    num_processes: int          # over all machines
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    mixed_precision: str        # "no" | "fp16" | "bf16"
    use_cpu: bool
    zero_config: str            # a path, or a JSON string built from inline keys
    gpu_ids: Optional[str] = None  # "0,1": CUDA_VISIBLE_DEVICES; None: all

    @property
    def nproc_per_node(self) -> int:
        return self.num_processes // self.num_machines


def _int(cfg: dict, key: str, default: int, source: str, minimum: int) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LaunchConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def read_config(path: str, num_processes: Optional[int] = None, main_process_port: Optional[int] = None,
                cwd: Optional[str] = None) -> LaunchPlan:
    """Parse and check an accelerate config YAML (``num_processes`` / ``main_process_port``
    override the file's, as accelerate's flags of those names do)."""
    import yaml

    source = str(path)
    cwd = Path(cwd or os.getcwd())
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
    except OSError as exc:
        raise LaunchConfigError(f"cannot read the accelerate config {source!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise LaunchConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise LaunchConfigError(f"{source}: expected a mapping of accelerate settings, got {type(cfg).__name__}")
    dist = str(cfg.get("distributed_type", "NO"))
    if dist.upper() != "DEEPSPEED":
        raise LaunchConfigError(
            f"{source}: distributed_type is {dist!r}, not DEEPSPEED; hf-zero launch starts DeepSpeed configs. "
            f"For this one use accelerate's launcher: HF_ZERO_CONFIG=zero.json accelerate launch --config_file "
            f"{source} -m hf_zero.run train.py ...")
    if num_processes is not None:
        cfg["num_processes"] = num_processes
    if main_process_port is not None:
        cfg["main_process_port"] = main_process_port
    machines = _int(cfg, "num_machines", 1, source, 1)
    procs = _int(cfg, "num_processes", 1, source, 1)
    if procs % machines:
        raise LaunchConfigError(f"{source}: num_processes={procs} (over all machines) is not a multiple of "
                                f"num_machines={machines}")
    rank = _int(cfg, "machine_rank", 0, source, 0)
    if rank >= machines:
        raise LaunchConfigError(f"{source}: machine_rank={rank} must be below num_machines={machines}")
    ip = cfg.get("main_process_ip") or "127.0.0.1"
    if machines > 1 and not cfg.get("main_process_ip"):
        raise LaunchConfigError(f"{source}: num_machines={machines} needs main_process_ip (the address of machine 0)")
    port = _int(cfg, "main_process_port", 29500, source, 1)
    mp = str(cfg.get("mixed_precision") or "no").lower()
    if mp not in ("no", "fp16", "bf16"):
        raise LaunchConfigError(f"{source}: mixed_precision={mp!r} is not supported by hf_zero; use no, fp16 or bf16")
    use_cpu = bool(cfg.get("use_cpu", False))
    gpu_ids = cfg.get("gpu_ids")
    gpu_ids = None if gpu_ids is None or str(gpu_ids).lower() == "all" else str(gpu_ids)
    return LaunchPlan(source=source, num_processes=procs, num_machines=machines, machine_rank=rank,
                      main_process_ip=str(ip), main_process_port=port, mixed_precision=mp, use_cpu=use_cpu,
                      gpu_ids=gpu_ids,
                      zero_config=_zero_config(cfg.get("deepspeed_config"), source, Path(path).parent, cwd))


def _zero_config(ds, source: str, yaml_dir: Path, cwd: Path) -> str:
    if ds is None:
        ds = {}
    if not isinstance(ds, dict):
        raise LaunchConfigError(f"{source}: deepspeed_config must be a mapping, got {type(ds).__name__}")
    file = ds.get("deepspeed_config_file")
    if file and str(file).lower() != "none":
        inline = sorted(k for k in ds if k in INLINE_KEYS)
        if inline:
            raise LaunchConfigError(f"{source}: deepspeed_config names deepspeed_config_file={file!r} and also "
                                    f"{', '.join(inline)}; keep them in the JSON file only (accelerate refuses "
                                    f"both as well)")
        candidates = [Path(file)] if Path(file).is_absolute() else [cwd / file, yaml_dir / file]
        for c in candidates:
            if c.is_file():
                return str(c.resolve())
        raise LaunchConfigError(f"{source}: deepspeed_config_file={file!r} not found (looked at "
                                f"{', '.join(str(c) for c in candidates)})")
    unknown = sorted(k for k in ds if k not in INLINE_KEYS and k not in IGNORED_KEYS and k != "deepspeed_config_file")
    if unknown:
        raise LaunchConfigError(f"{source}: deepspeed_config key(s) {', '.join(unknown)} have no hf_zero meaning; "
                                f"put the settings in a DeepSpeed-format JSON and name it as "
                                f"deepspeed_config_file")
    if "zero_stage" not in ds:
        raise LaunchConfigError(f"{source}: deepspeed_config has neither deepspeed_config_file nor zero_stage; "
                                f"add deepspeed_config: {{deepspeed_config_file: zero.json}}")
    zero: Dict[str, object] = {"stage": ds["zero_stage"]}
    for what in ("optimizer", "param"):
        device = str(ds.get(f"offload_{what}_device") or "none").lower()
        if device != "none":
            section: Dict[str, object] = {"device": device}
            if device == "nvme":
                nvme = ds.get(f"offload_{what}_nvme_path")
                if not nvme or str(nvme).lower() == "none":
                    raise LaunchConfigError(f"{source}: offload_{what}_device=nvme needs offload_{what}_nvme_path")
                section["nvme_path"] = str(nvme)
            zero[f"offload_{what}"] = section
    out: Dict[str, object] = {"zero_optimization": zero}
    for key in ("gradient_accumulation_steps", "gradient_clipping"):
        if ds.get(key) is not None and str(ds[key]).lower() != "none":
            out[key] = ds[key]
    from .config import ConfigError, ZeroConfig

    try:
        ZeroConfig.load(out)
    except ConfigError as exc:
        raise LaunchConfigError(f"{source}: deepspeed_config gives an invalid ZeRO config: {exc}") from None
    return json.dumps(out)


def launch_command(plan: LaunchPlan, target: Sequence[str], env: Optional[Dict[str, str]] = None,
                   python: str = sys.executable) -> Tuple[List[str], Dict[str, str]]:
    """The torchrun command and environment that start ``target`` (``[script, *args]`` or
    ``["-m", module, *args]``) under the bootstrap on this machine."""
    env = dict(os.environ if env is None else env)
    env["HF_ZERO_CONFIG"] = plan.zero_config
    env["ACCELERATE_MIXED_PRECISION"] = plan.mixed_precision
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    env.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
    if plan.use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    elif plan.gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.gpu_ids
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.nproc_per_node),
           "--nnodes", str(plan.num_machines), "--node_rank", str(plan.machine_rank),
           "--master_addr", plan.main_process_ip, "--master_port", str(plan.main_process_port),
           "-m", "hf_zero.run", *target]
    return cmd, env


def main(config_file: str, target: Sequence[str], num_processes: Optional[int] = None,
         main_process_port: Optional[int] = None) -> int:
    if not target:
        print("hf-zero launch: error: give the script to run: hf-zero launch --config_file accel.yaml train.py ...",
              file=sys.stderr)
        return 2
    try:
        plan = read_config(config_file, num_processes=num_processes, main_process_port=main_process_port)
    except LaunchConfigError as exc:
        print(f"hf-zero launch: error: {exc}", file=sys.stderr)
        return 2
    cmd, env = launch_command(plan, target)
    print(f"hf-zero launch: {plan.num_processes} process(es) on {plan.num_machines} machine(s), this is machine "
          f"{plan.machine_rank}; ZeRO config {plan.zero_config}; mixed precision {plan.mixed_precision}"
          f"{'; CPU' if plan.use_cpu else ''}", file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)
