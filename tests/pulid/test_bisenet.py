"""BiSeNet: facexlib's key layout loads strictly (weights_only) with widths from the file; bad files are
one-line errors. (Compared against facexlib's own module in a scratch run: identical logits.)"""

from __future__ import annotations

import pytest
import torch

from idcraft.errors import CheckpointError
from idcraft.pulid.bisenet import BiSeNet, load_bisenet


def test_round_trip_and_labels(tmp_path):
    torch.manual_seed(0)
    net = BiSeNet(width=8, context=16, fuse=24, aux=8).eval()
    torch.save(net.state_dict(), tmp_path / "parsing_bisenet.pth")
    loaded = load_bisenet(tmp_path / "parsing_bisenet.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = loaded(x)
        assert torch.equal(logits, net(x))
    assert logits.shape == (1, 19, 64, 64)
    assert "cp.resnet.layer3.0.downsample.0.weight" in net.state_dict()


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_bisenet(tmp_path / "missing.pth")
    sd = BiSeNet(width=8, context=16, fuse=24, aux=8).state_dict()
    sd.pop("ffm.conv1.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not a facexlib BiSeNet"):
        load_bisenet(tmp_path / "bad.pth")
