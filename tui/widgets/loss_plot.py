"""The live loss curve of the Train screen (plotext inside Textual).

Per-step DreamBooth loss is noisy by nature (every step draws a new noise
level), so a moving average is drawn over it: the trend is what matters, and
even the trend says less than the preview pictures do.
"""
from __future__ import annotations

from collections.abc import Sequence

from textual_plotext import PlotextPlot

SMOOTHING_WINDOW = 10


class LossPlot(PlotextPlot):
    """Loss per step, with its moving average once there are enough points."""

    def on_mount(self) -> None:
        self.show_losses([])

    def show_losses(self, losses: Sequence[tuple[int, float]]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.title("loss")
        plt.xlabel("step")
        if losses:
            steps = [step for step, _ in losses]
            values = [loss for _, loss in losses]
            plt.plot(steps, values, marker="braille", color="gray")
            if len(values) >= SMOOTHING_WINDOW:
                plt.plot(steps, moving_average(values, SMOOTHING_WINDOW), marker="braille", color="cyan")
        self.refresh()


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    averages, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averages.append(total / min(index + 1, window))
    return averages
