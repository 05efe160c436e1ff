"""The GSM8K recipe on top of the kernel core and :mod:`nlft_kernels.training`: what a judge is
(:mod:`.judgment`), the rule judge (:mod:`.rule_judge`), the judge prompt and verdict parser
(:mod:`.judge_prompt`), LLM judges (:mod:`.llm_judge`), judging many rows into a file
(:mod:`.judging`) through a resumable, locked JSONL output (:mod:`.jsonl_store`), the typed errors
the ``nlft`` command maps to exit statuses (:mod:`.errors`), batched generation and GSM8K accuracy
(:mod:`.generation`), generating into a resumable file (:mod:`.generate_run`), the questions of
``--data`` (:mod:`.questions`), where commands write (:mod:`.outputs`), model loading and saving
(:mod:`.models`), the name of the machine a run used (:mod:`.machine`), the GSM8K embedded in the
package (:mod:`.data`) and the ``nlft`` command: one ``main`` (:mod:`.cli`) and a module per
subcommand (:mod:`.commands`).

Needs the ``train`` extra (``pip install "nlft-kernels[train]"``: transformers, datasets, peft,
accelerate, gguf, tqdm, openai); the core (``import nlft_kernels``) never imports this package.
"""
