"""A row of exclusive choices where the arrow keys choose at once (no Enter needed)."""
from __future__ import annotations

from textual.widgets import RadioSet


class ChoiceRow(RadioSet):
    def on_mount(self) -> None:
        # RadioSet highlights its first button once mounted; start from the chosen one instead
        self.call_after_refresh(self._highlight_pressed)

    def _highlight_pressed(self) -> None:
        if self.pressed_index >= 0:
            self._selected = self.pressed_index

    def action_next_button(self) -> None:
        super().action_next_button()
        if self.is_mounted and self.has_focus:
            self.action_toggle_button()

    def action_previous_button(self) -> None:
        super().action_previous_button()
        if self.is_mounted and self.has_focus:
            self.action_toggle_button()
