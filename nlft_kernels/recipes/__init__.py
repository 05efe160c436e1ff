"""The GSM8K recipe on top of the kernel core and :mod:`nlft_kernels.training`: the rule judge
(:mod:`.rule_judge`), LLM judges and their resumable runner (:mod:`.llm_judge`, :mod:`.judging`),
batched generation and GSM8K accuracy (:mod:`.generation`), model loading and saving
(:mod:`.models`), the GSM8K embedded in the package (:mod:`.data`) and the ``nlft`` command
(:mod:`.cli`).

Needs the ``train`` extra (``pip install "nlft-kernels[train]"``: transformers, datasets, peft,
accelerate, gguf, tqdm); the core (``import nlft_kernels``) never imports this package.
"""
