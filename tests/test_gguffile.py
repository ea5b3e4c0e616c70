"""The GGUF file layer on its own: what the writer writes, the reader reads back; a write killed
midway leaves nothing at the destination, and the next write there sweeps up its temp folder."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys

import gguf
import numpy as np
import pytest

from ggufkit.gguffile.reader import read_header, tensor_data
from ggufkit.gguffile.writer import TensorOut, write_gguf

Q = gguf.GGMLQuantizationType


def _tensors():
    x = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)
    return [TensorOut("a.weight", x.shape, Q.F32, [x[:4], x[4:]]),  # two chunks of rows
            TensorOut("b.weight", (2, 32), Q.Q8_0, [np.zeros((2, 34), np.uint8)])]


def test_reader_reads_what_the_writer_writes(tmp_path):
    def metadata(w):
        w.add_uint32("test.count", 7)
        w.add_array("test.names", ["x", "y"])

    (path,) = write_gguf(tmp_path / "m.gguf", "llama", _tensors(), metadata)
    header = read_header(path, arrays=True)
    assert header.architecture == "llama"
    assert header.metadata["test.count"] == 7 and header.metadata["test.names"] == ["x", "y"]
    a, b = header.tensors
    assert (a.name, a.shape, a.type, b.type) == ("a.weight", (32, 6), Q.F32, Q.Q8_0)
    np.testing.assert_array_equal(tensor_data(header, a).view(np.float32).ravel(), np.arange(6 * 32))
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# writes one tensor and half of the next, says so, and waits to be killed
KILLED_WRITER = """
import sys, time
import numpy as np
from gguf import GGMLQuantizationType as Q
from ggufkit.gguffile.writer import TensorOut, write_gguf

def stalled():
    yield np.zeros(34, np.uint8)
    print("writing", flush=True)
    time.sleep(60)

x = np.zeros((2, 32), np.float32)
write_gguf(sys.argv[1], "llama", [TensorOut("a.weight", x.shape, Q.F32, [x]),
                                  TensorOut("b.weight", x.shape, Q.Q8_0, stalled())], lambda w: None)
"""


def test_killed_write_leaves_a_temp_folder_the_next_write_removes(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (leftover,) = [p for p in tmp_path.iterdir()]
    assert leftover.name.startswith(".m.gguf.") and [p.name for p in leftover.iterdir()] == ["m.gguf"]
    # not ours to remove: another output's folder, a name mkdtemp does not make, a run still writing
    spared = [tmp_path / ".other.gguf.abcd1234", tmp_path / ".m.gguf.keep", tmp_path / ".m.gguf.live1234"]
    for folder in spared:
        folder.mkdir()
    live = os.open(spared[-1], os.O_RDONLY)
    try:
        fcntl.flock(live, fcntl.LOCK_EX)
        write_gguf(out, "llama", _tensors(), lambda w: None)
    finally:
        os.close(live)
    assert sorted(tmp_path.iterdir()) == sorted([out, *spared])
    err = capsys.readouterr().err.strip()
    assert err == f"ggufkit: removed {leftover}, left by an interrupted run"


@pytest.mark.models
@pytest.mark.parametrize("model", ["smollm2_gguf", "gemma3_gguf"])
def test_reader_reads_real_models_as_gguf_py_does(model, request):
    """Metadata values (the vocabularies' arrays included) and tensors (name, type, shape, bytes) of a
    released GGUF, as llama.cpp's own gguf-py reads them: the parity tests compare files through ours."""
    path = request.getfixturevalue(model)
    ref = gguf.GGUFReader(path)
    ours = read_header(path, arrays=True)
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.type, list(t.shape)) for t in ours.tensors] == \
        [(t.name, t.tensor_type, list(t.shape)) for t in ref.tensors]
    for mine, t in zip(ours.tensors, ref.tensors):
        assert tensor_data(ours, mine).tobytes() == t.data.tobytes(), t.name
