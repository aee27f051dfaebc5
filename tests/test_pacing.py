"""Late scheduling's deadline (server/engine/pacing.py): recent device times by step size, recent build times."""

from __future__ import annotations

from hotlora.server.engine.pacing import HISTORY, MIN_WAIT_S, StepPacer, size_of


def test_sizes_are_power_of_two_buckets():
    assert [size_of(t) for t in (1, 2, 3, 4, 5, 32, 33, 256, 257)] == [1, 2, 4, 4, 8, 32, 64, 256, 512]


def test_no_deadline_without_history():
    pacer = StepPacer(margin_s=0.001)
    assert pacer.deadline(10.0, 32) is None
    pacer.built(0.002)
    assert pacer.deadline(10.0, 32) is None  # no step of this size has run yet
    pacer.ran(32, 0.006, waited=0.004)
    assert pacer.deadline(10.0, 64) is None  # another size
    assert pacer.deadline(10.0, 32) == 10.0 + 0.006 - 0.002 - 0.001


def test_deadline_is_conservative_and_forgets():
    """The shortest recent device time of the size, the longest recent build, over the last HISTORY steps; a
    collect that did not wait (the step was done before the host looked) says nothing of the step's length."""
    pacer = StepPacer(margin_s=0.0)
    for device, build in ((0.008, 0.001), (0.005, 0.003), (0.007, 0.002)):
        pacer.ran(20, device, waited=0.001)
        pacer.built(build)
    assert pacer.deadline(1.0, 30) == 1.0 + 0.005 - 0.003
    pacer.ran(20, 0.001, waited=MIN_WAIT_S / 2)  # not recorded
    assert pacer.deadline(1.0, 30) == 1.0 + 0.005 - 0.003
    for _ in range(HISTORY):
        pacer.ran(20, 0.009, waited=0.001)
        pacer.built(0.0005)
    assert pacer.deadline(1.0, 30) == 1.0 + 0.009 - 0.0005
