"""SectionTimer on CUDA: events around each section, no host sync between sections, one when the totals are read
(so timing the ~120 sections of a DSA forward no longer drains the GPU at each one); on CPU: wall time as before.
CUDA is faked: torch.cuda.Event and torch.cuda.synchronize are replaced by counters on a fake clock."""
import pytest
import torch

import sparse_attention
from sparse_attention import SectionTimer

CLOCK = [0.0]


class FakeEvent:
    """torch.cuda.Event(enable_timing=True) on a fake clock; counts its waits."""
    waits = 0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing
        self.t = None

    def record(self, stream=None) -> None:
        self.t = CLOCK[0]

    def elapsed_time(self, end) -> float:
        return 1e3 * (end.t - self.t)

    def synchronize(self) -> None:
        FakeEvent.waits += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    """-> the count of host syncs (torch.cuda.synchronize calls + event waits) so far."""
    synced = [0]
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.__setitem__(0, synced[0] + 1))
    CLOCK[0], FakeEvent.waits = 0.0, 0
    return lambda: synced[0] + FakeEvent.waits


def _section(seconds: float):
    def run():
        CLOCK[0] += seconds
        return seconds
    return run


def test_cuda_sections_sync_once_when_the_totals_are_read(fake_cuda):
    timer = SectionTimer(cuda=True)
    for _ in range(60):  # a DSA forward's ~120 sections
        assert timer.time("indexer", _section(0.5)) == 0.5
        CLOCK[0] += 100.0  # untimed work between sections
        timer.time("attention", _section(2.0))
    assert fake_cuda() == 0  # the old timer synchronised before and after every section: 240 here
    assert timer.totals == {"indexer": pytest.approx(30.0), "attention": pytest.approx(120.0)}
    assert fake_cuda() == 1
    timer.time("indexer", _section(1.0))
    assert timer.totals["indexer"] == pytest.approx(31.0) and fake_cuda() == 2
    assert timer.totals["indexer"] == pytest.approx(31.0) and fake_cuda() == 2  # nothing new: no wait


def test_cpu_sections_are_wall_time_and_never_touch_cuda(fake_cuda, monkeypatch):
    monkeypatch.setattr(sparse_attention.time, "perf_counter", lambda: CLOCK[0])
    timer = SectionTimer()
    timer.time("indexer", _section(0.5))
    timer.time("indexer", _section(0.25))
    assert timer.totals == {"indexer": 0.75} and fake_cuda() == 0
    timer.totals = {"attention": 1.0}  # a resumed stage's totals
    timer.time("attention", _section(1.0))
    assert timer.totals == {"attention": 2.0}


def test_the_retrofit_prefill_share_uses_the_call_span_on_the_same_timeline(fake_cuda):
    from dsa_lab.experiments.retrofit_speed import _timed_plan
    from dsa_lab.interop.retrofit import Plan
    shares = []
    plan, done = _timed_plan(Plan("dsa", top_k=8), shares, cuda=True)
    plan.timer.time("indexer", _section(1.0))
    CLOCK[0] += 5.0
    plan.timer.time("attention", _section(4.0))
    done()
    assert shares == [{"indexer": pytest.approx(0.1), "attention": pytest.approx(0.4)}]
    assert fake_cuda() == 2  # the call's end, then the timer's last event (already complete)
