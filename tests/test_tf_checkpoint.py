"""elmojax.formats.tf_checkpoint against the format's spec: checkpoints written by tests/tf_bundle.py (an
independent writer), damaged in the ways downloads and copies are; and elmojax.formats.crc32c against
the bitwise definition."""

import os
import shutil

import numpy as np
import pytest
import tf_bundle

from elmojax.formats import crc32c
from elmojax.formats.tf_checkpoint import CheckpointFormatError, TFCheckpoint, resolve_prefix


@pytest.mark.parametrize("n", [0, 1, 9, 1023, 2048, 2049, 3 * 1024 + 7, 70001])
def test_crc32c_is_the_bitwise_definition(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c.value(data) == tf_bundle.crc32c(data)
    assert crc32c.unmask(tf_bundle.mask(crc32c.value(data))) == crc32c.value(data)


def test_crc32c_check_value():
    assert crc32c.value(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


def _variables(n: int = 60) -> dict:
    rng = np.random.default_rng(0)
    out = {f"lm/layer_{i:02d}/W": rng.normal(size=(3, i % 5 + 1)).astype(np.float32) for i in range(n)}
    out["global_step"] = np.array(1234, np.int64)
    out["lm/scalar64"] = np.array([1.5, -2.0], np.float64)
    return out


@pytest.fixture
def written(tmp_path):
    variables = _variables()
    prefix = str(tmp_path / "model.ckpt-1234")
    tf_bundle.write_checkpoint(prefix, variables, n_shards=2, block_size=200)  # many small blocks
    return prefix, variables


def test_reads_every_variable_of_a_multi_block_multi_shard_checkpoint(written):
    prefix, variables = written
    with open(prefix + ".index", "rb") as f:
        assert f.read().count((0xDB4775248B80FB57).to_bytes(8, "little")) == 1
    ckpt = TFCheckpoint(prefix)
    assert ckpt.n_shards == 2
    assert ckpt.names() == sorted(variables)
    for name, value in variables.items():
        assert ckpt.variables[name].shape == value.shape
        got = ckpt.read(name)
        assert got.dtype == value.dtype and not got.flags.writeable
        np.testing.assert_array_equal(got, value)


def test_a_prefix_a_file_of_it_or_its_directory(written, tmp_path):
    prefix, _ = written
    for path in (prefix, prefix + ".index", prefix + ".data-00001-of-00002"):
        assert resolve_prefix(path) == prefix
    assert resolve_prefix(str(tmp_path)) == prefix  # the only checkpoint there
    tf_bundle.write_checkpoint(str(tmp_path / "model.ckpt-99"), {"x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointFormatError, match="several checkpoints"):
        resolve_prefix(str(tmp_path))
    # TF's `checkpoint` file, written on the machine that trained: an absolute path from there
    tf_bundle.write_checkpoint_file(str(tmp_path), "/cluster/users/someone/run/model.ckpt-1234")
    assert resolve_prefix(str(tmp_path)) == prefix
    tf_bundle.write_checkpoint_file(str(tmp_path), "model.ckpt-99")  # relative, as TF writes them now
    assert resolve_prefix(str(tmp_path)) == str(tmp_path / "model.ckpt-99")
    tf_bundle.write_checkpoint_file(str(tmp_path), "/elsewhere/model.ckpt-5")
    with pytest.raises(CheckpointFormatError, match=r"names checkpoint '/elsewhere/model.ckpt-5'.*model.ckpt-5.index"):
        resolve_prefix(str(tmp_path))
    with pytest.raises(CheckpointFormatError, match="no .*nothing.index"):
        resolve_prefix(str(tmp_path / "nothing"))


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_damaged_tensor_names_the_file_and_the_variable(written):
    prefix, variables = written
    ckpt = TFCheckpoint(prefix)
    v = ckpt.variables["lm/layer_07/W"]
    _flip(ckpt.shard_file(v.shard), v.offset + 5)
    ckpt = TFCheckpoint(prefix)
    with pytest.raises(CheckpointFormatError, match=r"data-0000\d-of-00002: the checksum of variable 'lm/layer_07/W'"):
        ckpt.read("lm/layer_07/W")
    np.testing.assert_array_equal(ckpt.read("lm/layer_08/W"), variables["lm/layer_08/W"])  # the others still read


def test_a_damaged_index_names_the_file(written):
    prefix, _ = written
    _flip(prefix + ".index", 30)
    with pytest.raises(CheckpointFormatError, match=r"model.ckpt-1234.index: the checksum of the block at offset 0"):
        TFCheckpoint(prefix)


def test_a_truncated_index_or_data_shard_and_a_missing_shard(written):
    prefix, _ = written
    ckpt = TFCheckpoint(prefix)
    last = max(ckpt.variables.values(), key=lambda v: (v.shard == 1, v.offset))
    data = ckpt.shard_file(1)
    del ckpt
    with open(data, "r+b") as f:
        f.truncate(last.offset + 4)
    with pytest.raises(CheckpointFormatError, match=rf"data-00001-of-00002: variable '{last.name}' lies past the end"):
        TFCheckpoint(prefix).read(last.name)
    os.remove(data)
    with pytest.raises(CheckpointFormatError, match="data-00001-of-00002: missing"):
        TFCheckpoint(prefix).read(last.name)
    index = prefix + ".index"
    with open(index, "r+b") as f:
        f.truncate(os.path.getsize(index) - 3)
    with pytest.raises(CheckpointFormatError, match="index: not a TensorFlow checkpoint index"):
        TFCheckpoint(prefix)


def test_a_snappy_block_is_refused_by_name(tmp_path):
    prefix = str(tmp_path / "snappy")
    tf_bundle.write_checkpoint(prefix, {"x": np.ones(3, np.float32)}, compression=1)
    with pytest.raises(CheckpointFormatError, match="snappy-compressed"):
        TFCheckpoint(prefix)


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.index").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointFormatError, match="weights.index: not a TensorFlow checkpoint index"):
        TFCheckpoint(str(tmp_path / "weights"))
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(CheckpointFormatError, match="no TensorFlow checkpoint in this directory"):
        TFCheckpoint(str(tmp_path))
