"""Tests for hf_zero.config: parsing, validation, "auto" resolution."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from hf_zero.config import (
    AUTO,
    AUTO_KEYS,
    COMPAT_KEYS,
    BF16Config,
    ConfigError,
    FP16Config,
    OffloadConfig,
    OptimizerConfig,
    ZeroConfig,
)

ISSUE_CONFIG = {
    "train_batch_size": 256,
    "gradient_accumulation_steps": 4,
    "fp16": {"enabled": True},
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "none"},
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
    },
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
}

HF_STYLE_CONFIG = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
        },
    },
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
}

HF_VALUES = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "fp16.enabled": False,
    "bf16.enabled": True,
    "optimizer.params.lr": 3e-5,
    "optimizer.params.betas": (0.9, 0.999),
    "optimizer.params.eps": 1e-8,
    "optimizer.params.weight_decay": 0.0,
    "scheduler.params.warmup_min_lr": 0.0,
    "scheduler.params.warmup_max_lr": 3e-5,
    "scheduler.params.warmup_num_steps": 100,
    "scheduler.params.total_num_steps": 1000,
    "hidden_size": 1024,
}


def load(**overrides) -> ZeroConfig:
    return ZeroConfig.load(overrides)


# ---------------------------------------------------------------- the issue


def test_issue_config_means_what_it_says():
    cfg = ZeroConfig.load(ISSUE_CONFIG)
    assert cfg.stage == 2
    assert cfg.fp16.enabled is True and cfg.bf16.enabled is False
    assert cfg.compute_dtype == torch.float16
    assert cfg.fp16.dynamic and cfg.fp16.initial_scale == 2.0**16
    assert cfg.zero_optimization.overlap_comm is True
    assert cfg.zero_optimization.contiguous_gradients and cfg.zero_optimization.reduce_scatter
    assert not cfg.zero_optimization.offload_optimizer.enabled
    assert cfg.optimizer == OptimizerConfig("AdamW", {"lr": 1e-4, "weight_decay": 0.01})
    assert cfg.scheduler is None
    assert cfg.train_micro_batch_size_per_gpu is None
    assert cfg.unresolved_keys() == []


def test_issue_config_resolves_on_eight_ranks():
    cfg = ZeroConfig.load(ISSUE_CONFIG).resolve(world_size=8)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (256, 8, 4)


def test_issue_config_fails_on_three_ranks():
    with pytest.raises(ConfigError, match=r"train_batch_size 256 is not divisible by gradient_accumulation_steps 4 "
                                          r"× world size 3 \(= 12\)"):
        ZeroConfig.load(ISSUE_CONFIG).resolve(world_size=3)


# ----------------------------------------------------------------- loading


def test_load_from_json_file(tmp_path: Path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ISSUE_CONFIG))
    cfg = ZeroConfig.load(path)
    assert cfg.source == str(path)
    assert cfg == ZeroConfig.load(ISSUE_CONFIG)
    assert ZeroConfig.load(str(path)).stage == 2


def test_load_returns_zero_config_as_is():
    cfg = ZeroConfig.load(ISSUE_CONFIG)
    assert ZeroConfig.load(cfg) is cfg


def test_malformed_json_names_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError, match=r"zero config .*broken\.json: invalid JSON at line 3"):
        ZeroConfig.load(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read the file"):
        ZeroConfig.load(tmp_path / "nope.json")


def test_duplicate_json_key(tmp_path: Path):
    path = tmp_path / "dup.json"
    path.write_text('{"zero_optimization": {"stage": 1, "stage": 2}}')
    with pytest.raises(ConfigError, match="duplicate key 'stage'"):
        ZeroConfig.load(path)


def test_errors_in_a_file_name_the_file(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match=r"bad\.json: zero_optimization\.stage: expected an integer from 0 to 3"):
        ZeroConfig.load(path)


def test_load_rejects_other_types(tmp_path: Path):
    with pytest.raises(ConfigError, match="expected a JSON file path, a mapping or a ZeroConfig, got int"):
        ZeroConfig.load(3)  # type: ignore[arg-type]
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json: the top level must be a JSON object, got \[1, 2\]"):
        ZeroConfig.load(path)


def test_empty_config_defaults():
    cfg = ZeroConfig.load({})
    assert cfg == ZeroConfig()
    assert cfg.stage == 0 and cfg.compute_dtype == torch.float32
    assert cfg.fp16.hysteresis == 1
    assert cfg.zero_optimization.overlap_comm is None
    assert cfg.zero_optimization.effective_overlap_comm is False
    assert load(zero_optimization={"stage": 3}).zero_optimization.effective_overlap_comm is True


# ---------------------------------------------------- unknown keys and types


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"zero_optimization": {"stgae": 2}}, r"unknown key 'zero_optimization\.stgae'; did you mean 'stage'\?"),
        ({"train_batch_sise": 8}, r"unknown key 'train_batch_sise'; did you mean 'train_batch_size'\?"),
        ({"fp16": {"enable": True}}, r"unknown key 'fp16\.enable'; did you mean 'enabled'\?"),
        (
            {"zero_optimization": {"offload_optimizer": {"devise": "cpu"}}},
            r"unknown key 'zero_optimization\.offload_optimizer\.devise'; did you mean 'device'\?",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
            r"unknown key 'optimizer\.params\.weight_decy' for optimizer type AdamW; did you mean 'weight_decay'\?",
        ),
        ({"xyzzy": 1}, r"unknown key 'xyzzy'; valid keys here: "),
    ],
)
def test_unknown_key_with_suggestion(config, message):
    with pytest.raises(ConfigError, match=message):
        ZeroConfig.load(config)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"train_batch_size": "32"}, r"train_batch_size: expected an integer from 1 to 2147483647.*got \"32\" \(a string; write the"),
        ({"fp16": {"enabled": "true"}}, r"fp16\.enabled: expected true or false.*got \"true\" \(a string; write tru"),
        ({"zero_optimization": {"stage": 4}}, r"zero_optimization\.stage: expected an integer from 0 to 3, got 4"),
        ({"zero_optimization": {"stage": True}}, r"zero_optimization\.stage: .*got true \(a boolean\)"),
        (
            {"zero_optimization": {"reduce_bucket_size": -5}},
            r"zero_optimization\.reduce_bucket_size: expected an integer >= 1 or \"auto\", got -5",
        ),
        ({"zero_optimization": {"allgather_bucket_size": 5.5e8 + 0.5}}, r"allgather_bucket_size: expected an integer"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
            r"zero_optimization\.offload_optimizer\.device: expected one of \"none\", \"cpu\", \"nvme\", got \"gpu\"",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            r"zero_optimization\.offload_param\.nvme_path: device \"nvme\" needs nvme_path",
        ),
        ({"gradient_clipping": -1.0}, r"gradient_clipping: expected a number >= 0 or \"auto\", got -1\.0"),
        ({"fp16": {"hysteresis": 0}}, r"fp16\.hysteresis: expected an integer >= 1, got 0"),
        ({"fp16": []}, r"fp16: expected a JSON object, got \[\]"),
        ({"optimizer": {"type": "Lamb"}}, r"optimizer\.type: unsupported optimizer type \"Lamb\"; supported: Adam, "
                                          r"AdamW, SGD"),
        ({"optimizer": {"params": {"lr": 1}}}, r"optimizer\.type: missing"),
        (
            {"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}},
            r"optimizer\.params\.betas: expected a list of two numbers in \[0, 1\] or \"auto\", got \[0\.9\]",
        ),
        (
            {"optimizer": {"type": "SGD", "params": {"betas": [0.9, 0.99]}}},
            r"unknown key 'optimizer\.params\.betas' for optimizer type SGD",
        ),
        ({"scheduler": {"type": "OneCycle"}}, r"scheduler\.type: unsupported scheduler type \"OneCycle\"; supported: "
                                              r"WarmupLR, WarmupDecayLR, WarmupCosineLR"),
        (
            {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}},
            r"scheduler\.params\.warmup_type: expected one of \"log\", \"linear\", got \"cosine\"",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}},
            r"scheduler\.params\.total_num_steps: WarmupDecayLR needs this parameter",
        ),
        ({"data_types": {"grad_accum_dtype": "fp64"}}, r"data_types\.grad_accum_dtype: expected one of \"fp32\""),
        ({"communication_data_type": "float16"}, r"communication_data_type: expected one of \"fp32\""),
        ({"aio": {"queue_depth": 0}}, r"aio\.queue_depth: expected an integer >= 1, got 0"),
    ],
)
def test_wrong_values_name_path_value_and_expectation(config, message):
    with pytest.raises(ConfigError, match=message):
        ZeroConfig.load(config)


def test_integral_floats_accepted_for_sizes():
    zero = load(zero_optimization={"stage": 3, "reduce_bucket_size": 5e8, "sub_group_size": 1e9}).zero_optimization
    assert zero.reduce_bucket_size == 500_000_000 and type(zero.reduce_bucket_size) is int
    assert zero.sub_group_size == 1_000_000_000 and type(zero.sub_group_size) is int


def test_auto_rejected_outside_auto_keys():
    with pytest.raises(ConfigError, match=r"zero_optimization\.allgather_bucket_size: .*\"auto\" is not accepted"):
        load(zero_optimization={"allgather_bucket_size": "auto"})
    with pytest.raises(ConfigError, match=r"optimizer\.params\.momentum: .*\"auto\" is not accepted"):
        load(optimizer={"type": "SGD", "params": {"momentum": "auto"}})
    with pytest.raises(ConfigError, match=r"fp16\.loss_scale: .*\"auto\" is not accepted"):
        load(fp16={"loss_scale": "auto"})


def test_every_auto_key_accepts_auto():
    cfg = ZeroConfig.load(HF_STYLE_CONFIG)
    assert cfg.unresolved_keys() == list(AUTO_KEYS)


# ------------------------------------------------- sections, aliases, compat


def test_offload_param_needs_stage_3():
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_param\.device: offloading parameters "
                                          r"\(device \"cpu\"\) needs stage 3, but stage is 2"):
        load(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}})
    cfg = load(zero_optimization={"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}})
    assert cfg.zero_optimization.offload_param.enabled and cfg.zero_optimization.offload_param.pin_memory


def test_offload_optimizer_needs_zero():
    with pytest.raises(ConfigError, match=r"offload_optimizer\.device: offloading the optimizer .* stage is 0"):
        load(zero_optimization={"offload_optimizer": {"device": "cpu"}})


def test_offload_optimizer_only_keys():
    cfg = load(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu", "delayed_update": True,
                                                                    "threads": 4, "ratio": 0.5}})
    off = cfg.zero_optimization.offload_optimizer
    assert (off.device, off.delayed_update, off.threads, off.ratio) == ("cpu", True, 4, 0.5)
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_param\.delayed_update: only valid in "
                                          r"zero_optimization\.offload_optimizer"):
        load(zero_optimization={"stage": 3, "offload_param": {"device": "cpu", "delayed_update": True}})
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_optimizer\.max_in_cpu: only valid in "
                                          r"zero_optimization\.offload_param"):
        load(zero_optimization={"stage": 3, "offload_optimizer": {"max_in_cpu": 10}})


def test_nvme_offload():
    cfg = load(zero_optimization={"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}},
               aio={"block_size": 262144, "queue_depth": 32})
    assert cfg.zero_optimization.offload_param.nvme_path == "/local_nvme"
    assert cfg.aio.block_size == 262144 and cfg.aio.queue_depth == 32


def test_bfloat16_alias():
    cfg = load(bfloat16={"enabled": True})
    assert cfg.bf16 == BF16Config(enabled=True)
    assert cfg.compute_dtype == torch.bfloat16
    assert cfg == load(bf16={"enabled": True})
    with pytest.raises(ConfigError, match=r"bfloat16: give either \"bf16\" or its alias \"bfloat16\", not both"):
        load(bf16={"enabled": True}, bfloat16={"enabled": True})
    with pytest.raises(ConfigError, match=r"unknown key 'bfloat16\.enabeld'; did you mean 'enabled'\?"):
        load(bfloat16={"enabeld": True})


def test_fp16_and_bf16_both_enabled():
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        load(fp16={"enabled": True}, bf16={"enabled": True})


def test_old_zero_aliases():
    cfg = load(zero_optimization={"stage": 2, "cpu_offload": True})
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    cfg = load(zero_optimization={"stage": 3, "stage3_gather_fp16_weights_on_model_save": True})
    assert cfg.zero_optimization.stage3_gather_16bit_weights_on_model_save is True
    with pytest.raises(ConfigError, match=r"zero_optimization\.cpu_offload: cpu_offload=true contradicts "
                                          r"offload_optimizer\.device \"nvme\""):
        load(zero_optimization={"stage": 3, "cpu_offload": True,
                                "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}})


def test_fp16_options():
    fp16 = load(fp16={"enabled": True, "loss_scale": 128, "hysteresis": 2, "min_loss_scale": 0.5}).fp16
    assert fp16 == FP16Config(enabled=True, loss_scale=128.0, hysteresis=2, min_loss_scale=0.5)
    assert not fp16.dynamic and fp16.initial_scale == 128.0
    assert load(fp16={"initial_scale_power": 8}).fp16.initial_scale == 256.0


def test_optimizer_and_scheduler_normalised():
    cfg = load(
        optimizer={"type": "adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "torch_adam": True,
                                              "adam_w_mode": False}},
        scheduler={"type": "warmupcosinelr", "params": {"total_num_steps": 100, "warmup_num_steps": 1e1,
                                                        "cos_min_ratio": 0.1, "warmup_type": "linear"}},
    )
    assert cfg.optimizer.type == "Adam"
    assert cfg.optimizer.params["betas"] == (0.9, 0.95)
    assert cfg.scheduler.type == "WarmupCosineLR"
    assert cfg.scheduler.params["warmup_num_steps"] == 10
    assert cfg.optimizer.params["lr"] == 1e-3
    with pytest.raises(TypeError):
        cfg.optimizer.params["lr"] = 1.0  # type: ignore[index]
    sgd = load(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}).optimizer
    assert sgd.params == {"lr": 0.1, "momentum": 0.9, "nesterov": True}


def test_compat_keys_accepted():
    cfg = load(
        steps_per_print=100,
        wall_clock_breakdown=True,
        dump_state=False,
        memory_breakdown=False,
        prescale_gradients=True,
        gradient_predivide_factor=2.0,
        flops_profiler={"enabled": False, "profile_step": 1, "anything": [1, 2]},
        tensorboard={"enabled": True, "output_path": "x"},
        wandb={"enabled": False},
        csv_monitor={"enabled": False},
        comet={},
        comms_logger={"enabled": True},
        activation_checkpointing={"partition_activations": True, "cpu_checkpointing": False},
        checkpoint={"tag_validation": "Warn"},
        elasticity={"enabled": False, "max_train_batch_size": 1000},
        amp={"enabled": False},
        zero_force_ds_cpu_optimizer=False,
        zero_allow_untested_optimizer=True,
        data_types={"grad_accum_dtype": "fp32"},
        communication_data_type="bf16",
        seq_parallel_communication_data_type="fp32",
        sparse_gradients=False,
        bf16={"enabled": True, "immediate_grad_update": True, "check_grad_overflow": False},
        zero_optimization={
            "stage": 3,
            "elastic_checkpoint": False,
            "load_from_fp32_weights": True,
            "memory_efficient_linear": True,
            "use_multi_rank_bucket_allreduce": True,
            "zero_hpz_partition_size": 1,
            "zero_quantized_weights": False,
            "zero_quantized_gradients": False,
            "mics_shard_size": -1,
            "round_robin_gradients": True,
            "ignore_unused_parameters": False,
            "offload_optimizer": {"device": "cpu", "pipeline_read": False, "pipeline_write": False},
        },
    )
    assert cfg.prescale_gradients is True and cfg.gradient_predivide_factor == 2.0
    assert cfg.steps_per_print == 100 and cfg.wall_clock_breakdown is True
    assert cfg.grad_accum_dtype == "fp32" and cfg.communication_data_type == "bf16"
    assert cfg.zero_allow_untested_optimizer is True
    assert cfg.zero_optimization.round_robin_gradients and not cfg.zero_optimization.ignore_unused_parameters


def test_compat_keys_are_still_type_checked():
    with pytest.raises(ConfigError, match=r"tensorboard: expected a JSON object, got true"):
        load(tensorboard=True)
    with pytest.raises(ConfigError, match=r"zero_optimization\.elastic_checkpoint: expected true or false"):
        load(zero_optimization={"elastic_checkpoint": "yes"})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # MiCS / ZeRO++ combinations that are not built (docs/scale.md)
        ({"zero_optimization": {"zero_quantized_weights": True}},
         r"zero_optimization\.zero_quantized_weights: ZeRO\+\+ \(zero_quantized_weights\) needs stage 3, but stage is 0"),
        ({"zero_optimization": {"stage": 2, "zero_quantized_gradients": True}},
         r"zero_optimization\.zero_quantized_gradients: ZeRO\+\+ .* needs stage 3, but stage is 2"),
        ({"zero_optimization": {"stage": 1, "zero_hpz_partition_size": 8}},
         r"zero_optimization\.zero_hpz_partition_size: ZeRO\+\+ .* needs stage 3"),
        ({"zero_optimization": {"mics_shard_size": 8}}, r"zero_optimization\.mics_shard_size: 8 needs stage 1, 2 or 3"),
        ({"zero_optimization": {"stage": 3, "mics_shard_size": 2, "zero_hpz_partition_size": 2}},
         r"zero_optimization\.mics_shard_size: MiCS .* cannot be combined with ZeRO\+\+"),
        ({"zero_optimization": {"stage": 3, "mics_shard_size": 2, "mics_hierarchical_params_gather": True}},
         r"zero_optimization\.mics_hierarchical_params_gather: true is not supported here"),
        ({"elasticity": {"enabled": True}}, r"elasticity\.enabled: true is not supported here"),
        ({"amp": {"enabled": True, "opt_level": "O1"}}, r"amp\.enabled: true is not supported here"),
        ({"sparse_gradients": True}, r"sparse_gradients: true is not supported here"),
        ({"fp16": {"fp16_master_weights_and_grads": True}}, r"fp16\.fp16_master_weights_and_grads: true is not"),
    ],
)
def test_unsupported_features_rejected(config, message):
    with pytest.raises(ConfigError, match=message):
        ZeroConfig.load(config)


def test_docs_mirror_compat_and_auto_tables():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for key in list(COMPAT_KEYS) + list(AUTO_KEYS):
        assert f"`{key}`" in docs, key


# ------------------------------------------------------------- immutability


def test_frozen_and_validated_at_construction():
    cfg = ZeroConfig.load(ISSUE_CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train_batch_size = 8  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"device: expected one of"):
        OffloadConfig(device="gpu")
    with pytest.raises(ConfigError, match=r"zero config <dict>: gradient_accumulation_steps: expected an integer"):
        ZeroConfig(gradient_accumulation_steps=0)
    # a section built on its own names keys relative to itself
    with pytest.raises(ConfigError, match=r"^reduce_bucket_size: expected an integer >= 1"):
        dataclasses.replace(cfg.zero_optimization, reduce_bucket_size=-1)


def test_pickle_copy_hash():
    cfg = ZeroConfig.load(HF_STYLE_CONFIG).resolve(2, HF_VALUES)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg
    assert hash(cfg) == hash(copy.deepcopy(cfg))


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("config", [ISSUE_CONFIG, HF_STYLE_CONFIG, {}], ids=["issue", "hf", "empty"])
def test_to_dict_round_trips(config):
    cfg = ZeroConfig.load(config)
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert ZeroConfig.load(data) == cfg
    resolved = cfg.resolve(2, HF_VALUES if config is HF_STYLE_CONFIG else None)
    assert ZeroConfig.load(json.loads(json.dumps(resolved.to_dict()))) == resolved


def test_to_dict_round_trips_through_a_file(tmp_path: Path):
    cfg = load(zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/n",
                                                                    "threads": 2}},
               scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3}}, data_types={"grad_accum_dtype":
                                                                                            "bf16"})
    path = tmp_path / "out.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert ZeroConfig.load(path) == cfg


# ------------------------------------------------------------------ resolve


def test_resolve_fills_hf_style_config():
    cfg = ZeroConfig.load(HF_STYLE_CONFIG)
    r = cfg.resolve(4, HF_VALUES)
    assert r is not cfg and cfg.unresolved_keys() == list(AUTO_KEYS)
    assert r.unresolved_keys() == []
    assert (r.train_batch_size, r.train_micro_batch_size_per_gpu, r.gradient_accumulation_steps) == (32, 4, 2)
    assert r.gradient_clipping == 1.0
    assert r.fp16.enabled is False and r.bf16.enabled is True and r.compute_dtype == torch.bfloat16
    assert r.fp16.hysteresis == 2  # untouched
    assert dict(r.optimizer.params) == {"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    assert r.scheduler.params["total_num_steps"] == 1000 and r.scheduler.params["warmup_num_steps"] == 100
    assert r.zero_optimization.reduce_bucket_size == 1024 * 1024
    assert r.zero_optimization.stage3_prefetch_bucket_size == int(0.9 * 1024 * 1024)
    assert r.zero_optimization.stage3_param_persistence_threshold == 10 * 1024


def test_resolve_defaults_without_values():
    cfg = load(
        train_micro_batch_size_per_gpu="auto",
        gradient_clipping="auto",
        fp16={"enabled": "auto"},
        bf16={"enabled": "auto"},
        zero_optimization={"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                           "stage3_param_persistence_threshold": "auto"},
    )
    with pytest.raises(ConfigError, match=r"still \"auto\"; call resolve\(\) first"):
        cfg.compute_dtype
    r = cfg.resolve(2)
    assert r.gradient_clipping == 0.0 and r.compute_dtype == torch.float32
    assert r.train_micro_batch_size_per_gpu == 1 and r.train_batch_size == 2
    assert r.zero_optimization.reduce_bucket_size == 500_000_000
    assert r.zero_optimization.stage3_prefetch_bucket_size == 50_000_000
    assert r.zero_optimization.stage3_param_persistence_threshold == 100_000


@pytest.mark.parametrize(
    "key", ["optimizer.params.lr", "optimizer.params.betas", "scheduler.params.total_num_steps"]
)
def test_resolve_requires_values_for_optimizer_and_scheduler_auto(key):
    values = {k: v for k, v in HF_VALUES.items() if k != key}
    with pytest.raises(ConfigError, match=rf"{key.replace('.', r'[.]')} is \"auto\" but no value was given for it; "
                                          r"write a number in the config or pass it through the Trainer's arguments"):
        ZeroConfig.load(HF_STYLE_CONFIG).resolve(2, values)


def test_resolve_concrete_config_value_wins_over_non_explicit_value():
    cfg = load(gradient_accumulation_steps=4, gradient_clipping=0.5, optimizer={"type": "AdamW", "params":
                                                                                {"lr": 1e-4}})
    r = cfg.resolve(1, {"gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "optimizer.params.lr": 1e-3})
    assert r.gradient_accumulation_steps == 4 and r.gradient_clipping == 0.5 and r.optimizer.params["lr"] == 1e-4


@pytest.mark.parametrize(
    ("config", "values", "message"),
    [
        ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2},
         r"zero config <dict>: gradient_accumulation_steps=4 contradicts the value 2 given explicitly by the caller"),
        ({"fp16": {"enabled": True}}, {"fp16.enabled": False},
         r"fp16\.enabled=true contradicts the value false given explicitly"),
        ({"bf16": {"enabled": False}}, {"bf16.enabled": True},
         r"bf16\.enabled=false contradicts the value true given explicitly"),
        ({"gradient_clipping": 1.0}, {"gradient_clipping": 0.5},
         r"gradient_clipping=1\.0 contradicts the value 0\.5"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, {"optimizer.params.lr": 2e-4},
         r"optimizer\.params\.lr=0\.0001 contradicts the value 0\.0002"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}, {"optimizer.params.betas": (0.9, 0.999)},
         r"optimizer\.params\.betas=\[0\.9, 0\.95\] contradicts the value \[0\.9, 0\.999\]"),
        ({"train_micro_batch_size_per_gpu": 8}, {"train_micro_batch_size_per_gpu": 4},
         r"train_micro_batch_size_per_gpu=8 contradicts the value 4"),
    ],
)
def test_resolve_explicit_contradictions_name_both(config, values, message):
    cfg = ZeroConfig.load(config)
    with pytest.raises(ConfigError, match=message):
        cfg.resolve(1, values, explicit=values.keys())
    cfg.resolve(1, values)  # not explicit: the config value wins, no error


def test_resolve_explicit_equal_values_are_fine():
    cfg = load(gradient_clipping=1.0, optimizer={"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999]}},
               train_micro_batch_size_per_gpu=4)
    values = {"gradient_clipping": 1, "optimizer.params.lr": 0.0001 * (1 + 1e-12),
              "optimizer.params.betas": (0.9, 0.999), "train_micro_batch_size_per_gpu": 4}
    r = cfg.resolve(2, values, explicit=values.keys())
    assert r.train_batch_size == 8


def test_resolve_explicit_value_fills_absent_batch_key_and_is_checked():
    cfg = load(train_batch_size=256, gradient_accumulation_steps=4)
    # not explicit: the config alone determines micro (256 / (4 * 4))
    assert cfg.resolve(4, {"train_micro_batch_size_per_gpu": 8}).train_micro_batch_size_per_gpu == 16
    # explicit: it is used, and the arithmetic no longer holds
    with pytest.raises(ConfigError, match=r"train_batch_size 256 != train_micro_batch_size_per_gpu 8 × "
                                          r"gradient_accumulation_steps 4 × world size 4 \(= 128\)"):
        cfg.resolve(4, {"train_micro_batch_size_per_gpu": 8}, explicit={"train_micro_batch_size_per_gpu"})


def test_resolve_values_fill_absent_batch_keys_when_undetermined():
    r = ZeroConfig.load({}).resolve(2, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3})
    assert (r.train_batch_size, r.train_micro_batch_size_per_gpu, r.gradient_accumulation_steps) == (48, 8, 3)
    r = load(train_batch_size=64).resolve(2, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1})
    assert (r.train_batch_size, r.train_micro_batch_size_per_gpu, r.gradient_accumulation_steps) == (64, 8, 4)


def test_resolve_rejects_unknown_value_keys_and_bad_values():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.params\.lrr' in resolve\(\) values; did you "
                                          r"mean 'optimizer\.params\.lr'\?"):
        ZeroConfig().resolve(1, {"optimizer.params.lrr": 1e-3})
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu: expected an integer from 1 to 2147483647"):
        ZeroConfig().resolve(1, {"train_micro_batch_size_per_gpu": 0})
    with pytest.raises(ConfigError, match=r"fp16\.enabled: expected true or false"):
        load(fp16={"enabled": "auto"}).resolve(1, {"fp16.enabled": "yes"})
    with pytest.raises(ConfigError, match=r"world_size: expected an integer >= 1, got 0"):
        ZeroConfig().resolve(0)


def test_resolve_fp16_and_bf16_both_enabled():
    cfg = load(fp16={"enabled": "auto"}, bf16={"enabled": True})
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        cfg.resolve(1, {"fp16.enabled": True})


# ----------------------------------------------------------- batch arithmetic


def batch(world, **given):
    r = ZeroConfig.load(given).resolve(world)
    return r.train_batch_size, r.train_micro_batch_size_per_gpu, r.gradient_accumulation_steps


def test_batch_all_three_consistent():
    assert batch(2, train_batch_size=64, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=4) == (64, 8, 4)


def test_batch_all_three_inconsistent():
    with pytest.raises(ConfigError, match=r"train_batch_size 256 != train_micro_batch_size_per_gpu 8 × "
                                          r"gradient_accumulation_steps 4 × world size 2 \(= 64\); fix one of them "
                                          r"or set it to \"auto\""):
        batch(2, train_batch_size=256, train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=4)


def test_batch_tbs_and_micro():
    assert batch(4, train_batch_size=128, train_micro_batch_size_per_gpu=8) == (128, 8, 4)
    with pytest.raises(ConfigError, match=r"train_batch_size 100 is not divisible by train_micro_batch_size_per_gpu "
                                          r"8 × world size 4 \(= 32\); cannot derive gradient_accumulation_steps"):
        batch(4, train_batch_size=100, train_micro_batch_size_per_gpu=8)


def test_batch_tbs_and_gas():
    assert batch(4, train_batch_size=128, gradient_accumulation_steps=2) == (128, 16, 2)
    with pytest.raises(ConfigError, match=r"cannot derive train_micro_batch_size_per_gpu"):
        batch(4, train_batch_size=100, gradient_accumulation_steps=2)


def test_batch_micro_and_gas():
    assert batch(3, train_micro_batch_size_per_gpu=5, gradient_accumulation_steps=2) == (30, 5, 2)


def test_batch_only_tbs():
    assert batch(4, train_batch_size=32) == (32, 8, 1)
    with pytest.raises(ConfigError, match=r"train_batch_size 30 is not divisible by world size 4 \(= 4\)"):
        batch(4, train_batch_size=30)


def test_batch_only_micro():
    assert batch(4, train_micro_batch_size_per_gpu=6) == (24, 6, 1)


def test_batch_only_gas():
    assert batch(4, gradient_accumulation_steps=8) == (32, 1, 8)


def test_batch_none():
    assert batch(5) == (5, 1, 1)


def test_batch_auto_without_values_is_derived():
    assert batch(2, train_batch_size=AUTO, train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=AUTO) == (
        8, 4, 1)


# ---------------------------------------------------- leniency (issue 13.9)


@pytest.mark.parametrize("value", [1e30, 2.0 ** 60, 2 ** 40, 1.5, float("inf")])
@pytest.mark.parametrize("key", ["train_micro_batch_size_per_gpu", "train_batch_size",
                                 "gradient_accumulation_steps"])
def test_absurd_or_non_integral_batch_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: expected an integer from 1 to 2147483647 or null or \"auto\", got "):
        load(**{key: value})


def test_integral_float_batch_value_is_still_taken_exactly():
    assert load(train_micro_batch_size_per_gpu=4.0).train_micro_batch_size_per_gpu == 4


def test_resolve_refuses_absurd_batch_value():
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu: expected an integer from 1"):
        ZeroConfig().resolve(1, {"train_micro_batch_size_per_gpu": 1e30})


def test_huge_integral_float_is_refused_not_rounded():
    # 2**53 + 2 is exact in float but 1e17 is not what anyone typed as a count.
    with pytest.raises(ConfigError, match=r"zero_optimization\.reduce_bucket_size: expected an integer"):
        load(zero_optimization={"reduce_bucket_size": 1e17})


def test_offload_param_buffer_count_1_is_refused_with_reason():
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_param\.buffer_count: must be >= 2 .*got 1"):
        load(zero_optimization={"stage": 3, "offload_param": {"device": "cpu", "buffer_count": 1}})
    cfg = load(zero_optimization={"stage": 3, "offload_param": {"device": "cpu", "buffer_count": 2}})
    assert cfg.zero_optimization.offload_param.buffer_count == 2


def test_aio_block_size_must_be_a_multiple_of_4096():
    with pytest.raises(ConfigError, match=r"aio\.block_size: must be a multiple of 4096 .*got 1000"):
        load(aio={"block_size": 1000})
    assert load(aio={"block_size": 8192}).aio.block_size == 8192


@pytest.mark.parametrize("value, expected", [(1, True), (0, False), (True, True)])
def test_int_0_1_accepted_as_bool_like_deepspeed(value, expected):
    cfg = load(zero_allow_untested_optimizer=value, fp16={"enabled": value})
    assert cfg.zero_allow_untested_optimizer is expected and cfg.fp16.enabled is expected


@pytest.mark.parametrize("value", [2, -1, 1.0, "1"])
def test_other_values_are_not_bools(value):
    with pytest.raises(ConfigError, match=r"zero_allow_untested_optimizer: expected true or false \(or 0/1\)"):
        load(zero_allow_untested_optimizer=value)
