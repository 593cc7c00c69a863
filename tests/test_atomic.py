import errno

import pytest

from lenet.atomic import atomic_open, write_bytes_atomic
from lenet.errors import LenetError


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    write_bytes_atomic(target, b"good")
    with pytest.raises(LenetError, match="No space left on device.*unchanged"):
        with atomic_open(target) as handle:
            handle.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "weights"
    write_bytes_atomic(target, b"v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as handle:
            handle.write(b"v2-partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"v1"
    assert len(list(tmp_path.iterdir())) == 1


def test_write_creates_folders(tmp_path):
    write_bytes_atomic(tmp_path / "a" / "b" / "c.bin", b"x")
    assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"x"
