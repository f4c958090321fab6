"""The long tools' progress: a bar with the time left on a terminal, nothing in logs and pipes."""

from __future__ import annotations

import io

from alignfl_app.tools import progress as progress_module
from alignfl_app.tools.progress import progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in an operator's shell."""

    def isatty(self) -> bool:
        return True


def test_off_a_terminal_nothing_is_shown_and_steps_are_counted():
    stream = io.StringIO()
    with progress("sweep", 3, stream) as steps:
        for cell in ("a", "b", "c"):
            steps.doing(cell)
            steps.advance()
    assert steps.done == 3 and stream.getvalue() == ""


def test_on_a_terminal_the_bar_shows_the_steps_done_and_the_time_left():
    stream = Terminal()
    with progress("sweep", 3, stream) as steps:
        steps.doing("mnist-eps-1")
        steps.advance()
        steps.advance()
    shown = stream.getvalue()
    assert "sweep" in shown and "2/3" in shown and "left" in shown and "mnist-eps-1" in shown
    assert steps.done == 2 and not progress_module._shown  # the display is gone with the tool's loop


def test_a_progress_inside_another_adds_a_line_to_the_one_on_screen():
    stream = Terminal()
    with progress("benchmark", 4, stream) as outer:
        with progress("compare", 2, io.StringIO()) as inner:  # its own stream is not asked: the outer bar shows it
            bar = progress_module._shown[-1]
            assert [t.description for t in bar.tasks] == ["benchmark", "compare"]
            inner.advance(2)
        assert [t.description for t in bar.tasks] == ["benchmark"]
        outer.advance(2)
    assert inner.done == 2 and outer.done == 2 and "compare" in stream.getvalue()


def test_the_time_left_follows_the_mean_time_of_the_steps_done_however_long_they_take():
    now = [1000.0]
    stream = Terminal()
    with progress("compare", 3, stream, clock=lambda: now[0]) as steps:
        now[0] += 600  # one run of ten minutes: far past rich's default 30 s window
        steps.advance()
        task = progress_module._shown[-1].tasks[0]
        assert task.time_remaining == 1200  # two more runs at ten minutes each
    assert "0:20:00" in stream.getvalue()
