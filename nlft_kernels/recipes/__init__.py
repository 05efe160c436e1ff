"""The GSM8K recipe on top of the kernel core and :mod:`nlft_kernels.training`: the rule judge
(:mod:`.rule_judge`), LLM judges and their resumable runner (:mod:`.llm_judge`, :mod:`.judging`),
batched generation and GSM8K accuracy (:mod:`.generation`), generating into a resumable file
(:mod:`.generate_run`), the questions of ``--data`` (:mod:`.questions`), where commands write
(:mod:`.outputs`), model loading and saving (:mod:`.models`), the GSM8K embedded in the package
(:mod:`.data`), the typed errors (:mod:`.errors`) and the ``nlft`` command: one ``main``
(:mod:`.cli`) and a module per subcommand (:mod:`.commands`).

Needs the ``train`` extra (``pip install "nlft-kernels[train]"``: transformers, datasets, peft,
accelerate, gguf, tqdm); the core (``import nlft_kernels``) never imports this package.
"""
