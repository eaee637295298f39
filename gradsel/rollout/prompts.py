"""Prompts as the model reads them: token ids under the chat template, and the length limit.

Below both the rollout stage and the pre-flight check, which each need them.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradsel.core.errors import GradselError
from gradsel.inputs.problems import Problem


def encode_prompts(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Prompt token ids through the tokenizer's chat template (generation prompt added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise GradselError(
            "the tokenizer has no chat template",
            "use a chat/instruct tokenizer or add a chat_template to tokenizer_config.json",
        )
    out = []
    for p in problems:
        text = tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise GradselError(f"problem {p.problem_id} renders to an empty prompt", "check the prompt column")
        out.append(list(ids))
    return out


def prompt_limit(context: int | None, max_prompt_tokens: int | None) -> int | None:
    """The longest prompt accepted: --max-prompt-tokens, else the model's context less one token
    (a prompt that fills the context leaves no room for a response)."""
    if max_prompt_tokens is not None:
        return max_prompt_tokens
    return context - 1 if context else None


def too_long_error(problems: Sequence[Problem], lengths: Sequence[int], limit: int) -> GradselError | None:
    long = [(p.problem_id, n) for p, n in zip(problems, lengths) if n > limit]
    if not long:
        return None
    shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in long[:8])
    more = f" and {len(long) - 8} more" if len(long) > 8 else ""
    return GradselError(
        f"{len(long)} prompt(s) exceed {limit} tokens under the chat template: {shown}{more}",
        "drop or shorten those rows, or give the model a longer context (--max-model-len, or another model) "
        "(`gradsel check` lists every data source's prompt lengths)",
    )
