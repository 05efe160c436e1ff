"""Everything to do with a lent GPU, in one run-tool call that fits the lease and resumes.

A session that draws a GPU has 15 minutes of device time, machine starts included; one command
runs at most 10 minutes and returns at most 8 files from $OUT. The suite is one prepared call of
at most 9 minutes (plan.py), its steps in priority order (issue 21 item 6):

  setup        (a) install the carried wheels the machine lacks; record the GPU and versions
  build        (a) nlft_kernels._C in place, its CUDA kernel for this GPU (for the tests)
  tests        (a) the tests marked gpu / gpu_too under pytest -n, each stopped after 2 minutes
  headline     (b) copy bandwidth, then nlft_loss (3 logit views, bf16, N=8192, V=128256, fwd+bwd)
                   against 3x Liger CE and torch.compile'd CE: gpu_headline_<device>_<date>.json
  linear_loss  (c) nlft_linear_loss N=8192 D=4096 V=128256 bf16 against Liger FLCE and Cut CE
  train_step   (d) the paper's regime: Llama-3.2-3B shapes, NLFT LoRA r=16 on int8 base weights
                   against ReFT's full fine-tuning with its reference model and value head
  tune         (e) tune_launch on the headline's kernel, over every launch option

Each step runs under an enforced budget; its record, log and results go to $OUT/<step>.tar.gz
and $OUT/suite.json as soon as it ends. benchmarks/results/gpu_suite_state.json records the steps
measured per kernel source hash and GPU; those are skipped next time, so several sessions with a
device complete the plan.

  python -m benchmarks.gpu_suite --plan              # the plan, its time model, the exact call
  python -m benchmarks.gpu_suite --prepare [--check] # here: wheels + tokenizer into .gpu_carry/
  python3 -m benchmarks.gpu_suite --run              # there (the call's command)
  python -m benchmarks.gpu_suite --collect DIR       # here: what the call returned
  python -m benchmarks.gpu_suite --dry-run           # CPU: the plan, then every step on a tiny grid

Modules: plan (limits, grids, time model), state (the state file), wheels (--prepare and the
machine's install), steps (what each step runs), runner (budgets, $OUT, --collect), headline,
probe, smoke (what a CPU checks of the wheels), cli.
"""
