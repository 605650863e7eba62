"""Tiny random-init models of real architectures, and deterministic data, shared by the tests.

Every builder is deterministic in ``seed`` so a worker process and the reference process build
bit-identical models.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 96


def build(name: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight
    elif name == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=64)
        model = MixtralForCausalLM(cfg)
    elif name == "sparse_moe":
        model = SparseMoE()
    else:
        raise ValueError(name)
    return model.to(dtype)


class Expert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MoEBlock(nn.Module):
    """Top-1 routing by token id: expert ``id % n_experts``, so which experts get a gradient
    depends on the data a rank sees. ``unused`` never runs (an unused branch)."""

    def __init__(self, d, n_experts=4):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d) for _ in range(n_experts))
        self.unused = nn.Linear(d, d)

    def forward(self, h, ids):
        x = self.norm(h)
        gate = torch.softmax(self.router(x), dim=-1)
        choice = ids % len(self.experts)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = choice == e
            if mask.any():
                out[mask] = expert(x[mask]) * gate[mask][:, e : e + 1]
        return h + out


class SparseMoE(nn.Module):
    _no_split_modules = ["MoEBlock"]

    def __init__(self, d=24, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(MoEBlock(d) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h, input_ids)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def batches(steps: int, accum: int, world: int, micro: int = 2, seq: int = 12, seed: int = 1, rank_skew: bool = True):
    """``data[step][micro_step][rank]`` -> dict(input_ids, labels).

    With ``rank_skew``, rank r's token ids avoid the residue ``(r + 3) % 4``, so at world sizes
    above one each rank leaves some MoE expert without tokens while another rank uses it.
    """
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(steps):
        step = []
        for _ in range(accum):
            per_rank = []
            for r in range(world):
                ids = torch.randint(0, VOCAB, (micro, seq), generator=g)
                if rank_skew and world > 1:
                    bad = ids % 4 == (r + 3) % 4
                    ids = torch.where(bad, (ids + 1) % VOCAB, ids)
                per_rank.append({"input_ids": ids, "labels": ids.clone()})
            step.append(per_rank)
        data.append(step)
    return data


def make_optimizer(kind: str, params, lr: float = None):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr or 1e-2, weight_decay=0.1)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.1, momentum=0.9, weight_decay=0.01)
    raise ValueError(kind)


def grouped_params(model: nn.Module):
    """Two param groups as the Trainer makes them: decay for matrices, none for the rest."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def reference_run(name: str, opt_kind: str, data, clip: float, freeze=None, wrap=None):
    """The unsharded single-process run on the same global batches. A parameter that gets no
    gradient in a step counts as gradient zero, the engine's documented semantics. ``wrap(model)``,
    if given, is what runs the forwards (e.g. ``torch.compile``); the model itself is returned."""
    model = build(name)
    if freeze:
        for n, p in model.named_parameters():
            if freeze(n):
                p.requires_grad_(False)
    opt = make_optimizer(opt_kind, grouped_params(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = model if wrap is None else wrap(model)
    losses = []
    for step in data:
        n = len(step) * len(step[0])
        total = 0.0
        for micro in step:
            for batch in micro:
                loss = run(**batch).loss
                (loss / n).backward()
                total += loss.item() / n
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return model, losses
