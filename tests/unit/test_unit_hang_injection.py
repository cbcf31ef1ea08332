"""The testbed's ``block`` hang freezes the rank in its own code, never inside a hook."""

import signal
import sys
import types

from ringwatch.cluster import _job


def _frame_from(module_name: str):
    """A frame whose code runs as module ``module_name``, called from this test."""
    def where():
        return sys._getframe()

    return types.FunctionType(where.__code__, {"__name__": module_name, "sys": sys})()


def test_a_frame_inside_the_agent_is_told_apart():
    assert _job._in_ringwatch_agent(_frame_from("ringwatch.agent.capture._recorder"))
    assert not _job._in_ringwatch_agent(_frame_from("ringwatch.cluster._pipeline"))
    assert not _job._in_ringwatch_agent(sys._getframe())
    assert not _job._in_ringwatch_agent(None)


def test_a_hang_landing_in_a_hook_is_sent_again_instead(monkeypatch):
    sent = []

    class Timer:  # runs at once, records the signal instead of sending it
        def __init__(self, delay_s, fn, args):
            self.delay_s, self.args = delay_s, args

        def start(self):
            sent.append((self.delay_s, self.args))

    monkeypatch.setattr(_job.threading, "Timer", Timer)
    _job._block_forever(signal.SIGUSR1, _frame_from("ringwatch.agent.capture._pg_hooks"))
    assert sent == [(_job.HANG_RETRY_S, (_job.os.getpid(), signal.SIGUSR1))]
