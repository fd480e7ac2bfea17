"""The signal rules the sweep relies on, with real signals raised in this process."""

from __future__ import annotations

import signal

import pytest

from sweepbp.sweep.signals import Stopped, held, raise_once, stopping


@pytest.fixture(autouse=True)
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_stop_during_a_record_waits_for_the_record():
    steps = []
    with pytest.raises(Stopped) as caught:
        with stopping(), held():
            signal.raise_signal(signal.SIGTERM)
            steps.append("recorded")  # still runs: the signal is held back
    assert steps == ["recorded"]
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143


def test_after_a_stop_further_signals_are_ignored():
    with pytest.raises(Stopped) as caught:
        with stopping():
            signal.raise_signal(signal.SIGINT)
    assert caught.value.exit_code == 130
    signal.raise_signal(signal.SIGINT)  # a second Ctrl-C while the sweep records and exits: nothing happens
    signal.raise_signal(signal.SIGTERM)


def test_a_block_left_normally_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with stopping():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_job_raises_once_and_then_ignores_repeats():
    signal.signal(signal.SIGTERM, raise_once(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # the sweep forwards SIGTERM after the job got Ctrl-C: ignored


def test_a_signal_ignored_before_a_held_block_stays_ignored():
    """The sweep ignores signals once it is stopping; writing the stopped job's files must not revive them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with held():
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C while the killed job is written: nothing happens
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
