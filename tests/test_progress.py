import logging

from flows.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_every_interval_with_rate_and_eta(caplog):
    clock = Clock()
    progress = Progress("embed", 1000, every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="flows.embed"):
        clock.now += 5
        progress.update(100)  # before the interval: quiet
        clock.now += 5
        progress.update(100)
        clock.now += 30
        progress.update(300)
        assert progress.close() == 40
    assert [r.getMessage() for r in caplog.records] == [
        "embed: 200/1,000 frames (20.0%), 20.0/s, ETA 0:00:40",
        "embed: 500/1,000 frames (50.0%), 12.5/s, ETA 0:00:40",
        "embed: 500/1,000 frames (50.0%), 12.5/s, ETA 0:00:40 in 0:00:40",
    ]


def test_unknown_total_and_finished_work():
    clock = Clock()
    progress = Progress("export", None, unit="images", clock=clock)
    clock.now += 2
    progress.update(10)
    assert progress.line() == "export: 10 images, 5.0/s"
    done = Progress("segment", 10, clock=clock)
    clock.now += 1
    done.update(10)
    assert done.line() == "segment: 10/10 frames (100.0%), 10.0/s"
