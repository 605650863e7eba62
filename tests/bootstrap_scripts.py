"""Stock-style training scripts for tests/test_bootstrap.py, as users write them: no ``import
hf_zero`` anywhere. The tests write them to a temporary directory and launch them under
``python -m hf_zero.run`` / ``accelerate launch`` / ``hf-zero launch``.

Every script builds the model and data of tests/models.py / tests/integration_scenarios.py
(``build("llama")``, ``samples(n)``) itself, so the reference run in the test process starts from
bit-identical weights and samples. Each rank writes ``result_rank<r>.json`` to its output folder:
the per-step losses and the class names of the Trainer / Accelerator it ran with.
"""

COMMON = '''
import json, os, sys
import torch

VOCAB, SEQ = 96, 12


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def samples(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


def classes(obj):
    return [c.__name__ for c in type(obj).__mro__]


def write(out_dir, rank, result):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"result_rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
'''

#: HfArgumentParser over stock TrainingArguments, a stock Trainer (``--deepspeed`` on its
#: command line, or nothing and HF_ZERO_CONFIG). ``ZERO_CALLBACK=path`` in the environment makes
#: it pass ``callbacks=[hf_zero.ZeroCallback(path)]`` (the only case that imports hf_zero).
TRAINER = COMMON + '''
from datasets import Dataset
from transformers import HfArgumentParser, Trainer, TrainingArguments


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    ids = samples(48).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    callbacks = None
    if os.environ.get("ZERO_CALLBACK"):
        import hf_zero

        callbacks = [hf_zero.ZeroCallback(os.environ["ZERO_CALLBACK"])]
    trainer = Trainer(model=build_model(), args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    write(args.output_dir, args.process_index, {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "trainer": classes(trainer), "accelerator": classes(trainer.accelerator),
        "world": args.world_size, "deepspeed_arg": args.deepspeed})


if __name__ == "__main__":
    main()
'''

#: TRL: SFTConfig parsed by HfArgumentParser, a stock SFTTrainer on a pre-tokenized dataset with a
#: word-level tokenizer built in place (no download).
SFT = COMMON + '''
from datasets import Dataset
from tokenizers import Tokenizer, models as tm
from transformers import HfArgumentParser, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer


def tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tm.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", unk_token="t1")


def main():
    (args,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses()
    ids = samples(48).tolist()
    data = Dataset.from_dict({"input_ids": ids})
    trainer = SFTTrainer(model=build_model(), args=args, train_dataset=data, processing_class=tokenizer())
    trainer.train()
    write(args.output_dir, args.process_index, {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "trainer": classes(trainer), "accelerator": classes(trainer.accelerator), "world": args.world_size})


if __name__ == "__main__":
    main()
'''

#: accelerate's own example shape: a stock Accelerator, a train loader (batch 2) and an eval loader
#: (batch 4) prepared in one call with the model, optimizer and scheduler; accumulation 2, clipping.
ACCELERATE = COMMON + '''
from accelerate import Accelerator
from torch.utils.data import DataLoader

LR, CLIP = 1e-2, 0.5


def main():
    out_dir = sys.argv[1]
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = build_model()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    train = [{"input_ids": x, "labels": x.clone()} for x in samples(24)]
    evals = [{"input_ids": x, "labels": x.clone()} for x in samples(8, seed=5)]
    train_dl = DataLoader(train, batch_size=2, shuffle=False)
    eval_dl = DataLoader(evals, batch_size=4, shuffle=False)
    model, opt, train_dl, eval_dl, sched = accelerator.prepare(model, opt, train_dl, eval_dl, sched)
    losses, pending = [], []
    model.train()
    for batch in train_dl:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            pending.append(loss.item())
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                losses.append(sum(pending) / len(pending))
                pending = []
    model.eval()
    eval_losses = []
    with torch.no_grad():
        for batch in eval_dl:
            eval_losses.append(accelerator.gather_for_metrics(model(**batch).loss.reshape(1)).mean().item())
    cfg = getattr(accelerator, "zero_config", None)
    write(out_dir, accelerator.process_index, {
        "losses": losses, "eval_losses": eval_losses, "accelerator": classes(accelerator),
        "world": accelerator.num_processes,
        "micro": getattr(cfg, "train_micro_batch_size_per_gpu", None),
        "stage": getattr(getattr(accelerator, "zero_engine", None), "stage", None)})


if __name__ == "__main__":
    main()
'''

#: A stock Accelerator given accelerate's own ``DeepSpeedPlugin(hf_ds_config=path)`` (argv[1]);
#: one optimizer step; argv[2] is the output folder.
DEEPSPEED_PLUGIN = COMMON + '''
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from torch.utils.data import DataLoader


def main():
    accelerator = Accelerator(cpu=True, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=sys.argv[1]))
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dl = DataLoader([{"input_ids": x, "labels": x.clone()} for x in samples(8)], batch_size=4)
    model, opt, dl = accelerator.prepare(model, opt, dl)
    batch = next(iter(dl))
    loss = model(**batch).loss
    accelerator.backward(loss)
    opt.step()
    engine = getattr(accelerator, "zero_engine", None)
    write(sys.argv[2], accelerator.process_index, {
        "accelerator": classes(accelerator), "loss": loss.item(),
        "stage": getattr(engine, "stage", None), "steps": getattr(engine, "global_steps", None),
        "micro": getattr(getattr(accelerator, "zero_config", None), "train_micro_batch_size_per_gpu", None)})


if __name__ == "__main__":
    main()
'''
