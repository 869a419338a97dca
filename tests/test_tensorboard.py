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
