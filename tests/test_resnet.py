"""ResNet / IBN-a backbones and local weight loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet50 as tv_resnet50

from reidforge.shared.backbones import build_backbone
from reidforge.shared.backbones.resnet import IBN
from reidforge.shared.weights import WeightsError, load_pretrained


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_references() -> None:
    assert _params(build_backbone("resnet50")) == 23_508_032  # models.md §3: BoT backbone
    ibn = build_backbone("resnet50_ibn_a")
    assert _params(ibn) == 23_508_032  # IN+BN halves carry as many affine parameters as one BN
    trunk = sum(_params(m) for m in (ibn.conv1, ibn.bn1, ibn.layer1, ibn.layer2, ibn.layer3))
    assert trunk == 8_543_296  # models.md §5: MBR's shared trunk (stem + layer1-3)
    assert _params(build_backbone("resnet18")) == 11_176_512


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 512), ("resnet50", 2048), ("resnet50_ibn_a", 2048)])
def test_last_stride_doubles_the_output(name: str, channels: int) -> None:
    x = torch.randn(2, 3, 256, 128)
    for stride, shape in ((2, (8, 4)), (1, (16, 8))):
        net = build_backbone(name, last_stride=stride).eval()
        out = net(x)
        assert out.shape == (2, channels, *shape) and net.out_channels == channels


def test_ibn_normalises_half_the_channels_per_instance() -> None:
    ibn = IBN(8).eval()
    x = torch.randn(3, 8, 5, 5) * 4 + 2
    out = ibn(x)
    means = out[:, :4].mean(dim=(2, 3))
    assert torch.allclose(means, torch.zeros_like(means), atol=1e-5)  # IN half: zero mean per image
    assert torch.allclose(out[:, 4:], ibn.BN(x[:, 4:]))


def test_torchvision_state_dict_loads_with_report(tmp_path: Path) -> None:
    reference = tv_resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    net = build_backbone("resnet50", last_stride=1)
    report = load_pretrained(net, tmp_path / "resnet50.pth")
    assert report.trunk_missing == [] and sorted(report.unused) == ["fc.bias", "fc.weight"]
    assert torch.equal(net.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert "trunk 318/318 tensors" in report.line() and "2 file tensors unused" in report.line()


def test_safetensors_with_wrapper_prefixes_and_shape_mismatch(tmp_path: Path) -> None:
    source = build_backbone("resnet18")
    tensors = {f"module.backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    target = build_backbone("resnet18")
    report = load_pretrained(target, tmp_path / "w.safetensors")
    assert len(report.trunk_loaded) == len(tensors) and "module. stripped" in report.layout
    assert "prefix 'backbone.'" in report.layout
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    tensors["module.backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a file for another stem: refused
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"1 trunk tensors have another shape than the model's \(first: backbone"
                                           r"\.conv1\.weight \(64, 3, 3, 3\) -> conv1\.weight \(64, 3, 7, 7\)\)"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "w.safetensors")


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_untrusted_pickle_and_missing_file_are_refused(tmp_path: Path) -> None:
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Exploit()}, f)
    with pytest.raises(WeightsError, match="not loadable as plain tensors"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights file not found: .*nowhere.pth"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "nowhere.pth")
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"no tensor matches the model's trunk \(first file key: unrelated\)"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "other.pth")
