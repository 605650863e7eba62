"""Integrations of the ZeRO engine with Hugging Face Accelerate and the Transformers Trainer.

``hf_zero.integrations.accelerate``: :class:`ZeroPlugin`, :class:`ZeroAccelerator`.
``hf_zero.integrations.trainer``: :class:`ZeroTrainingArguments`, :class:`ZeroTrainerMixin`,
:class:`ZeroTrainer`, :class:`ZeroCallback`.
``hf_zero.integrations.launch_check``: the start-up check that the launcher started the number of
processes it was asked for.

The modules import accelerate / transformers, so they are loaded on first use only
(``hf_zero.ZeroAccelerator`` etc. resolve lazily).
"""
