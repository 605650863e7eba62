"""A tiny Llama learns to add two-digit numbers under ZeRO stage 2, on CPU processes.

Run with ``torchrun --nproc_per_node 2 examples/train_tiny.py`` (scripts/demo.sh does).
Each rank sees its own half of every global batch; the engine shards optimizer states and
gradients across the two processes.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_zero

DIGITS = "0123456789+= "
PAD = len(DIGITS)


def encode(a: int, b: int) -> list:
    text = f"{a:02d}+{b:02d}={a + b:03d}"
    return [DIGITS.index(c) for c in text]


def batch(n: int, g: torch.Generator) -> torch.Tensor:
    ab = torch.randint(0, 100, (n, 2), generator=g)
    return torch.tensor([encode(int(a), int(b)) for a, b in ab])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stage", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=PAD + 1, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=16))
    config = {
        "train_batch_size": 128,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
    }
    engine, _, _, _ = hf_zero.initialize(model=model, config=config)
    g = torch.Generator().manual_seed(1000 + engine.rank)
    start = time.time()
    for step in range(args.steps * engine.gradient_accumulation_steps):
        ids = batch(engine.micro_batch_size, g)
        labels = ids.clone()
        labels[:, :6] = -100  # learn only the answer
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        engine.step()
        if engine.rank == 0 and step % (25 * engine.gradient_accumulation_steps) == 0:
            print(f"step {engine.global_steps:4d}  loss {loss.item():.3f}  {time.time() - start:5.1f}s", flush=True)
    if engine.rank == 0:
        report = engine.memory_report()
        print(f"done: {engine.global_steps} steps, model-state bytes on rank 0: {report['model_state_bytes']:,}")


if __name__ == "__main__":
    main()
