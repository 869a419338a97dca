"""The TensorBoard writer's event files read back with TensorBoard's own reader."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from elmojax.formats import crc32c
from elmojax.train.tensorboard import SummaryWriter


def test_crc32c_check_value():
    assert crc32c.value(b"123456789") == 0xE3069283  # the CRC-32C standard check value


def test_scalars_read_back(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.scalars(5, {"train/loss": 1.5, "train/perplexity": 4.48})
    writer.scalars(10, {"train/loss": 1.25})
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/perplexity"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 1.5), (10, 1.25)]


def test_an_event_carries_the_wall_time_it_is_given(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.scalars(3, {"x": 1.0}, wall_time=1234.5)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.wall_time) for e in events.Scalars("x")] == [(3, 1234.5)]
