"""The settings of `tcli expand-tree` and of the loop's ``[expand]`` table, declared once
(docs/design.md §4.17): how many extra tokens a prompt's tree gets, and how they are spread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tcli.config.spec import Options, at_least, setting
from tcli.errors import UsageError


@dataclass(frozen=True)
class ExpandOptions(Options):
    """More children where a sampled tree's outcomes diverge (expand-tree, loop); flags
    --expand-*."""

    TABLE: ClassVar[str] = "expand"
    FLAG_PREFIX: ClassVar[str] = "expand-"

    tokens: int = setting(0, "Extra sampled tokens per prompt for new children (0 = off; "
                          "expand-tree needs > 0). A child is drawn only when what is left "
                          "covers its longest continuation (the records' max_new_tokens minus "
                          "the node's prefix), so a prompt never gets more than this.",
                          check=at_least(0))
    width: int = setting(2, "New children per chosen node and round (fewer when the budget left "
                         "covers fewer).", check=at_least(1))
    rounds: int = setting(2, "Passes over the ranked nodes: what continuations that stopped early "
                          "left of the budget goes to the next pass.", check=at_least(1))

    @property
    def enabled(self) -> bool:
        return self.tokens > 0

    def require_budget(self) -> None:
        """expand-tree without a budget would only copy its input: a usage error."""
        if not self.enabled:
            raise UsageError(f"{self.label('tokens')} must be > 0 (the extra sampled tokens per "
                             "prompt)")

    def check_sampling(self, mode: str, mode_label: str) -> None:
        """The loop expands trees only: independent samples have no inner nodes."""
        if self.enabled and mode != "tree":
            raise UsageError(f"{self.label('tokens')} > 0 needs tree-sampled groups: set "
                             f'{mode_label} to "tree"')
