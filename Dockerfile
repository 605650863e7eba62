# hf_zero on CUDA: docker build -t hf-zero .   (usage: docs/recipes.md)
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_ENABLE_HF_TRANSFER=0

WORKDIR /workspace/hf_zero
# dependencies first (cached layer), then the source
COPY pyproject.toml setup.py README.md _hf_zero_autostart.py ./
COPY hf_zero ./hf_zero
# an editable install does not carry the start-up hook (HF_ZERO_CONFIG alone turns hf_zero on): copy it
RUN pip install -e . peft \
    && python -m _hf_zero_autostart install \
    && python -c "import hf_zero, accelerate, transformers, _hf_zero_autostart; print(hf_zero.__version__)"
COPY recipes ./recipes
COPY data ./data
COPY scripts ./scripts
COPY docs ./docs

# accelerate launch needs no `accelerate config`: the recipes pass --config_file
CMD ["hf-zero", "recipes"]
