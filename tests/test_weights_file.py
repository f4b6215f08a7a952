"""weights_file.WeightsFile, the loader's view of a safetensors file: the tensors safetensors' own reader gives
(every dtype the loader meets, empty tensors, slices), errors naming the file for a broken one, and a copied
tensor's pages given back (resident memory does not keep the file)."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from param2moe.weights_file import WeightsFile, WeightsFileError


def test_tensors_equal_safetensors_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(7, 33, generator=g).to(torch.bfloat16), "f16": torch.randn(5, generator=g).half(),
               "f32": torch.randn(3, 4, 5, generator=g), "i64": torch.arange(-4, 9),
               "u8": torch.arange(200, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    want = load_file(path)
    with WeightsFile(path) as f:
        assert sorted(f.names()) == sorted(tensors)
        for name, t in want.items():
            got = f.tensor(name)
            assert f.shape(name) == tuple(t.shape) and got.dtype == t.dtype and torch.equal(got, t), name
            assert f.nbytes(name) == t.numel() * t.element_size()
        assert torch.equal(f.tensor("f32")[1:, :, 2:4], want["f32"][1:, :, 2:4])  # a rank's slice
        out = torch.empty(7, 33)
        out.copy_(f.tensor("bf16"))  # into a float32 parameter
        assert torch.equal(out, want["bf16"].float())


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:5], "too short"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header claims"),
    (lambda b: b[:8] + b"{" * (len(b) - 8), "not valid JSON"),
    (lambda b: b[:-16], "outside the file"),
], ids=["short", "header-length", "header-json", "truncated"])
def test_broken_file_is_named(tmp_path, damage, words):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsFileError, match=words) as e:
        WeightsFile(str(path))
    assert "w.safetensors" in str(e.value)


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_release_gives_the_pages_back(tmp_path):
    path = str(tmp_path / "big.safetensors")
    save_file({"w": torch.ones(8 << 20, dtype=torch.uint8)}, path)  # 8 MiB
    with WeightsFile(path) as f:
        start = _rss_file()
        assert int(f.tensor("w").sum()) == 8 << 20  # every page read
        touched = _rss_file()
        f.release("w")
        released = _rss_file()
    assert touched - start > 6 << 20 and touched - released > 6 << 20, (start, touched, released)
