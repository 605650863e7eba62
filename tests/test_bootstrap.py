"""The bootstrap (issue 11): unmodified stock scripts (tests/bootstrap_scripts.py, no ``import
hf_zero``) run on hf_zero under ``torchrun -m hf_zero.run``, ``accelerate launch -m hf_zero.run``
and ``hf-zero launch --config_file accel.yaml``.

References (all in this process, one rank, no hf_zero):

* Trainer scripts: a plain ``transformers.Trainer`` (or ``trl.SFTTrainer``) with the same global
  batch (2 ranks x 2 = 4, accumulation 2) and the same data order (the Trainer's seeded sampler
  gives global micro-step k the samples one process of batch 4 reads). The Transformers DeepSpeed
  docs configs carry an AdamW and a WarmupLR section: the reference Trainer gets the lr sequence
  DeepSpeed's WarmupLR gives, restated below from its definition.
* The Accelerate script: the same loop written out on one process; rank r's logged loss is the
  mean over the micro-batches accelerate's batch sharding gives rank r.

Losses within 1e-5. A Trainer checkpoint must be hf_zero's sharded one at the config's stage, so
DDP passing for ZeRO fails.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bootstrap_scripts as B
import integration_scenarios as S
from launch import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CPU_YAML = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
STEPS, DOCS_STEPS = 3, 5
TRAIN_ARGS = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--learning_rate", str(S.LR), "--weight_decay", "0.1", "--max_grad_norm", str(S.CLIP),
              "--logging_steps", "1", "--save_strategy", "steps", "--report_to", "none", "--use_cpu",
              "--seed", "0", "--disable_tqdm", "true", "--lr_scheduler_type", "linear"]


def _steps(n):
    return ["--max_steps", str(n), "--save_steps", str(n)]


def _offload_cfg(stage=2) -> dict:
    cfg = S.zero_cfg(stage)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HF_ZERO_CONFIG", "ZERO_CALLBACK",
                "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        env.pop(var, None)
    env.update(extra)
    return env


def _run(cmd, env, cwd):
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _launcher(route: str) -> list:
    """The command prefix a user types for each launch route (2 CPU processes)."""
    if route == "torchrun":
        return [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "-m", "hf_zero.run"]
    if route == "accelerate":
        return [BIN / "accelerate", "launch", "--config_file", CPU_YAML, "--main_process_port", free_port(),
                "-m", "hf_zero.run"]
    if route == "plain-torchrun":  # no bootstrap at all
        return [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port()]
    raise ValueError(route)


def _results(out: Path) -> list:
    return [json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1)]


def _check_trainer_run(p, out: Path, reference: list, stage: int, steps: int, offload: str = "none"):
    log = p.stdout + p.stderr
    assert f"hf_zero active: ZeRO stage {stage}, offload optimizer={offload}" in log, log[-3000:]
    for res in _results(out):
        assert res["world"] == 2 and "ZeroAccelerator" in res["accelerator"] and "ZeroTrainerMixin" in res["trainer"]
        assert res["losses"] == pytest.approx(reference, abs=1e-5)
    index = json.loads((out / f"checkpoint-{steps}" / f"global_step{steps}" / "index.json").read_text())
    assert index["stage"] == stage


# ------------------------------------------------------------------------------------ references
def _plain_trainer(out_dir, steps, trainer_cls=None, scheduler=None):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    trainer_cls = trainer_cls or Trainer
    if scheduler is not None:
        class WithScheduler(trainer_cls):
            def create_scheduler(self, num_training_steps, optimizer=None):
                if self.lr_scheduler is None:
                    self.lr_scheduler = scheduler(optimizer if optimizer is not None else self.optimizer)
                return self.lr_scheduler
        trainer_cls = WithScheduler
    ids = S.samples(48).tolist()
    args = TrainingArguments(**S.trainer_kwargs(out_dir, 4, max_steps=steps))
    trainer = trainer_cls(model=S.build("llama"), args=args,
                          train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    return S.logged_losses(trainer)


def deepspeed_warmup_lr(n_updates: int, lo: float, hi: float, warmup: int) -> list:
    """DeepSpeed's WarmupLR (warmup_type "log"): update k (from 0) uses last_batch_iteration
    k - 1; at -1 the lr is warmup_min_lr; warmup_num_steps is raised to at least 2."""
    warmup = max(2, warmup)
    out = []
    for k in range(n_updates):
        it = k - 1
        gamma = 0.0 if it < 0 else (math.log(it + 1) / math.log(warmup) if it < warmup else 1.0)
        out.append(lo + (hi - lo) * gamma)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _plain_trainer(tmp_path_factory.mktemp("ref"), STEPS)


@pytest.fixture(scope="module")
def reference_docs(tmp_path_factory):
    """The docs configs: AdamW from the TrainingArguments ("auto"), WarmupLR from 0 to the
    learning rate over warmup_steps (0, so DeepSpeed's minimum of 2)."""
    lrs = deepspeed_warmup_lr(DOCS_STEPS + 1, 0.0, S.LR, 0)
    return _plain_trainer(tmp_path_factory.mktemp("ref_docs"), DOCS_STEPS,
                          scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda n: lrs[n] / S.LR))


def accelerate_reference(world=2, micro=2, accum=2, n=24) -> list:
    """The ACCELERATE script's loop on one process. Per update u, rank r reads the global
    micro-batches (u * accum + j) * world + r (accelerate's batch sharding); the gradient is the
    mean over all world x accum micro-batches. Returns each rank's per-update mean loss."""
    model = S.build("llama")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    ids = S.samples(n)
    batches = [ids[i:i + micro] for i in range(0, n, micro)]
    per_update = world * accum
    losses = [[] for _ in range(world)]
    for u in range(len(batches) // per_update):
        mine = [[] for _ in range(world)]
        for j in range(accum):
            for r in range(world):
                x = batches[(u * accum + j) * world + r]
                loss = model(input_ids=x, labels=x).loss
                (loss / per_update).backward()
                mine[r].append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        for _ in range(world):  # accelerate's scheduler wrapper steps once per process
            sched.step()
        opt.zero_grad()
        for r in range(world):
            losses[r].append(sum(mine[r]) / len(mine[r]))
    return losses


# ------------------------------------------------------------------------------------ Trainer scripts
def test_stock_trainer_torchrun_deepspeed_json_stage3(tmp_path, reference):
    """``--deepspeed '<JSON string>'`` on the stock Trainer script, stage 3."""
    (tmp_path / "train.py").write_text(B.TRAINER)
    out = tmp_path / "out"
    cmd = [*_launcher("torchrun"), "train.py", "--output_dir", out, "--deepspeed", json.dumps(S.zero_cfg(3)),
           *TRAIN_ARGS, *_steps(STEPS)]
    p = _run(cmd, _env(), tmp_path)
    _check_trainer_run(p, out, reference, 3, STEPS)
    assert _results(out)[0]["deepspeed_arg"] is None  # moved aside: Transformers never saw it


@pytest.mark.parametrize("route", ["torchrun", "plain-torchrun"])
def test_hf_zero_config_on_stock_trainer_stage2(tmp_path, reference, route):
    """Never silent: ``HF_ZERO_CONFIG`` on a stock script without ``--deepspeed`` runs hf_zero,
    under ``-m hf_zero.run`` and under plain ``torchrun train.py`` (no bootstrap, no
    ``enable()``: the start-up hook, hf_zero_autostart.pth, turns it on)."""
    (tmp_path / "train.py").write_text(B.TRAINER)
    (tmp_path / "zero.json").write_text(json.dumps(S.zero_cfg(2)))
    out = tmp_path / "out"
    p = _run([*_launcher(route), "train.py", "--output_dir", out, *TRAIN_ARGS, *_steps(STEPS)],
             _env(HF_ZERO_CONFIG=str(tmp_path / "zero.json")), tmp_path)
    _check_trainer_run(p, out, reference, 2, STEPS)


def test_startup_hook_is_inert_without_the_variable_and_opt_out():
    """Without HF_ZERO_CONFIG nothing of hf_zero loads at start-up; HF_ZERO_AUTOSTART=0 opts out;
    with the variable, only a finder waits (no torch import) until transformers is imported."""
    probe = ("import sys; w = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == '_WakeOnFirstImport'];"
             "print(len(w), 'hf_zero' in sys.modules, 'torch' in sys.modules)")
    run = lambda **extra: subprocess.run([sys.executable, "-c", probe], env=_env(**extra), capture_output=True,
                                         text=True, check=True).stdout.split()
    assert run() == ["0", "False", "False"]
    assert run(HF_ZERO_CONFIG="zero.json", HF_ZERO_AUTOSTART="0") == ["0", "False", "False"]
    assert run(HF_ZERO_CONFIG="zero.json") == ["1", "False", "False"]


def test_wheel_ships_the_startup_hook(tmp_path):
    """A regular (non-editable) install gets the .pth at the root of site-packages."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(ROOT / "hf_zero", src / "hf_zero", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "_hf_zero_autostart.py"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("hf_zero-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_zero_autostart.pth" in names and "_hf_zero_autostart.py" in names
    import _hf_zero_autostart

    assert zipfile.ZipFile(wheel).read("hf_zero_autostart.pth").decode() == _hf_zero_autostart.PTH_LINE + "\n"


def test_zero_callback_on_stock_trainer_plain_torchrun(tmp_path, reference):
    """Never silent: ``Trainer(..., callbacks=[ZeroCallback(path)])`` under plain torchrun (no
    bootstrap, no --deepspeed, no HF_ZERO_CONFIG) runs hf_zero with the callback's config."""
    (tmp_path / "train.py").write_text(B.TRAINER)
    (tmp_path / "zero.json").write_text(json.dumps(_offload_cfg(2)))
    out = tmp_path / "out"
    p = _run([*_launcher("plain-torchrun"), "train.py", "--output_dir", out, *TRAIN_ARGS, *_steps(STEPS)],
             _env(ZERO_CALLBACK=str(tmp_path / "zero.json")), tmp_path)
    _check_trainer_run(p, out, reference, 2, STEPS, offload="cpu")


def test_zero_callback_added_later_fails_naming_the_fix(tmp_path):
    """Never silent: a ZeroCallback added to an already built plain Trainer cannot turn hf_zero
    on; ``train()`` fails and says how to."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    import hf_zero

    ids = S.samples(8).tolist()
    trainer = Trainer(model=S.build("llama"), args=TrainingArguments(**S.trainer_kwargs(tmp_path, 2, max_steps=1)),
                      train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    assert "ZeroTrainerMixin" not in [c.__name__ for c in type(trainer).__mro__]
    trainer.add_callback(hf_zero.ZeroCallback(str(tmp_path / "zero.json")))
    with pytest.raises(RuntimeError, match=r"does not run hf_zero.*callbacks=\[hf_zero.ZeroCallback"):
        trainer.train()


@pytest.mark.slow
def test_stock_trainer_accelerate_launch_stage2_cpu_offload(tmp_path, reference):
    (tmp_path / "train.py").write_text(B.TRAINER)
    out = tmp_path / "out"
    cmd = [*_launcher("accelerate"), "train.py", "--output_dir", out, "--deepspeed", json.dumps(_offload_cfg(2)),
           *TRAIN_ARGS, *_steps(STEPS)]
    p = _run(cmd, _env(ACCELERATE_USE_CPU="true"), tmp_path)
    _check_trainer_run(p, out, reference, 2, STEPS, offload="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_transformers_docs_config(tmp_path, reference_docs, stage):
    """The ZeRO-2 / ZeRO-3 configs of the Transformers DeepSpeed docs (tests/fixtures: "auto"
    values, AdamW and WarmupLR sections, CPU offload) via ``--deepspeed path``."""
    (tmp_path / "train.py").write_text(B.TRAINER)
    out = tmp_path / "out"
    cmd = [*_launcher("torchrun"), "train.py", "--output_dir", out, "--deepspeed",
           FIXTURES / f"ds_config_zero{stage}.json", *TRAIN_ARGS, *_steps(DOCS_STEPS)]
    p = _run(cmd, _env(), tmp_path)
    _check_trainer_run(p, out, reference_docs, stage, DOCS_STEPS, offload="cpu")
    if stage == 3:
        assert "param=cpu" in p.stdout + p.stderr


@pytest.mark.slow
def test_trl_sft_script_torchrun_stage2(tmp_path):
    """A stock TRL script (SFTConfig through HfArgumentParser, a stock SFTTrainer, no hf_zero in
    it) with ``--deepspeed zero.json``: hf_zero runs it (the trainer class is still an
    SFTTrainer); losses equal a plain one-process SFTTrainer's."""
    trl = pytest.importorskip("trl", reason="trl is not installed (optional: pip install -e .[trl])")
    from datasets import Dataset

    ns: dict = {}
    exec(compile(B.SFT.split("def main")[0], "bootstrap_scripts.SFT", "exec"), ns)  # the script's tokenizer()
    args = trl.SFTConfig(**S.trainer_kwargs(tmp_path / "ref", 4), bf16=False, max_length=None)
    ref = trl.SFTTrainer(model=S.build("llama"), args=args, processing_class=ns["tokenizer"](),
                         train_dataset=Dataset.from_dict({"input_ids": S.samples(48).tolist()}))
    ref.train()
    reference = S.logged_losses(ref)

    (tmp_path / "sft.py").write_text(B.SFT)
    (tmp_path / "zero.json").write_text(json.dumps(S.zero_cfg(2)))
    out = tmp_path / "out"
    cmd = [*_launcher("torchrun"), "sft.py", "--output_dir", out, "--deepspeed", tmp_path / "zero.json",
           "--bf16", "false", *TRAIN_ARGS, *_steps(STEPS)]
    p = _run(cmd, _env(), tmp_path)
    for res in _results(out):
        assert "SFTTrainer" in res["trainer"]
    _check_trainer_run(p, out, reference, 2, STEPS)


# ------------------------------------------------------------------------------------ Accelerate script
@pytest.mark.slow
@pytest.mark.parametrize("route, cfg", [("accelerate", S.zero_cfg(2)), ("torchrun", _offload_cfg(2))],
                         ids=["accelerate-stage2", "torchrun-stage2-offload"])
def test_stock_accelerator_script(tmp_path, route, cfg):
    """A stock Accelerator loop (train loader 2 and eval loader 4 prepared in one call) with
    ``HF_ZERO_CONFIG``: hf_zero's Accelerator, micro-batch "auto" -> 2 (the train loader's), and
    each rank's losses equal the one-process loop's."""
    (tmp_path / "acc.py").write_text(B.ACCELERATE)
    out = tmp_path / "out"
    env = _env(ACCELERATE_USE_CPU="true", HF_ZERO_CONFIG=json.dumps(cfg))
    p = _run([*_launcher(route), "acc.py", out], env, tmp_path)
    offload = cfg["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    assert f"hf_zero active: ZeRO stage 2, offload optimizer={offload}" in p.stdout + p.stderr
    expected = accelerate_reference()
    for r, res in enumerate(_results(out)):
        assert "ZeroAccelerator" in res["accelerator"] and res["world"] == 2
        assert res["micro"] == 2 and res["stage"] == 2
        assert res["losses"] == pytest.approx(expected[r], abs=1e-5)


@pytest.mark.parametrize("micro", [16, "auto"])
def test_micro_batch_is_the_train_loaders(micro):
    """accelerate's example shape: train (16) and eval (32) loaders prepared in one call. A
    concrete ``train_micro_batch_size_per_gpu: 16`` is accepted, "auto" resolves to 16 (the
    last-prepared loader's 32 would contradict 16 / resolve to 32)."""
    from torch.utils.data import DataLoader

    import hf_zero

    cfg = dict(S.zero_cfg(2), train_micro_batch_size_per_gpu=micro)
    acc = hf_zero.ZeroAccelerator(zero_plugin=hf_zero.ZeroPlugin(cfg), cpu=True)
    model = S.build("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = [{"input_ids": x, "labels": x.clone()} for x in S.samples(64)]
    try:
        model, opt, train, _ = acc.prepare(model, opt, DataLoader(data, batch_size=16),
                                           DataLoader(data, batch_size=32))
        assert acc.zero_config.train_micro_batch_size_per_gpu == 16
        assert acc.zero_config.train_batch_size == 16
        batch = next(iter(train))
        acc.backward(model(**batch).loss)
        opt.step()
        assert acc.zero_engine.global_steps == 1
    finally:
        acc.free_memory()


# ------------------------------------------------------------------------------------ hf-zero launch
DS_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {file}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_port: {port}
mixed_precision: '{mp}'
use_cpu: true
"""


@pytest.mark.slow
def test_hf_zero_launch_accelerate_deepspeed_yaml(tmp_path, reference_docs):
    """``hf-zero launch --config_file accel.yaml train.py ...`` with ``distributed_type: DEEPSPEED``
    and a ``deepspeed_config_file`` (relative to the YAML's folder): 2 processes on hf_zero with
    that config; losses equal the one-process run, the checkpoint is stage 2's."""
    (tmp_path / "train.py").write_text(B.TRAINER)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "ds_zero2.json").write_text((FIXTURES / "ds_config_zero2.json").read_text())
    (tmp_path / "cfg" / "accel.yaml").write_text(DS_YAML.format(file="ds_zero2.json", port=free_port(), mp="no"))
    out = tmp_path / "out"
    cmd = [BIN / "hf-zero", "launch", "--config_file", tmp_path / "cfg" / "accel.yaml", "train.py",
           "--output_dir", out, *TRAIN_ARGS, *_steps(DOCS_STEPS)]
    p = _run(cmd, _env(), tmp_path)
    assert f"config {tmp_path / 'cfg' / 'ds_zero2.json'}" in p.stderr
    _check_trainer_run(p, out, reference_docs, 2, DOCS_STEPS, offload="cpu")


def test_launch_reads_the_yaml(tmp_path, monkeypatch):
    """What ``hf-zero launch`` takes from the YAML (processes, machines, mixed precision, the
    config file or accelerate's inline keys) and what it refuses, naming the key."""
    from hf_zero.cli_launch import LaunchConfigError, launch_command, read_config

    ds = tmp_path / "zero.json"
    ds.write_text(json.dumps(S.zero_cfg(3)))
    y = tmp_path / "a.yaml"
    y.write_text(DS_YAML.format(file=ds, port=4321, mp="bf16").replace("num_machines: 1", "num_machines: 2")
                 .replace("num_processes: 2", "num_processes: 8").replace("machine_rank: 0", "machine_rank: 1")
                 + "main_process_ip: 10.0.0.1\n")
    plan = read_config(str(y))
    assert (plan.num_processes, plan.nproc_per_node, plan.num_machines, plan.machine_rank) == (8, 4, 2, 1)
    assert plan.mixed_precision == "bf16" and plan.use_cpu and plan.zero_config == str(ds.resolve())
    cmd, env = launch_command(plan, ["train.py", "--lr", "1"], env={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1",
                       "--master_addr", "10.0.0.1", "--master_port", "4321", "-m", "hf_zero.run", "train.py",
                       "--lr", "1"]
    assert env["HF_ZERO_CONFIG"] == str(ds.resolve()) and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_USE_CPU"] == "true" and "ACCELERATE_USE_DEEPSPEED" not in env

    gpus = tmp_path / "gpus.yaml"
    gpus.write_text(DS_YAML.format(file=ds, port=1, mp="no").replace("use_cpu: true", "gpu_ids: 2,3"))
    assert launch_command(read_config(str(gpus)), ["t.py"], env={})[1]["CUDA_VISIBLE_DEVICES"] == "2,3"

    inline = tmp_path / "inline.yaml"
    inline.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 3\n"
                      "  offload_optimizer_device: cpu\n  offload_param_device: none\n"
                      "  gradient_accumulation_steps: 4\n  zero3_init_flag: true\n")
    cfg = json.loads(read_config(str(inline)).zero_config)
    assert cfg == {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                   "gradient_accumulation_steps": 4}

    import hf_zero.cli_launch
    from hf_zero import cli

    seen = {}
    monkeypatch.setattr(hf_zero.cli_launch, "main", lambda config_file, target, **kw: seen.update(
        config_file=config_file, target=target, **kw) or 0)
    assert cli.main(["launch", "--config_file", str(y), "--main_process_port", "5", "-m", "pkg.train",
                     "--config_file", "x"]) == 0
    assert seen == {"config_file": str(y), "target": ["-m", "pkg.train", "--config_file", "x"],  # its own flags
                    "num_processes": None, "main_process_port": 5}

    bad = tmp_path / "bad.yaml"
    for text, match in [
        ("distributed_type: MULTI_GPU\n", r"distributed_type is 'MULTI_GPU'.*accelerate launch"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: nope.json\n",
         r"deepspeed_config_file='nope.json' not found"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config: {}\n", r"neither deepspeed_config_file nor zero_stage"),
        ("distributed_type: DEEPSPEED\nnum_processes: 3\nnum_machines: 2\nmain_process_ip: h\n"
         "deepspeed_config: {zero_stage: 2}\n", r"num_processes=3 .* not a multiple of num_machines=2"),
        ("distributed_type: DEEPSPEED\nmixed_precision: fp8\ndeepspeed_config: {zero_stage: 2}\n",
         r"mixed_precision='fp8'"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2, offload_optimizer_device: nvme}\n",
         r"offload_optimizer_nvme_path"),
    ]:
        bad.write_text(text)
        with pytest.raises(LaunchConfigError, match=match):
            read_config(str(bad))


def test_accelerate_deepspeed_settings_become_hf_zero_config(tmp_path, monkeypatch):
    """accelerate's DeepSpeed settings name the config hf_zero takes: the launcher's
    ``ACCELERATE_USE_DEEPSPEED`` + ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` (then switched off), and a
    ``DeepSpeedPlugin(hf_ds_config=...)`` given to a stock Accelerator."""
    from types import SimpleNamespace

    from hf_zero.integrations.bootstrap import accelerator_config, adopt_accelerate_deepspeed_env

    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/x/zero.json"}
    adopt_accelerate_deepspeed_env(env)
    assert env == {"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "/x/zero.json",
                   "HF_ZERO_CONFIG": "/x/zero.json"}
    with pytest.raises(ValueError, match=r"without a config file.*deepspeed_config_file: zero.json"):
        adopt_accelerate_deepspeed_env({"ACCELERATE_USE_DEEPSPEED": "true"})
    untouched = {"ACCELERATE_USE_DEEPSPEED": "false"}
    adopt_accelerate_deepspeed_env(untouched)
    assert untouched == {"ACCELERATE_USE_DEEPSPEED": "false"}

    monkeypatch.delenv("HF_ZERO_CONFIG", raising=False)
    assert accelerator_config({"gradient_accumulation_steps": 2}) == (False, None)
    cfg = {"zero_optimization": {"stage": 3}, "steps_per_print": float("inf")}
    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(config=cfg))
    assert accelerator_config({"deepspeed_plugin": plugin}) == (True, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match=r"DeepSpeedPlugin\(hf_ds_config='zero.json'\)"):
        accelerator_config({"deepspeed_plugin": SimpleNamespace(hf_ds_config=None)})
    monkeypatch.setenv("HF_ZERO_CONFIG", "/y/zero.json")
    assert accelerator_config({}) == (True, None)


def test_stock_accelerator_with_deepspeed_plugin(tmp_path):
    """``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config="zero.json"))`` in a stock script
    under ``python -m hf_zero.run`` (one process) is hf_zero's Accelerator at the file's stage,
    although the deepspeed package is absent."""
    (tmp_path / "dsp.py").write_text(B.DEEPSPEED_PLUGIN)
    (tmp_path / "zero.json").write_text(json.dumps(S.zero_cfg(3)))
    out = tmp_path / "out"
    p = _run([sys.executable, "-m", "hf_zero.run", "dsp.py", tmp_path / "zero.json", out], _env(), tmp_path)
    assert "hf_zero active: ZeRO stage 3" in p.stderr
    res = json.loads((out / "result_rank0.json").read_text())
    assert "ZeroAccelerator" in res["accelerator"] and res["stage"] == 3 and res["steps"] == 1 and res["micro"] == 4
