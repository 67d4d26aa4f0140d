"""Neptune in timm's optimizer factory (neptune_ext.register_timm()); skipped without timm."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import neptune_ext
from neptune_ext import Neptune

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2, list_optimizers  # noqa: E402


class Net(nn.Module):
    """conv / norm / linear body and a linear head, with a name timm excludes from decay."""

    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 8, 4))
        self.hidden = nn.Linear(8, 16)
        self.fc = nn.Linear(16, classes)

    def no_weight_decay(self):
        return {"pos_embed"}

    def forward(self, x):
        x = self.norm(self.stem(x)).mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


def _groups_by_name(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in opt.param_groups for p in g["params"]}


def test_import_does_not_import_timm():
    code = "import sys, neptune_ext; assert 'timm' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_create_optimizer_v2_builds_neptune_with_timm_groups_and_the_head_rule():
    neptune_ext.register_timm()
    neptune_ext.register_timm()  # idempotent
    assert "neptune" in list_optimizers()
    model = Net()
    opt = create_optimizer_v2(model, "neptune", lr=2e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-7)
    assert type(opt) is Neptune
    g = _groups_by_name(model, opt)
    assert {n for n, grp in g.items() if grp["weight_decay"] == 0.05} == {"stem.weight", "hidden.weight", "fc.weight"}
    assert {n for n, grp in g.items() if grp["weight_decay"] == 0.0} == {
        "stem.bias", "norm.weight", "norm.bias", "pos_embed", "hidden.bias", "fc.bias"}
    assert {n for n, grp in g.items() if grp["clip"] == 0.0} == {"fc.weight", "fc.bias"}
    assert all(grp["clip"] == 0.1 for n, grp in g.items() if not n.startswith("fc."))
    assert all(grp["lr"] == 2e-3 and grp["betas"] == (0.8, 0.99) and grp["eps"] == 1e-7 for grp in opt.param_groups)
    x = torch.randn(4, 3, 6, 6)
    y = torch.randint(0, 7, (4,))
    before = model.fc.weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)


def test_timm_model_foreach_and_layer_decay_pass_through():
    neptune_ext.register_timm()
    model = timm.create_model("resnet10t", num_classes=5, pretrained=False)
    opt = create_optimizer_v2(model, "neptune", lr=1e-3, weight_decay=0.05, foreach=True, layer_decay=0.7)
    assert all(grp["foreach"] is True and "lr_scale" in grp for grp in opt.param_groups)
    g = _groups_by_name(model, opt)
    assert {n for n, grp in g.items() if grp["clip"] == 0.0} == {"fc.weight", "fc.bias"}
    assert g["conv1.0.weight"]["weight_decay"] == 0.05 and g["bn1.weight"]["weight_decay"] == 0.0


def test_params_and_groups_given_directly_keep_their_clip():
    neptune_ext.register_timm()
    model = Net()
    groups = [{"params": [model.fc.weight], "clip": 0.05}, {"params": [model.hidden.weight]}]
    opt = create_optimizer_v2(groups, "neptune", lr=1e-3)
    assert [grp["clip"] for grp in opt.param_groups] == [0.05, 0.1]
    custom = create_optimizer_v2(model, "neptune", lr=1e-3, clip=0.2, cautious=False,
                                 param_group_fn=lambda m: [{"params": list(m.parameters())}])
    g = _groups_by_name(model, custom)
    assert g["fc.weight"]["clip"] == 0.0 and g["hidden.weight"]["clip"] == 0.2
    assert not custom.param_groups[0]["cautious"]
