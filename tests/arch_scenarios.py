"""Tiny models of eleven more Hugging Face architectures, and the launched scenario of
tests/test_architectures.py: encoder-only (BERT), encoder-decoder (T5), vision (ViT) and decoder
families with their own quirks (tied embeddings, parallel attention/MLP blocks, ALiBi, scaled
embeddings, a projection around the embedding)."""

from __future__ import annotations

from pathlib import Path

import torch

V = 96
ARCHITECTURES = ["bert", "t5", "qwen2", "mistral", "opt", "neox", "phi", "gemma", "bloom", "falcon", "vit"]
STEPS = 3


def tiny(name: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    h = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48)
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=V, num_hidden_layers=2, max_position_embeddings=64,
                                              hidden_dropout_prob=0, attention_probs_dropout_prob=0, **h))
    if name == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                       num_heads=4, dropout_rate=0, decoder_start_token_id=0))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=V, num_hidden_layers=2, num_key_value_heads=2,
                                                max_position_embeddings=64, **h))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(vocab_size=V, num_hidden_layers=2, num_key_value_heads=2,
                                                    max_position_embeddings=64, **h))
    if name == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                            num_attention_heads=4, max_position_embeddings=64, dropout=0,
                                            word_embed_proj_dim=16))
    if name == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=V, num_hidden_layers=2, max_position_embeddings=64,
                                                    hidden_dropout=0, attention_dropout=0, **h))
    if name == "phi":
        return T.PhiForCausalLM(T.PhiConfig(vocab_size=V, num_hidden_layers=2, max_position_embeddings=64,
                                            resid_pdrop=0, embd_pdrop=0, attention_dropout=0, **h))
    if name == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(vocab_size=V, num_hidden_layers=2, num_key_value_heads=2, head_dim=8,
                                                max_position_embeddings=64, **h))
    if name == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4,
                                                hidden_dropout=0, attention_dropout=0))
    if name == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, hidden_dropout=0, attention_dropout=0))
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=5,
                                                       num_hidden_layers=2, hidden_dropout_prob=0,
                                                       attention_probs_dropout_prob=0, **h))
    raise KeyError(name)


def batch(name: str, step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g), labels=torch.randint(0, 5, (2,), generator=g))
    ids = torch.randint(1, V, (2, 10), generator=g)
    if name == "t5":
        return dict(input_ids=ids, labels=torch.randint(1, V, (2, 6), generator=g))
    return dict(input_ids=ids, labels=ids)


def optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(payload, out_dir: Path):
    """Each architecture at each stage: STEPS steps of one micro-batch of 2 per rank, clipping at
    1.0; rank 0 writes the final full state dict."""
    import hf_zero
    from hf_zero.initialize import init_distributed
    from safetensors.torch import save_file

    rank, world = init_distributed()
    results = {}
    for name in payload["architectures"]:
        for stage in payload["stages"]:
            model = tiny(name)
            cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                   "zero_optimization": {"stage": stage}}
            engine, *_ = hf_zero.initialize(model=model, optimizer=optimizer(model), config=cfg)
            losses = []
            for step in range(STEPS):
                loss = engine(**batch(name, step, rank)).loss
                engine.backward(loss)
                engine.step()
                total = loss.detach().clone()
                torch.distributed.all_reduce(total)
                losses.append(total.item() / world)
            sd = engine.full_state_dict()
            if rank == 0:
                save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(out_dir / f"{name}-{stage}.safetensors"))
            results[f"{name}-{stage}"] = losses
            engine.destroy()
    return results
