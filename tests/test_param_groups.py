import pytest
import torch
from torch import nn

from neptune_ext import Neptune
from neptune_ext.param_groups import find_head, param_groups


class Net(nn.Module):
    """conv (with bias) + BN + MLP; the head is the last Linear."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.classifier = nn.Linear(6, classes)
        self.scale = nn.Parameter(torch.ones(()))  # a 0-dim parameter

    def forward(self, x):
        x = self.bn(self.conv(x)).relu().mean(dim=(2, 3))
        return self.classifier(self.norm(self.hidden(x)).relu()) * self.scale


class HeadFirst(nn.Module):
    """The classifier is registered before a projection Linear whose width is not the class count."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 10)
        self.body = nn.Linear(5, 8)
        self.extra = nn.Linear(8, 3)  # last Linear, but not 10 classes


def by_name(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


def settings(groups):
    return {g["name"]: {k: v for k, v in g.items() if k not in ("params", "name")} for g in groups}


def check_partition(groups, model):
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}


def test_head_found_automatically():
    model = Net()
    groups = param_groups(model)
    check_partition(groups, model)
    assert by_name(groups, model) == {
        "decay": ["conv.weight", "hidden.weight"],
        "no_decay": ["bn.bias", "bn.weight", "conv.bias", "hidden.bias", "norm.bias", "norm.weight", "scale"],
        "head_decay": ["classifier.weight"],
        "head_no_decay": ["classifier.bias"],
    }
    assert settings(groups) == {
        "decay": {"weight_decay": 1e-2},  # clip: the optimizer's default
        "no_decay": {"weight_decay": 0.0},
        "head_decay": {"weight_decay": 1e-2, "clip": 0.0},
        "head_no_decay": {"weight_decay": 0.0, "clip": 0.0},
    }


def test_auto_head_rule_last_linear_or_matching_classes():
    model = HeadFirst()
    assert find_head(model) is model.extra
    assert find_head(model, num_classes=10) is model.head
    groups = param_groups(model, num_classes=10)
    assert by_name(groups, model)["head_decay"] == ["head.weight"]
    assert find_head(nn.Sequential(nn.Conv2d(1, 2, 3))) is None


@pytest.mark.parametrize("how", ["module", "string", "string_with_dot"])
def test_head_named_by_user(how):
    model = HeadFirst()
    head = {"module": model.head, "string": "head", "string_with_dot": "head."}[how]
    groups = param_groups(model, weight_decay=0.05, head=head, clip=0.02)
    check_partition(groups, model)
    assert by_name(groups, model) == {
        "decay": ["body.weight", "extra.weight"],
        "no_decay": ["body.bias", "extra.bias"],
        "head_decay": ["head.weight"],
        "head_no_decay": ["head.bias"],
    }
    assert settings(groups) == {
        "decay": {"weight_decay": 0.05, "clip": 0.02},
        "no_decay": {"weight_decay": 0.0, "clip": 0.02},
        "head_decay": {"weight_decay": 0.05, "clip": 0.0},
        "head_no_decay": {"weight_decay": 0.0, "clip": 0.0},
    }


def test_string_prefix_does_not_match_longer_names():
    model = nn.Module()
    model.fc = nn.Linear(3, 3)
    model.fc2 = nn.Linear(3, 2)
    groups = param_groups(model, head="fc")
    assert by_name(groups, model)["head_decay"] == ["fc.weight"]
    assert "fc2.weight" in by_name(groups, model)["decay"]


def test_bad_head_raises():
    model = Net()
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        param_groups(model, head="nonexistent")
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        param_groups(model, head=nn.Linear(2, 2))  # not part of the model
    with pytest.raises(TypeError):
        param_groups(model, head=3)
    with pytest.raises(ValueError, match="for_optimizer"):
        param_groups(model, for_optimizer="jax")


def test_no_head_warns_and_head_false():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.warns(UserWarning, match="no nn.Linear head"):
        groups = param_groups(model)
    assert {g["name"] for g in groups} == {"decay", "no_decay"}
    groups = param_groups(Net(), head=False)
    assert {g["name"] for g in groups} == {"decay", "no_decay"}


def test_shared_and_frozen_parameters():
    model = Net()
    model.tied = model.hidden  # the same module twice: its parameters once
    model.conv.weight.requires_grad_(False)
    groups = param_groups(model)
    check_partition(groups, model)
    assert "conv.weight" not in sum(by_name(groups, model).values(), [])


def test_none_weight_decay_and_torch_groups():
    model = Net()
    groups = param_groups(model, weight_decay=None, for_optimizer="torch")
    assert all("clip" not in g for g in groups)
    s = settings(groups)
    assert s["decay"] == {} and s["head_decay"] == {}
    assert s["no_decay"] == {"weight_decay": 0.0}
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]
    torch.optim.SGD(param_groups(model, for_optimizer="torch"), lr=0.1, momentum=0.9, nesterov=True)


def test_neptune_end_to_end_one_step():
    torch.manual_seed(0)
    model = Net()
    groups = param_groups(model, clip=0.05)
    opt = Neptune(groups, lr=1e-2)
    by = {g["name"]: g for g in opt.param_groups}
    assert by["decay"]["clip"] == 0.05 and by["head_decay"]["clip"] == 0.0
    assert by["no_decay"]["weight_decay"] == 0.0 and by["decay"]["weight_decay"] == 1e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 5, 5)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(moved) == set(before), f"not updated: {set(before) - set(moved)}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the optimizer's state dict round-trips with the extra "name" key
    opt2 = Neptune(param_groups(model, clip=0.05), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    assert [g["name"] for g in opt2.param_groups] == [g["name"] for g in opt.param_groups]
