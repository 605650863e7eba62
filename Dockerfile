# hf_zero on CUDA: docker build -t hf-zero .   (usage: docs/recipes.md)
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_ENABLE_HF_TRANSFER=0

WORKDIR /workspace/hf_zero
# dependencies first (cached layer), then the source
COPY pyproject.toml README.md ./
COPY hf_zero ./hf_zero
RUN pip install -e . peft && python -c "import hf_zero, accelerate, transformers; print(hf_zero.__version__)"
COPY recipes ./recipes
COPY data ./data
COPY scripts ./scripts
COPY docs ./docs

# accelerate launch needs no `accelerate config`: the recipes pass --config_file
CMD ["hf-zero", "recipes"]
