"""GSM8K, the paper's task, as a :class:`Task`: the embedded data (or any rows with ``question``
and ``answer``), the paper's instruction in the system prompt, the rule judge."""

from __future__ import annotations

import re
from dataclasses import replace

from nlft_kernels.recipes.judgment import Judgment
from nlft_kernels.recipes.rule_judge import judge_response
from nlft_kernels.recipes.tasks.base import Problem, Task, check_split, split_of

# The GSM8K training file gives the train and validation pools (by a hash of the question, as
# for the generated tasks); its test file the test pool.
_ANNOTATION = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def sft_target(solution: str) -> str:
    """GSM8K's reference solution in the form the instruction asks for: no ``<<a*b=c>>`` calculator
    annotations, and ``#### N`` written as ``The answer is N.``"""
    text = _ANNOTATION.sub("", solution).strip()
    return _FINAL.sub(lambda m: f"\nThe answer is {m.group(1).replace(',', '')}.", text)


class GSM8KTask(Task):
    """GSM8K word problems: ``rows`` (``{"train": [...], "test": [...]}``) or the embedded data."""

    name = "gsm8k"
    description = "GSM8K (the paper's task; SmolLM2-135M is at ~1.5% on it)"
    max_new_tokens = 256
    stop_at_blank_line = False  # solutions run over several lines
    share_prefix = False
    has_solver = False

    def __init__(self, rows: dict[str, list[dict]] | None = None):
        from nlft_kernels.recipes.generation import GSM8K_INSTRUCTION

        self.instruction = GSM8K_INSTRUCTION
        self._rows = rows

    def rows(self, file_split: str) -> list[dict]:
        if self._rows is None:
            from nlft_kernels.recipes.data import read_gsm8k

            self._rows = {s: read_gsm8k(s) for s in ("train", "test")}
        return self._rows[file_split]

    def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
        import random

        check_split(split)
        rows = self.rows("test" if split == "test" else "train")
        pool = [r for r in rows if split == "test" or _train_split(r["question"]) == split]
        if count > len(pool):
            raise ValueError(f"gsm8k: asked for {count} {split} problems, the pool has {len(pool)}")
        picked = random.Random(f"gsm8k:{split}:{seed}").sample(pool, count)
        return [self._problem(r, split) for r in picked]

    def _problem(self, row: dict, split: str) -> Problem:
        from nlft_kernels.recipes.rule_judge import extract_answer, format_number

        answer = extract_answer(row["answer"])
        text = "" if answer is None else format_number(answer)
        return replace(Problem("gsm8k", (row["question"],), row["question"], row["answer"], text), split=split)

    def prompt(self, problem: Problem) -> str:
        return problem.question

    def read(self, text: str) -> str:
        return text.strip()

    def judge(self, problem: Problem, response: str) -> Judgment:
        return judge_response(problem.question, response, problem.solution)

    def reference_response(self, problem: Problem) -> str:
        return sft_target(problem.solution)


def _train_split(question: str) -> str:
    """train or validation, for a question of GSM8K's training file (90% / 10%)."""
    return "validation" if split_of("gsm8k", (question,)) == "validation" else "train"
