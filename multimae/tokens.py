"""Where each modality's tokens sit in the encoder sequence (the official `input_info`).

The encoder sequence is `[tokens of task 1 | task 2 | ... | global tokens]` before masking; output
adapters and heads use this layout to find a task's tokens and the image size to rebuild maps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLayout:
    """tasks: name -> (start, end) in the unmasked sequence; image_size: (H, W) in pixels."""

    tasks: dict[str, tuple[int, int]]
    image_size: tuple[int, int]
    num_global_tokens: int

    @property
    def num_task_tokens(self) -> int:
        return max((end for _, end in self.tasks.values()), default=0)

    @classmethod
    def from_counts(cls, counts: dict[str, int], image_size: tuple[int, int], num_global_tokens: int) -> TokenLayout:
        tasks, start = {}, 0
        for name, n in counts.items():
            tasks[name] = (start, start + n)
            start += n
        return cls(tasks=tasks, image_size=image_size, num_global_tokens=num_global_tokens)
