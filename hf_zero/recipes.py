"""Recipes: ready-made training runs (model + data + TrainingArguments + ZeRO JSON + launcher).

Note:
    * A recipe is a directory under ``recipes/`` with ``recipe.yaml`` and the ZeRO JSON it names.
      The YAML bundles the model's architecture numbers, so validation, the estimator and
      ``--smoke`` never need the network.
    * :func:`validate` checks, without training: the YAML's keys; that the ZeRO JSON loads and its
      "auto" values resolve against the recipe's TrainingArguments at its world size; the batch
      arithmetic; the memory estimate against the stated hardware; the launcher config exists.
    * :func:`run` trains under whatever launcher started the process (torchrun / accelerate
      launch set the environment; without one it is one process) through ``ZeroTrainer``, then
      writes the sharded checkpoint, consolidates it to Hugging Face safetensors, reloads that with
      ``from_pretrained`` and, where the data has answers, scores exact-match accuracy before and
      after training on held-out prompts.
    * ``smoke=True`` keeps the model class and the ZeRO config but shrinks the architecture (tiny
      hidden size, 2 layers, a character vocabulary, random init) and trains a few steps on the
      shipped demo data: every recipe then runs on a CPU in seconds, through the same code.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
RECIPES_DIR = Path(os.environ.get("HF_ZERO_RECIPES", REPO / "recipes"))
DEMO_DATA = Path(os.environ.get("HF_ZERO_DEMO_DATA", REPO / "data" / "addition"))
RECIPE_FILE = "recipe.yaml"

_REQUIRED = {
    "name": str, "description": str, "hardware": dict, "launcher": dict, "model": dict, "dataset": dict,
    "zero_config": str, "training": dict,
}
_TRAINER_DEFAULTS = {"learning_rate": 5e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8,
                     "weight_decay": 0.0, "max_grad_norm": 1.0, "per_device_train_batch_size": 8,
                     "gradient_accumulation_steps": 1}
#: TrainingArguments a smoke run replaces: a few steps, small batches, nothing saved by the Trainer.
SMOKE_TRAINING = {"max_steps": 3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                  "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "warmup_steps": 0,
                  "dataloader_num_workers": 0, "num_train_epochs": 1}
SMOKE_ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}


class RecipeError(ValueError):
    """A recipe that does not parse or does not validate; the message names the file."""


# ----------------------------------------------------------------------------- finding and loading
def list_recipes() -> List[str]:
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in RECIPES_DIR.glob(f"*/{RECIPE_FILE}"))


def find_recipe(spec: str, missing_ok: bool = False) -> Optional[Path]:
    """A recipe name (``tiny``), its directory, or its YAML file -> the YAML path."""
    p = Path(spec)
    for cand in (p, p / RECIPE_FILE, RECIPES_DIR / spec / RECIPE_FILE):
        if cand.is_file() and cand.suffix in (".yaml", ".yml"):
            return cand
    if missing_ok:
        return None
    raise RecipeError(f"no recipe {spec!r}: known recipes are {', '.join(list_recipes()) or '(none)'} "
                      f"(in {RECIPES_DIR}); or pass a recipe directory or its {RECIPE_FILE}")


@dataclass
class Recipe:
    path: Path
    data: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def hardware(self) -> Dict[str, Any]:
        return self.data["hardware"]

    @property
    def on_cpu(self) -> bool:
        return self.hardware.get("accelerator", "gpu") == "cpu"

    @property
    def world_size(self) -> int:
        hw = self.hardware
        return int(hw.get("processes_per_node", hw.get("gpus_per_node", 1))) * int(hw.get("nodes", 1))

    @property
    def per_node(self) -> int:
        hw = self.hardware
        return int(hw.get("processes_per_node", hw.get("gpus_per_node", 1)))

    @property
    def training(self) -> Dict[str, Any]:
        return self.data["training"]

    @property
    def lora(self) -> Optional[Dict[str, Any]]:
        return self.data["model"].get("lora")

    def zero_path(self) -> Path:
        return self.dir / self.data["zero_config"]

    def zero_dict(self) -> Dict[str, Any]:
        try:
            return json.loads(self.zero_path().read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RecipeError(f"{self.zero_path()}: {exc}") from None

    def architecture(self) -> Dict[str, Any]:
        return dict(self.data["model"]["architecture"])

    def model_shape(self):
        from .estimate import config_from_architecture, shape_from_config

        return shape_from_config(config_from_architecture(self.architecture()),
                                 name=self.data["model"].get("name") or self.name, lora=self.lora)

    def activation_spec(self):
        from .estimate import ActivationSpec

        t = {**_TRAINER_DEFAULTS, **self.training}
        return ActivationSpec(seq_len=int(self.data["dataset"].get("max_length", 2048)),
                              micro_batch=int(t["per_device_train_batch_size"]),
                              recompute=bool(t.get("gradient_checkpointing", False)),
                              act_bytes=2 if (t.get("bf16") or t.get("fp16")) else 4)

    def setup(self):
        from .estimate import Setup

        zo = self.zero_dict().get("zero_optimization", {})
        return Setup(int(zo.get("stage", 0)), zo.get("offload_optimizer", {}).get("device", "none"),
                     zo.get("offload_param", {}).get("device", "none"),
                     float(zo.get("offload_optimizer", {}).get("ratio", 1.0)))


def load_recipe(spec) -> Recipe:
    import yaml

    path = find_recipe(str(spec))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise RecipeError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], kind):
            raise RecipeError(f"{path}: {key!r} must be a {kind.__name__}")
    unknown = set(data) - set(_REQUIRED) - {"measured", "notes"}
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {sorted(unknown)}")
    if "architecture" not in data["model"] or "model_type" not in data["model"]["architecture"]:
        raise RecipeError(f"{path}: model.architecture with model_type and its sizes is required")
    return Recipe(path, data)


# ----------------------------------------------------------------------------- overrides
def _coerce(text: str) -> Any:
    """JSON first (numbers such as 1e-3, true, lists, objects), then YAML, else the string."""
    import yaml

    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(recipe: Recipe, zero: Dict[str, Any], overrides: Sequence[str]) -> Tuple[Recipe, Dict[str, Any]]:
    """``key=value``: a TrainingArguments field, or ``zero.<dotted.key>`` of the ZeRO JSON."""
    data = copy.deepcopy(recipe.data)
    zero = copy.deepcopy(zero)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value")
        value = _coerce(value)
        if key.startswith("zero."):
            node = zero
            parts = key[5:].split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise RecipeError(f"override {item!r}: {part!r} is not an object in the ZeRO config")
            node[parts[-1]] = value
        else:
            from transformers import TrainingArguments

            if key not in TrainingArguments.__dataclass_fields__:
                raise RecipeError(f"override {item!r}: {key!r} is not a TrainingArguments field "
                                  f"(prefix ZeRO config keys with 'zero.')")
            data["training"][key] = value
    return Recipe(recipe.path, data), zero


# ----------------------------------------------------------------------------- validation
def trainer_values(training: Mapping[str, Any], world: int, hidden: Optional[int]) -> Tuple[Dict[str, Any], set]:
    """The values ZeroTrainer fills "auto" with, from the recipe's TrainingArguments values."""
    t = {**_TRAINER_DEFAULTS, **training}
    micro, gas = int(t["per_device_train_batch_size"]), int(t["gradient_accumulation_steps"])
    values = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world, "gradient_clipping": float(t["max_grad_norm"] or 0.0),
        "optimizer.params.lr": t["learning_rate"], "optimizer.params.betas": [t["adam_beta1"], t["adam_beta2"]],
        "optimizer.params.eps": t["adam_epsilon"], "optimizer.params.weight_decay": t["weight_decay"],
        "fp16.enabled": bool(t.get("fp16", False)), "bf16.enabled": bool(t.get("bf16", False)),
        "scheduler.params.warmup_min_lr": 0.0, "scheduler.params.warmup_max_lr": t["learning_rate"],
        "scheduler.params.total_num_steps": int(t.get("max_steps", 1000) if int(t.get("max_steps", -1)) > 0 else 1000),
        "scheduler.params.warmup_num_steps": int(t.get("warmup_steps", 0)) if t.get("warmup_steps", 0) >= 1 else 0,
    }
    if hidden:
        values["hidden_size"] = hidden
    explicit = set(values) - {"hidden_size"}
    if not (t.get("fp16") or t.get("bf16")):
        explicit -= {"fp16.enabled", "bf16.enabled"}
    return values, explicit


@dataclass
class Validation:
    recipe: Recipe
    errors: List[str]
    warnings: List[str]
    estimate: Any = None
    resolved: Any = None

    @property
    def ok(self) -> bool:
        return not self.errors


def validate(recipe: Recipe, zero: Optional[Dict[str, Any]] = None) -> Validation:
    from .config import ConfigError, ZeroConfig
    from .estimate import GB, GPU_USABLE_FRACTION, estimate

    errors: List[str] = []
    warnings: List[str] = []
    where = str(recipe.path)
    zero = recipe.zero_dict() if zero is None else zero
    world = recipe.world_size
    shape = recipe.model_shape()
    resolved = None
    try:
        cfg = ZeroConfig.load(zero)
        values, explicit = trainer_values(recipe.training, world, shape.hidden_size)
        resolved = cfg.resolve(world_size=world, values=values, explicit=explicit)
    except ConfigError as exc:
        errors.append(f"{recipe.zero_path()}: {exc}")
    t = {**_TRAINER_DEFAULTS, **recipe.training}
    micro, gas = int(t["per_device_train_batch_size"]), int(t["gradient_accumulation_steps"])
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    for key in recipe.training:
        if key not in fields or key == "output_dir":
            errors.append(f"{where}: training.{key} is not a TrainingArguments field this runner accepts")
    stated = recipe.data["dataset"].get("global_batch_size")
    if stated is not None and int(stated) != micro * gas * world:
        errors.append(f"{where}: dataset.global_batch_size {stated} != per_device_train_batch_size {micro} x "
                      f"gradient_accumulation_steps {gas} x world size {world} (= {micro * gas * world})")
    if resolved is not None and int(resolved.train_batch_size) != micro * gas * world:
        errors.append(f"{where}: resolved train_batch_size {resolved.train_batch_size} != {micro * gas * world}")
    launcher = recipe.data["launcher"].get("accelerate_config")
    if launcher and not (REPO / launcher).is_file():
        warnings.append(f"{where}: launcher config {launcher} not found")
    try:
        setup = recipe.setup()
        est = estimate(shape, setup, world, recipe.per_node, activations=recipe.activation_spec(),
                       dtype="bf16" if t.get("bf16") else "fp16" if t.get("fp16") else "fp32")
    except ValueError as exc:
        errors.append(f"{where}: {exc}")
        return Validation(recipe, errors, warnings, None, resolved)
    hw = recipe.hardware
    if recipe.on_cpu:
        need = est.node(est.gpu_total + est.cpu)
        have = float(hw["memory_gb"]) * GB
        if need > have * 0.9:
            errors.append(f"{where}: needs {need / GB:.2f} GB of host memory, hardware states {hw['memory_gb']} GB")
    else:
        usable = float(hw["gpu_memory_gb"]) * GB * GPU_USABLE_FRACTION
        if est.gpu_total > usable:
            errors.append(f"{where}: the estimate is {est.gpu_total / GB:.1f} GB per GPU, more than "
                          f"{GPU_USABLE_FRACTION:.0%} of the stated {hw['gpu_memory_gb']} GB")
        if est.cpu and "cpu_memory_gb" in hw and est.node(est.cpu) > float(hw["cpu_memory_gb"]) * GB * 0.9:
            errors.append(f"{where}: offload needs {est.node(est.cpu) / GB:.0f} GB of CPU memory per node, "
                          f"more than 90% of the stated {hw['cpu_memory_gb']} GB")
        if est.nvme and "nvme_gb" in hw and est.node(est.nvme) > float(hw["nvme_gb"]) * GB:
            errors.append(f"{where}: offload needs {est.node(est.nvme) / GB:.0f} GB of NVMe per node, "
                          f"more than the stated {hw['nvme_gb']} GB")
    return Validation(recipe, errors, warnings, est, resolved)


# ----------------------------------------------------------------------------- data
class CharTokenizer:
    """The demo's tokenizer: one id per character of ``0123456789+=``, then EOS and PAD."""

    chars = "0123456789+="

    def __init__(self):
        self.eos_token_id = len(self.chars)
        self.pad_token_id = len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2

    def encode(self, text: str) -> List[int]:
        return [self.chars.index(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "" for i in ids)


def read_jsonl(path: Path, limit: Optional[int] = None) -> List[Dict[str, str]]:
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _prompt_answer_examples(rows, tok, max_length: int, eos: Optional[int]) -> List[Dict[str, List[int]]]:
    out = []
    for r in rows:
        p = tok.encode(r["prompt"]) if isinstance(tok, CharTokenizer) else tok(r["prompt"], add_special_tokens=True)["input_ids"]
        a = tok.encode(r["answer"]) if isinstance(tok, CharTokenizer) else tok(r["answer"], add_special_tokens=False)["input_ids"]
        a = a + ([eos] if eos is not None else [])
        ids = (p + a)[:max_length]
        labels = ([-100] * len(p) + a)[:max_length]
        out.append({"input_ids": ids, "labels": labels})
    return out


ALPACA_TEMPLATE = ("Below is an instruction that describes a task{inp_hint}. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n{inp}### Response:\n")


def format_alpaca(row: Mapping[str, str]) -> Dict[str, str]:
    inp = (row.get("input") or "").strip()
    prompt = ALPACA_TEMPLATE.format(inp_hint=", paired with an input that provides further context" if inp else "",
                                    instruction=row["instruction"].strip(),
                                    inp=f"### Input:\n{inp}\n\n" if inp else "")
    return {"prompt": prompt, "answer": row["output"]}


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats):
        import torch

        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), n), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_data(recipe: Recipe, tok, smoke: bool) -> Tuple[List[Dict[str, List[int]]], List[Dict[str, str]]]:
    """(tokenized train examples, held-out prompt/answer rows for scoring)."""
    ds = recipe.data["dataset"]
    max_length = int(ds.get("max_length", 2048))
    eos = getattr(tok, "eos_token_id", None)
    if smoke or ds.get("format") == "prompt_answer_jsonl":
        root = DEMO_DATA if smoke else (REPO / ds["path"])
        limit = 64 if smoke else None
        train = read_jsonl(root / "train.jsonl", limit)
        test = read_jsonl(root / "test.jsonl", 32 if smoke else ds.get("eval_examples"))
        return _prompt_answer_examples(train, tok, max_length, eos), test
    if ds.get("format") != "alpaca":
        raise RecipeError(f"{recipe.path}: dataset.format must be 'alpaca' or 'prompt_answer_jsonl'")
    from datasets import load_dataset

    raw = load_dataset(ds["name"], split=ds.get("split", "train"))
    held = int(ds.get("eval_examples", 0))
    rows = [format_alpaca(r) for r in raw]
    test, train_rows = rows[:held], rows[held:]
    return _prompt_answer_examples(train_rows, tok, max_length, eos), test


# ----------------------------------------------------------------------------- model
def build_model(recipe: Recipe, smoke: bool, vocab_size: Optional[int]):
    import torch
    from transformers import AutoModelForCausalLM

    from .estimate import config_from_architecture

    name = recipe.data["model"].get("name")
    init = recipe.data["model"].get("init", "pretrained")
    if smoke or init == "random" or not name:
        arch = recipe.architecture()
        if smoke:
            arch.update(SMOKE_ARCH)
            for key in ("layer_types", "sliding_window", "max_window_layers"):
                arch.pop(key, None)
        if vocab_size is not None:
            arch["vocab_size"] = vocab_size
        cfg = config_from_architecture(arch)
        torch.manual_seed(int(recipe.data["model"].get("seed", 0)))
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        t = recipe.training
        dtype = torch.bfloat16 if t.get("bf16") else torch.float16 if t.get("fp16") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if recipe.lora:
        from peft import LoraConfig, get_peft_model

        lora = dict(recipe.lora)
        model = get_peft_model(model, LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                                                 lora_dropout=float(lora.get("dropout", 0.0)),
                                                 target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))
    return model


def build_tokenizer(recipe: Recipe, smoke: bool):
    if smoke or recipe.data["model"].get("tokenizer") == "char":
        return CharTokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(recipe.data["model"]["name"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- scoring
def answer(model, tok, prompts: Sequence[str], max_new_tokens: int, batch: int = 64) -> List[str]:
    """Greedy answers (unsharded model, one process)."""
    import torch

    model.eval()
    outs: List[str] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            if isinstance(tok, CharTokenizer):
                ids = torch.tensor([tok.encode(p) for p in chunk])  # equal lengths in the demo data
                start = ids.shape[1]
                for _ in range(max_new_tokens):
                    nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, nxt], dim=1)
                for row in ids[:, start:].tolist():
                    text = []
                    for t in row:
                        if t == tok.eos_token_id:
                            break
                        text.append(t)
                    outs.append(tok.decode(text))
            else:
                tok.padding_side = "left"
                enc = tok(list(chunk), return_tensors="pt", padding=True)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def exact_match(model, tok, rows, max_new_tokens: int) -> Tuple[float, List[str]]:
    preds = answer(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    hits = sum(p.strip() == r["answer"].strip() for p, r in zip(preds, rows))
    return hits / max(len(rows), 1), preds


# ----------------------------------------------------------------------------- running
def _say(rank: int, *msg):
    if rank == 0:
        print(*msg, flush=True)


def run(spec: str, overrides: Sequence[str] = (), *, smoke: bool = False, output_dir: Optional[str] = None) -> Dict[str, Any]:
    """Train a recipe under the current launcher; returns a summary (rank 0 fills the scores)."""
    import torch

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    recipe = load_recipe(spec)
    recipe, zero = apply_overrides(recipe, recipe.zero_dict(), overrides)
    out = Path(output_dir or recipe.training.get("output_dir") or (REPO / "runs" / (recipe.name + ("-smoke" if smoke else ""))))
    training = dict(recipe.training)
    training.pop("output_dir", None)
    if smoke:
        training.update(SMOKE_TRAINING)
        training["bf16"] = training["fp16"] = False  # CPU, exact
        for key in ("offload_optimizer", "offload_param"):
            sec = zero.get("zero_optimization", {}).get(key)
            if isinstance(sec, dict) and sec.get("device") == "nvme":
                sec["nvme_path"] = str(out / "nvme")
                (out / "nvme").mkdir(parents=True, exist_ok=True)
    if world != recipe.world_size and not smoke:
        _say(rank, f"note: recipe {recipe.name} is written for {recipe.world_size} process(es); running with {world}. "
                   f"Its global batch is per_device_train_batch_size x gradient_accumulation_steps x {world}.")
    eval_rows_n = int(recipe.data["dataset"].get("eval_examples", 0))
    max_new = int(recipe.data["dataset"].get("max_new_tokens", 4 if smoke else 64))
    tok = build_tokenizer(recipe, smoke)
    train, test = load_data(recipe, tok, smoke)
    vocab = tok.vocab_size if isinstance(tok, CharTokenizer) else None
    model = build_model(recipe, smoke, vocab)
    summary: Dict[str, Any] = {"recipe": recipe.name, "smoke": smoke, "world_size": world, "output_dir": str(out)}
    score = bool(test) and (smoke or eval_rows_n > 0)
    if score and rank == 0 and not recipe.lora:
        acc, _ = exact_match(model, tok, test, max_new)
        summary["accuracy_before"] = acc
        _say(rank, f"exact-match accuracy before training on {len(test)} held-out prompts: {acc:.1%}")
    model.train()

    from transformers.trainer_utils import set_seed

    from .integrations.trainer import ZeroTrainer, ZeroTrainingArguments

    set_seed(int(training.pop("seed", 42)))
    defaults = {"report_to": [], "save_strategy": "no", "logging_steps": 10, "disable_tqdm": False,
                "use_cpu": not torch.cuda.is_available(), "remove_unused_columns": False}

    def make_trainer(zero_cfg):
        args = ZeroTrainingArguments(output_dir=str(out), zero_config=zero_cfg, **{**defaults, **training})
        return ZeroTrainer(model=model, args=args, train_dataset=train, data_collator=Collator(
            tok.pad_token_id if tok.pad_token_id is not None else 0))

    trainer = make_trainer(zero)
    start = time.time()
    result = trainer.train()
    summary["train_seconds"] = time.time() - start
    summary["train_loss"] = float(result.training_loss)
    summary["steps"] = int(result.global_step)

    engine = trainer.zero_engine
    ckpt, hf_dir = out / "checkpoint", out / "model"
    if recipe.lora:
        trainer.save_model(str(out / "adapter"))
        summary["adapter_dir"] = str(out / "adapter")
        _say(rank, f"LoRA adapter written to {out / 'adapter'}")
        _say(rank, json.dumps(summary, default=str))
        return summary
    engine.save_checkpoint(str(ckpt))
    summary["checkpoint_dir"] = str(ckpt)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        from .checkpoint.consolidate import consolidate

        consolidate(str(ckpt), str(hf_dir), progress=False)
        if hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(hf_dir))
        reloaded = AutoModelForCausalLM.from_pretrained(str(hf_dir))
        summary["model_dir"] = str(hf_dir)
        print(f"sharded checkpoint: {ckpt}\nconsolidated Hugging Face model: {hf_dir} (reloaded with from_pretrained)")
        if score:
            acc, preds = exact_match(reloaded, tok, test, max_new)
            summary["accuracy_after"] = acc
            for r, p in list(zip(test, preds))[:5]:
                print(f"  {r['prompt']!r:>12} -> {p!r:<8} (expected {r['answer']!r})")
            print(f"exact-match accuracy on {len(test)} held-out prompts: before {summary.get('accuracy_before', 0):.1%}, "
                  f"after {acc:.1%}")
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
    _say(rank, json.dumps(summary, default=str))
    return summary
