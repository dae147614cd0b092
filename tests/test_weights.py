"""Offline weights: torchvision's ImageNet files from a local cache, paths, and `medattn weights`."""
from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from medattn.cli import main as cli
from medattn.errors import ConfigError, MedattnError
from medattn.models import create_model
from medattn.models.weights import fetch, find_imagenet, imagenet_file, imagenet_files


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; returns its checkpoints folder (where torchvision keeps its files)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("MEDATTN_WEIGHTS_DIR", raising=False)
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    return ckpt


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a socket connection (a download attempt)."""

    def refuse(self, address, *a, **k):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def save_torchvision(arch: str, folder: Path) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision model saved under torchvision's ImageNet file name."""
    torch.manual_seed(0)
    sd = getattr(tvm, arch)(weights=None).state_dict()
    torch.save(sd, folder / imagenet_file(arch).filename)
    return sd


def test_file_names_come_from_torchvision_enums():
    assert imagenet_file("resnet50").filename == tvm.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    assert imagenet_file("resnet50", "imagenet_v2").url == tvm.ResNet50_Weights.IMAGENET1K_V2.url
    assert imagenet_file("densenet121").enum == "DenseNet121_Weights.IMAGENET1K_V1"
    assert imagenet_file("resnet18").hash_prefix == tvm.ResNet18_Weights.IMAGENET1K_V1.url.split("-")[-1][:8]
    with pytest.raises(ConfigError, match="no DenseNet121_Weights.IMAGENET1K_V2"):
        imagenet_file("densenet121", "imagenet_v2")
    assert {f.arch for f in imagenet_files()} == {"resnet18", "resnet50", "resnet152", "densenet121", "vgg16_bn", "vgg16"}


def test_imagenet_loads_from_torch_home_one_channel_summed(torch_home, no_network):
    sd = save_torchvision("resnet18", torch_home)
    m1 = create_model("resnet18", num_classes=15, in_chans=1, weights="imagenet")
    got = m1.state_dict()
    torch.testing.assert_close(got["conv1.weight"], sd["conv1.weight"].sum(dim=1, keepdim=True))
    for k, v in sd.items():
        if k != "conv1.weight" and not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    assert got["fc.weight"].shape == (15, 512)  # a fresh head

    # 3 channels: the stem as is; and the summed stem on gray == the RGB stem on gray replicated
    m3 = create_model("resnet18", num_classes=15, in_chans=3, weights="imagenet")
    assert torch.equal(m3.state_dict()["conv1.weight"], sd["conv1.weight"])
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        f1 = m1.eval().forward_features(gray)
        f3 = m3.eval().forward_features(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(f1, f3, rtol=1e-4, atol=1e-5)


def test_densenet_old_key_names_are_renamed(torch_home, no_network):
    # torchvision's DenseNet file uses the pre-0.4 names "norm.1", "conv.2" inside dense layers.
    torch.manual_seed(0)
    sd = tvm.densenet121(weights=None).state_dict()
    # (The 2017 file also predates BatchNorm's num_batches_tracked buffers.)
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv1.", ".conv.1.").replace(".norm2.", ".norm.2.")
           .replace(".conv2.", ".conv.2."): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert old != sd
    torch.save(old, torch_home / imagenet_file("densenet121").filename)
    m = create_model("densenet121", num_classes=4, in_chans=1, weights="imagenet")
    got = m.state_dict()
    key = "features.denseblock2.denselayer3.conv2.weight"
    assert torch.equal(got[key], sd[key])
    torch.testing.assert_close(got["features.conv0.weight"], sd["features.conv0.weight"].sum(1, keepdim=True))


def test_vgg_drops_the_imagenet_mlp(torch_home, no_network):
    ref = create_model("vgg16_bn", num_classes=2, in_chans=3)
    sd = {k: v for k, v in ref.state_dict().items() if k.startswith("features.")}
    # torchvision's file also holds the 4096-4096-1000 MLP ("classifier.0/3/6"); medattn's head
    # replaces it, so it is dropped by name. Small stand-ins keep this test's file small.
    sd.update({"classifier.0.weight": torch.zeros(8, 8), "classifier.6.bias": torch.zeros(1000)})
    torch.save(sd, torch_home / imagenet_file("vgg16_bn").filename)
    m = create_model("vgg16_bn", num_classes=2, in_chans=1, weights="imagenet")
    assert torch.equal(m.state_dict()["features.40.weight"], sd["features.40.weight"])


def test_medattn_weights_dir_comes_first(torch_home, tmp_path, monkeypatch, no_network):
    save_torchvision("resnet18", torch_home)
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("MEDATTN_WEIGHTS_DIR", str(mine))
    assert find_imagenet("resnet18") == torch_home / "resnet18-f37072fd.pth"
    save_torchvision("resnet18", mine)
    assert find_imagenet("resnet18") == mine / "resnet18-f37072fd.pth"


def test_missing_imagenet_file_names_the_path_and_command(torch_home, no_network):
    expected = torch_home / imagenet_file("resnet50").filename
    with pytest.raises(ConfigError) as e:
        create_model("resnet50", num_classes=15, weights="imagenet")
    msg = str(e.value)
    assert str(expected) in msg and "medattn weights fetch resnet50" in msg and "never downloads" in msg
    assert not expected.exists()


def test_path_checkpoint_with_model_key_and_module_prefix(tmp_path):
    src = create_model("resnet18", num_classes=3)
    ckpt = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 7}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    dst = create_model("resnet18", num_classes=3, weights=tmp_path / "ckpt.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_path_mismatch_errors_name_the_keys(tmp_path):
    src = create_model("resnet18", num_classes=3)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match=r"fc.weight: file \(3, 512\) vs model \(4, 512\)"):
        create_model("resnet18", num_classes=4, weights=tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="missing from the file: conv1.weight"):
        sd = src.state_dict()
        del sd["conv1.weight"]
        torch.save(sd, tmp_path / "partial.pth")
        create_model("resnet18", num_classes=3, weights=tmp_path / "partial.pth")
    torch.save({**src.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match="1 not in the model: extra.weight"):
        create_model("resnet18", num_classes=3, weights=tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match="does not fit model resnet50"):
        create_model("resnet50", num_classes=3, weights=tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="file not found"):
        create_model("resnet18", num_classes=3, weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable"):
        create_model("resnet18", num_classes=3, weights=tmp_path / "junk.pth")


def test_path_to_a_torchvision_file_loads_like_imagenet(tmp_path):
    sd = save_torchvision("resnet18", tmp_path)
    m = create_model("resnet18", num_classes=2, in_chans=1, weights=tmp_path / "resnet18-f37072fd.pth")
    torch.testing.assert_close(m.state_dict()["conv1.weight"], sd["conv1.weight"].sum(1, keepdim=True))


# --------------------------------------------------------------------------------------------
# `medattn weights`
# --------------------------------------------------------------------------------------------
def test_cli_list_shows_cached_and_expected(torch_home, capsys, no_network):
    save_torchvision("resnet18", torch_home)
    assert cli(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert f"cached   {torch_home / 'resnet18-f37072fd.pth'}" in out
    assert f"missing  {torch_home / imagenet_file('resnet152').filename}" in out
    assert cli(["weights", "list", "--dir", str(torch_home.parent)]) == 0
    assert "resnet18     imagenet     missing" in capsys.readouterr().out


def test_cli_fetch_offline_refuses_cleanly(torch_home, tmp_path, capsys, no_network):
    # tests/conftest.py sets MEDATTN_OFFLINE=1
    assert cli(["weights", "fetch", "resnet50", "--to", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "MEDATTN_OFFLINE" in err and "resnet50-0676ba61.pth" in err and "Traceback" not in err
    assert not list((tmp_path / "w").glob("*")) if (tmp_path / "w").exists() else True
    # a file that is already there needs no network
    save_torchvision("resnet18", torch_home)
    assert cli(["weights", "fetch", "resnet18"]) == 0
    assert "present" in capsys.readouterr().out
    assert cli(["weights", "fetch", "resnet99"]) == 2


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server standing in for download.pytorch.org (loopback only)."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/models"
    server.shutdown()
    server.server_close()


def test_fetch_from_a_mirror(mirror, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDATTN_OFFLINE")
    root, url = mirror
    (root / "models").mkdir()
    sd = save_torchvision("resnet18", root / "models")
    dest = tmp_path / "dest"
    paths = fetch(["resnet18"], dest, mirror=url, check_hash=False, log=lambda *a: None)
    assert paths == [dest / "resnet18-f37072fd.pth"]
    assert torch.equal(torch.load(paths[0])["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    # the real hash check: a random-init file cannot match torchvision's sha256 prefix
    with pytest.raises(MedattnError, match="content is wrong"):
        fetch(["resnet18"], tmp_path / "dest2", mirror=url, log=lambda *a: None)
    assert not list((tmp_path / "dest2").iterdir())  # nothing partial left behind
    with pytest.raises(MedattnError, match="HTTP 404"):
        fetch(["resnet50"], tmp_path / "dest3", mirror=url, log=lambda *a: None)


def test_fetch_without_network_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDATTN_OFFLINE")
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MedattnError, match="no internet access") as e:
        fetch(["resnet18"], tmp_path / "w", mirror=f"http://127.0.0.1:{port}/models", log=lambda *a: None)
    assert "--to DIR" in str(e.value) and "MEDATTN_WEIGHTS_DIR" in str(e.value)
    assert not list((tmp_path / "w").iterdir())
