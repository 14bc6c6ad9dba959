"""Multi-exit networks cut from torchvision classifiers: `model: torchvision:<builder>`.

    create_model("torchvision:resnet18", num_classes=10, input_shape=(3, 32, 32), exits=["layer1", "layer2"])
    create_model("torchvision:efficientnet_b0", exits="flops:0.25,0.5,0.75", weights="IMAGENET1K_V1")
    create_model("torchvision:resnet", block="basic", layers=[1, 1, 1, 1])       # torchvision's ResNet class
    create_model("torchvision:convnext", block_setting=[[16, 32, 1], [32, None, 1]])  # ConvNeXt class

How a network is cut (timm's FeatureInfo is the model: a backbone described by named stages with their
channels and stride):
- the *body* is the chain of the network's children that its `forward` runs in order, with the body
  container (a plain `nn.Sequential` child that holds the blocks: `features`, `trunk_output`) expanded one
  level: resnet's candidates are conv1, bn1, relu, maxpool, layer1 … layer4; efficientnet's, mobilenet's and
  convnext's are features.0 … features.N. Each candidate is described by its output shape (C, H, W), its
  reduction (input size / H) and the backbone's cumulative MFLOPs up to it (FlopCounterMode, batch 1).
- the *tail* is what the forward runs after the body (pool, flatten, classifier): it becomes the last exit's
  head, so pretrained weights keep their meaning. Functional work in a forward (torch.flatten,
  adaptive_avg_pool2d) is replaced by the equal module; the per-class table `LAYOUTS` holds these known
  tails, `REFUSED` the classes that cannot be cut and why.
- `exits` names the candidates after which an early exit sits (any but the last: the tail follows it), or
  `"flops:0.25,0.5"` picks the candidates nearest to those fractions of the whole backbone's MFLOPs (body and
  tail, exit heads excluded), each one after the previous pick (the order-keeping choice nearest overall). The resolved names are stored in `model_args`, so a checkpoint rebuilds the
  same cut. Default: `flops:0.33,0.67` (three exits, like the registered architectures).
- stage 1 starts with a buffer `Normalize` (mean/std from the model args), so callers pass [0, 1] images.
- at build, in eval mode, the stages chained with the tail must equal the torchvision network's own
  `forward` on a random input within `EQUIVALENCE_ATOL`, else `BackboneError`.
- an in-place operation at the start of stage k+1 (e.g. ReLU(inplace=True) after an exit at `bn1`) would
  overwrite the features head k read, corrupting head k's gradient: such operations are made out-of-place.

Weights: none (random init), a local state dict (`weights_path`: the torchvision network's own keys, as
`torch.save(net.state_dict())` writes them or as torchvision publishes them), or a torchvision weights name
(`weights: IMAGENET1K_V1`, `DEFAULT` or `ResNet18_Weights.IMAGENET1K_V1`), read from torch's hub cache or
downloaded there. A classifier whose class count differs from the dataset's is re-initialized. Offline, a
missing file raises `WeightsUnavailable`, one line naming the file, its URL and the folder to put it in.

Small photos (`small_input_stem: true`): ImageNet stems shrink 32x32 images to 8x8 before the first block.
For ResNet-class networks (resnet*, resnext*, wide_resnet*, `torchvision:resnet`) the stem conv becomes a 3x3
stride-1 conv (new weights) and the max-pool is removed; for EfficientNet, MobileNetV2/V3 and RegNet the
stem's stride-2 conv runs at stride 1 (weights kept); other classes refuse it.

Inputs with other than 3 channels: the first conv is adapted as timm's `adapt_input_conv` does (RGB weights
summed for 1 channel, tiled and rescaled otherwise).
"""
from __future__ import annotations

import http.client
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from training.models.base import MultiExitNetwork, Normalize
from training.models.heads import HeadKind, build_head
from training.models.registry import UnknownModelError, register_family

log = logging.getLogger(__name__)

FAMILY = "torchvision"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SHAPE = (3, 32, 32)
DEFAULT_EXITS = "flops:0.33,0.67"
FLOPS_PREFIX = "flops:"
EQUIVALENCE_ATOL = 1e-5
HEAD_COST_WARNING = 0.10  # an early head above this share of the full network's MFLOPs is logged


class BackboneError(ValueError):
    """A torchvision network that cannot be built or cut as asked; one line saying why and what to do."""


class WeightsUnavailable(BackboneError):
    """Named torchvision weights neither in torch's hub cache nor downloadable (offline)."""


class TailStep(str, Enum):
    """Functional work a forward does after its body, replaced by the equal module (a str Enum: tell it from a
    child name with isinstance(t, TailStep))."""

    FLATTEN = "flatten"  # torch.flatten(x, 1)
    POOL = "pool"  # nn.functional.adaptive_avg_pool2d(x, (1, 1))
    RELU = "relu"  # nn.functional.relu(x)


class StemChange(str, Enum):
    """What `small_input_stem` does for a class (see the module docstring)."""

    RESNET = "3x3 stride-1 conv, no max-pool"
    STRIDE_ONE = "stem conv at stride 1"
    NONE = "not defined"


@dataclass(frozen=True)
class Layout:
    """How a torchvision class's forward chains its children: the body container expanded one level (or
    None), the tail in forward order (child names and functional steps), what a small-input stem does."""

    container: str | None
    tail: tuple[str | TailStep, ...]
    stem: StemChange


def _layouts() -> tuple[dict[type, Layout], dict[type, str]]:
    from torchvision import models as tv

    pool_tail = ("avgpool", TailStep.FLATTEN, "classifier")
    layouts = {
        tv.ResNet: Layout(None, ("avgpool", TailStep.FLATTEN, "fc"), StemChange.RESNET),
        tv.EfficientNet: Layout("features", pool_tail, StemChange.STRIDE_ONE),
        tv.MobileNetV3: Layout("features", pool_tail, StemChange.STRIDE_ONE),
        tv.MobileNetV2: Layout("features", (TailStep.POOL, TailStep.FLATTEN, "classifier"), StemChange.STRIDE_ONE),
        tv.ConvNeXt: Layout("features", ("avgpool", "classifier"), StemChange.NONE),
        tv.RegNet: Layout("trunk_output", ("avgpool", TailStep.FLATTEN, "fc"), StemChange.STRIDE_ONE),
        tv.VGG: Layout("features", pool_tail, StemChange.NONE),
        tv.AlexNet: Layout("features", pool_tail, StemChange.NONE),
        tv.SqueezeNet: Layout("features", ("classifier", TailStep.FLATTEN), StemChange.NONE),
        tv.DenseNet: Layout("features", (TailStep.RELU, TailStep.POOL, TailStep.FLATTEN, "classifier"),
                            StemChange.NONE),
    }
    mean_pool = "its forward pools with x.mean([2, 3]) between its children, which no child module does"
    branches = "its forward transforms the input and runs auxiliary classifiers besides its chain of children"
    tokens = "a transformer: its forward turns feature maps into tokens between its children"
    refused = {tv.ShuffleNetV2: mean_pool, tv.MNASNet: mean_pool, tv.GoogLeNet: branches, tv.Inception3: branches,
               tv.VisionTransformer: tokens, tv.SwinTransformer: tokens, tv.MaxVit: tokens}
    return layouts, refused


# ---------------------------------------------------------------- custom builders (torchvision classes)

class ResNetBlock(str, Enum):
    BASIC = "basic"
    BOTTLENECK = "bottleneck"


def _resnet_class(num_classes: int, block: ResNetBlock | str = ResNetBlock.BASIC,
                  layers: Sequence[int] = (2, 2, 2, 2), **kwargs: Any) -> nn.Module:
    """torchvision's `ResNet(block, layers)`: `block: basic|bottleneck`, `layers: [n1, n2, n3, n4]`."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    try:
        block = ResNetBlock(block)
    except ValueError:
        raise BackboneError(f"block must be one of {', '.join(b.value for b in ResNetBlock)}, got {block!r}") from None
    return ResNet(BasicBlock if block is ResNetBlock.BASIC else Bottleneck, list(layers), num_classes=num_classes,
                  **kwargs)


def _convnext_class(num_classes: int, block_setting: Sequence[Sequence[int | None]] | None = None,
                    **kwargs: Any) -> nn.Module:
    """torchvision's `ConvNeXt(block_setting)`: `block_setting: [[in_channels, out_channels|null, layers], ...]`
    (convnext_tiny: [[96, 192, 3], [192, 384, 3], [384, 768, 9], [768, null, 3]])."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    if not block_setting:
        raise BackboneError("torchvision:convnext needs block_setting: [[in_channels, out_channels|null, layers], ...]")
    return ConvNeXt([CNBlockConfig(*row) for row in block_setting], num_classes=num_classes, **kwargs)


CUSTOM_BUILDERS: dict[str, Callable[..., nn.Module]] = {"resnet": _resnet_class, "convnext": _convnext_class}


def builder_names() -> list[str]:
    """Every builder `torchvision:<name>` accepts: the custom class builders and torchvision's classification
    builders whose class has a known layout (refused classes are left out)."""
    from torchvision import models as tv

    layouts, _ = _layouts()
    known = tuple(layouts)
    names = [n for n in tv.list_models(module=tv)
             if isinstance(getattr(tv.get_model_builder(n), "__annotations__", {}).get("return"), type)
             and issubclass(tv.get_model_builder(n).__annotations__["return"], known)]
    return sorted(CUSTOM_BUILDERS) + names


def _construct(builder: str, num_classes: int, builder_kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models as tv

    if builder in CUSTOM_BUILDERS:
        fn: Callable[..., nn.Module] = CUSTOM_BUILDERS[builder]
    elif builder in tv.list_models(module=tv):
        fn = tv.get_model_builder(builder)
    else:
        raise UnknownModelError(f"unknown model {FAMILY}:{builder!r}; {FAMILY}: builders are torchvision's "
                                f"classification builders (e.g. resnet18, efficientnet_b0) or "
                                f"{', '.join(CUSTOM_BUILDERS)} (a torchvision class with its arguments)")
    try:
        return fn(num_classes=num_classes, **builder_kwargs)
    except TypeError as exc:  # an argument the builder does not take
        raise BackboneError(f"{FAMILY}:{builder} does not take {sorted(builder_kwargs)}: {exc}") from None


def _layout(network: nn.Module, builder: str) -> Layout:
    layouts, refused = _layouts()
    cls = type(network)
    for known, reason in refused.items():
        if isinstance(network, known):
            raise BackboneError(f"{FAMILY}:{builder} ({cls.__name__}) cannot be cut into stages: {reason}; use a "
                                f"builder with a known tail (resnet*, efficientnet*, mobilenet_v2/v3*, convnext*, "
                                f"regnet*, vgg*) or add one for {cls.__name__} to LAYOUTS in {__name__}")
    for known, layout in layouts.items():
        if isinstance(network, known):
            return layout
    raise BackboneError(f"{FAMILY}:{builder} ({cls.__name__}) has no known layout: add how its forward chains its "
                        f"children to LAYOUTS in {__name__}")


# ---------------------------------------------------------------- weights

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def resolve_weights(builder: str, name: str) -> Any:
    """torchvision's weights enum member for `builder` named `name` ("IMAGENET1K_V1", "DEFAULT" or the full
    "ResNet18_Weights.IMAGENET1K_V1"); its `.transforms()` preset holds the mean and std the weights expect.

    Raises BackboneError for a builder without published weights or a name it does not have."""
    from torchvision.models import get_model_weights, get_weight

    if builder in CUSTOM_BUILDERS:
        raise BackboneError(f"{FAMILY}:{builder} has no published weights; pass weights_path (a state dict) instead")
    enum = get_model_weights(builder)
    try:
        weights = get_weight(name) if "." in name else enum[name]
    except (KeyError, ValueError):
        weights = None
    if weights is None or not isinstance(weights, enum):
        raise BackboneError(f"unknown weights {name!r} for {builder}; available: {', '.join(enum.__members__)}")
    return weights


def _named_weights(builder: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's weights `name` for `builder`, from torch's hub cache or downloaded.

    Raises BackboneError (unknown name) or WeightsUnavailable (offline, naming the file, URL and folder)."""
    weights = resolve_weights(builder, name)
    file = Path(urlparse(weights.url).path).name
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, http.client.HTTPException) as exc:  # URLError and socket errors are OSErrors
        raise WeightsUnavailable(f"torchvision weights {type(weights).__name__}.{weights.name} are not on this "
                                 f"machine and could not be downloaded ({_one_line(exc)}): put {file} (from "
                                 f"{weights.url}) into {folder}/ and run again, or pass weights_path") from exc
    except RuntimeError as exc:  # torch.hub: "invalid hash value"
        raise BackboneError(f"{folder / file} is not {type(weights).__name__}.{weights.name} ({_one_line(exc)}): "
                            "remove it and run again") from exc


def _file_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights_path {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        raise BackboneError(f"weights_path {path} is not a readable torch state dict ({_one_line(exc)})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights_path {path} holds a {type(state).__name__}, not a state dict")
    return state


def _classifier_name(network: nn.Module, layout: Layout) -> str:
    """The tail's last Linear/Conv2d: the layer whose outputs are the classes."""
    found = ""
    for child in (t for t in layout.tail if not isinstance(t, TailStep)):
        for name, module in getattr(network, child).named_modules(prefix=child):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                found = name
    return found


def _load_weights(network: nn.Module, state: dict[str, torch.Tensor], source: str, classifier: str) -> None:
    """Load `state` into `network`; a classifier with another class count is left re-initialized."""
    own = network.state_dict()
    keys = (f"{classifier}.weight", f"{classifier}.bias")
    skipped = [k for k in keys if k in state and k in own and state[k].shape != own[k].shape]
    try:
        missing, unexpected = network.load_state_dict({k: v for k, v in state.items() if k not in skipped},
                                                      strict=False)
    except RuntimeError as exc:  # size mismatches
        raise BackboneError(f"{source} does not fit this network ({_one_line(exc)})") from exc
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise BackboneError(f"{source} does not fit this network: missing keys {missing[:3]}, unexpected "
                            f"{unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    if skipped:
        log.info("%s: classifier %s has %d outputs there, %d here: re-initialized", source, classifier,
                 state[keys[0]].shape[0], own[keys[0]].shape[0])


# ---------------------------------------------------------------- stems and input channels

def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _first_conv(network: nn.Module) -> tuple[str, nn.Conv2d]:
    return next((n, m) for n, m in network.named_modules() if isinstance(m, nn.Conv2d))


def _small_input_stem(network: nn.Module, layout: Layout, builder: str, in_channels: int) -> None:
    if layout.stem is StemChange.RESNET:
        old = network.conv1
        conv = nn.Conv2d(in_channels, old.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits ResNet
        network.conv1 = conv
        network.maxpool = nn.Identity()
    elif layout.stem is StemChange.STRIDE_ONE:
        _first_conv(network)[1].stride = (1, 1)
    else:
        raise BackboneError(f"small_input_stem is not defined for {FAMILY}:{builder} ({type(network).__name__}); "
                            "it is for resnet*/resnext*/wide_resnet* (3x3 stride-1 conv, no max-pool) and "
                            "efficientnet*/mobilenet*/regnet* (stem conv at stride 1): use one of those or "
                            "small_input_stem: false")


def _adapt_input_conv(network: nn.Module, in_channels: int) -> None:
    """timm's adapt_input_conv: a first conv made for 3 channels takes `in_channels` (weights summed or tiled)."""
    name, conv = _first_conv(network)
    if conv.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        weight = conv.weight
        if in_channels == 1:
            new.weight.copy_(weight.sum(dim=1, keepdim=True))
        else:
            repeat = math.ceil(in_channels / weight.shape[1])
            new.weight.copy_(weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_module(network, name, new)


# ---------------------------------------------------------------- the backbone and its candidates

@dataclass(frozen=True)
class Candidate:
    """A place an exit can go (timm's FeatureInfo): module path, type, output shape (C, H, W), reduction
    (input H / H), its own MFLOPs and the backbone's cumulative MFLOPs up to it, and that as a fraction of the
    whole backbone (body and tail)."""

    name: str
    module: str
    shape: tuple[int, ...]
    reduction: float
    mflops: float
    cumulative_mflops: float
    fraction: float

    @property
    def channels(self) -> int:
        return self.shape[0]


@dataclass
class Backbone:
    """A torchvision network prepared for cutting: `body` (name, module) in forward order, `tail` (the last
    exit's head), `candidates` measured at `input_shape`."""

    builder: str
    network: nn.Module
    body: list[tuple[str, nn.Module]]
    tail: nn.Sequential
    input_shape: tuple[int, int, int]
    candidates: list[Candidate]
    tail_mflops: float

    @property
    def mflops(self) -> float:
        """The whole backbone's MFLOPs per input: body and tail (no exit heads)."""
        return (self.candidates[-1].cumulative_mflops if self.candidates else 0.0) + self.tail_mflops


def _body(network: nn.Module, layout: Layout) -> list[tuple[str, nn.Module]]:
    tail_children = {t for t in layout.tail if not isinstance(t, TailStep)}
    body: list[tuple[str, nn.Module]] = []
    for name, child in network.named_children():
        if name in tail_children:
            continue
        if name == layout.container:
            body.extend((f"{name}.{sub}", module) for sub, module in child.named_children())
        else:
            body.append((name, child))
    return body


def _tail(network: nn.Module, layout: Layout) -> nn.Sequential:
    steps = {TailStep.FLATTEN: lambda: nn.Flatten(1), TailStep.POOL: lambda: nn.AdaptiveAvgPool2d(1),
             TailStep.RELU: lambda: nn.ReLU()}
    return nn.Sequential(OrderedDict(
        (t.value, steps[t]()) if isinstance(t, TailStep) else (t, getattr(network, t)) for t in layout.tail))


def _count_mflops(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = module(x)
    return out, counter.get_total_flops() / 1e6


@torch.no_grad()
def _measure(body: list[tuple[str, nn.Module]], tail: nn.Module, input_shape: tuple[int, int, int]
             ) -> tuple[list[Candidate], float]:
    """Each body module's output shape and MFLOPs at batch 1 (eval mode: BatchNorm takes 1x1 maps), and the
    tail's MFLOPs."""
    modules = nn.ModuleList([m for _, m in body] + [tail])
    was_training = [m.training for m in modules]
    modules.eval()
    x = torch.zeros(1, *input_shape)
    rows: list[tuple[str, nn.Module, torch.Tensor, float]] = []
    try:
        for name, module in body:
            x, mflops = _count_mflops(module, x)
            rows.append((name, module, x, mflops))
        _, tail_mflops = _count_mflops(tail, x)
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    total = sum(r[3] for r in rows) + tail_mflops
    candidates, cumulative = [], 0.0
    for name, module, out, mflops in rows:
        cumulative += mflops
        shape = tuple(int(s) for s in out.shape[1:])
        reduction = input_shape[1] / shape[1] if len(shape) == 3 else float("nan")
        candidates.append(Candidate(name, type(module).__name__, shape, reduction, mflops, cumulative,
                                    cumulative / total if total > 0 else 0.0))
    return candidates, tail_mflops


def load_backbone(builder: str, num_classes: int = 10, input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE, *,
                  small_input_stem: bool = False, weights: str | None = None, weights_path: str | Path | None = None,
                  **builder_kwargs: Any) -> Backbone:
    """Build torchvision's `builder` for `num_classes`, load weights, adapt the stem and input channels, and
    describe its exit candidates at `input_shape` (C, H, W).

    Raises UnknownModelError (not a builder), BackboneError (refused class, bad arguments, weights that do not
    fit) or WeightsUnavailable (named weights offline)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise BackboneError(f"input_shape must be [channels, height, width], got {list(input_shape)}")
    if weights and weights_path:
        raise BackboneError("give weights (a torchvision weights name) or weights_path (a file), not both")
    network = _construct(builder, num_classes, builder_kwargs)
    layout = _layout(network, builder)
    if weights or weights_path:
        state = _named_weights(builder, weights) if weights else _file_weights(weights_path)  # type: ignore[arg-type]
        _load_weights(network, state, f"weights {weights}" if weights else f"weights_path {weights_path}",
                      _classifier_name(network, layout))
    if small_input_stem:
        if weights or weights_path:
            log.info("small_input_stem on %s: %s (a new stem conv starts from random weights)", builder,
                     layout.stem.value)
        _small_input_stem(network, layout, builder, shape[0])
    _adapt_input_conv(network, shape[0])
    body, tail = _body(network, layout), _tail(network, layout)
    try:
        candidates, tail_mflops = _measure(body, tail, shape)  # type: ignore[arg-type]
    except RuntimeError as exc:  # e.g. an input too small for the network's pools
        raise BackboneError(f"{FAMILY}:{builder} cannot run on {list(shape)} inputs ({_one_line(exc)})") from exc
    return Backbone(builder, network, body, tail, shape, candidates, tail_mflops)  # type: ignore[arg-type]


def _nearest_in_order(fractions: Sequence[float], usable: Sequence[Candidate], spec: str) -> list[str]:
    """Distinct candidates in forward order, one per fraction (ascending), whose fractions of the backbone's
    MFLOPs are nearest to the asked ones: the order-keeping choice with the smallest summed distance (so two
    close fractions on a coarse backbone take neighbouring candidates); ties go to earlier candidates."""
    if list(fractions) != sorted(fractions):
        raise BackboneError(f"exits {spec!r}: fractions must be in ascending order")
    m, n = len(fractions), len(usable)
    if m > n:
        raise BackboneError(f"exits {spec!r} asks for {m} exits; this backbone has {n} candidates before its last "
                            "module")
    # best[j][i]: (summed distance, picks) for fractions j.. using candidates i.. (dynamic programming)
    best: list[list[tuple[float, tuple[int, ...]]]] = [[(0.0, ())] * (n + 1) for _ in range(m + 1)]
    for j in range(m - 1, -1, -1):
        best[j][n - (m - j) + 1:] = [(float("inf"), ())] * (m - j)
        for i in range(n - (m - j), -1, -1):
            take = best[j + 1][i + 1]
            take = (take[0] + abs(usable[i].fraction - fractions[j]), (i, *take[1]))
            best[j][i] = take if take[0] <= best[j][i + 1][0] else best[j][i + 1]
    return [usable[i].name for i in best[0][0][1]]


def resolve_exits(spec: Sequence[str] | str | None, candidates: Sequence[Candidate]) -> list[str]:
    """Exit names from `spec`: a list of candidate names (or one comma-separated string), `"flops:f1,f2,..."`
    (the candidates nearest to those fractions of the backbone's MFLOPs, in order) or None
    (DEFAULT_EXITS). The last candidate cannot be an exit (the tail follows it). BackboneError otherwise."""
    usable = list(candidates[:-1])
    spec = DEFAULT_EXITS if spec is None else spec
    if isinstance(spec, str) and spec.startswith(FLOPS_PREFIX):
        try:
            fractions = [float(f) for f in spec[len(FLOPS_PREFIX):].split(",")]
        except ValueError:
            raise BackboneError(f"exits {spec!r} must be flops:<fraction>,<fraction>,... (e.g. flops:0.25,0.5)") from None
        if not all(0 < f < 1 for f in fractions):
            raise BackboneError(f"exits {spec!r}: fractions must lie strictly between 0 and 1")
        names = _nearest_in_order(fractions, usable, spec)
    else:
        names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
    order = [c.name for c in candidates]
    valid = ", ".join(order[:-1])
    if not names:
        raise BackboneError(f"exits must name at least one of: {valid}")
    for name in names:
        if name not in order:
            raise BackboneError(f"exit {name!r} is not a candidate; candidates: {valid}")
        if name == order[-1]:
            raise BackboneError(f"exit {name!r} is the body's last module, which the tail (the last exit) follows; "
                                f"pick an earlier one: {valid}")
    positions = [order.index(n) for n in names]
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise BackboneError(f"exits {spec!r} resolve to {names}: each exit must come after the previous one")
    return names


# ---------------------------------------------------------------- the multi-exit network

def _module_key(name: str) -> str:
    return name.replace(".", "_")


def _out_of_place_start(stage: nn.Module) -> None:
    """Make the first operation of a stage out-of-place: it reads the features the previous head read."""
    first = stage
    while isinstance(first, nn.Sequential) and len(first):
        first = first[0]
    if getattr(first, "inplace", False):
        first.inplace = False


class TorchvisionMultiExit(MultiExitNetwork):
    """A torchvision classifier cut after `exits` (candidate names, in order): stage k runs the body from the
    previous exit to exit k (stage 1 starts with Normalize), head k is a `head`-kind head, and the last stage
    runs the rest of the body into the network's own tail (the last exit). Input N x C x H x W in [0, 1]."""

    def __init__(self, backbone: Backbone, exits: Sequence[str], num_classes: int,
                 head: HeadKind | str = HeadKind.CONV1X1, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        names = [name for name, _ in backbone.body]
        cuts = [names.index(e) + 1 for e in exits] + [len(names)]
        stages: list[nn.Module] = []
        start = 0
        for k, end in enumerate(cuts):
            modules = [(_module_key(n), m) for n, m in backbone.body[start:end]]
            if k == 0:
                modules.insert(0, ("normalize", Normalize(mean, std)))
            stages.append(nn.Sequential(OrderedDict(modules)))
            start = end
        for stage in stages[1:]:
            _out_of_place_start(stage)
        by_name = {c.name: c for c in backbone.candidates}
        heads = [build_head(head, by_name[e].channels, num_classes) for e in exits] + [backbone.tail]
        super().__init__(stages, heads, backbone.input_shape)
        self.builder = backbone.builder
        self.exit_names = list(exits)
        self.candidates = list(backbone.candidates)


@torch.no_grad()
def check_equivalence(model: TorchvisionMultiExit, network: nn.Module, atol: float = EQUIVALENCE_ATOL,
                      seed: int = 0) -> float:
    """Max |difference| between the chained stages and tail (the last exit) and `network`'s own forward on a
    normalized random batch of 2, in eval mode; BackboneError above `atol`."""
    was_training = model.training
    model.eval()
    network.eval()
    try:
        x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(seed))
        features = x
        for k in range(model.num_exits):
            features = model.forward_stage(k, features)
        ours = model.forward_head(model.num_exits - 1, features)
        theirs = network(model.stages[0].normalize(x))
    finally:
        model.train(was_training)
    diff = float((ours - theirs).abs().max())
    if not diff <= atol:  # also catches NaN
        raise BackboneError(f"{FAMILY}:{model.builder} cut at {model.exit_names} does not reproduce its own forward "
                            f"(max |diff| {diff:.3g} > {atol:g}): its forward does work outside its children; "
                            f"fix its entry in LAYOUTS in {__name__}")
    return diff


def _warn_costly_heads(model: TorchvisionMultiExit) -> None:
    cost = model.cost_profile()
    for k in range(model.num_exits - 1):
        share = cost.head_mflops[k] / cost.full if cost.full > 0 else 0.0
        if share > HEAD_COST_WARNING:
            log.warning("%s: the head at exit %d (%s) costs %.3g MFLOPs, %.0f%% of the full network (%.3g MFLOPs); "
                        "consider head: %s", model.builder, k + 1, model.exit_names[k], cost.head_mflops[k],
                        100 * share, cost.full, HeadKind.LINEAR.value)


def torchvision_network(builder: str, num_classes: int = 10, *, input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
                        exits: Sequence[str] | str | None = None, head: HeadKind | str = HeadKind.CONV1X1,
                        small_input_stem: bool = False, weights: str | None = None,
                        weights_path: str | Path | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, **builder_kwargs: Any) -> TorchvisionMultiExit:
    """`create_model("torchvision:<builder>", ...)`: build, cut, check equivalence (EQUIVALENCE_ATOL) and warn
    about costly heads. `model_args` records what rebuilds the same network (resolved exit names; not the
    weights, which a checkpoint's state dict replaces). Errors: see `load_backbone` and `resolve_exits`."""
    try:
        head = HeadKind(head)
    except ValueError:
        raise BackboneError(f"head must be one of {', '.join(k.value for k in HeadKind)}, got {head!r}") from None
    backbone = load_backbone(builder, num_classes, input_shape, small_input_stem=small_input_stem, weights=weights,
                             weights_path=weights_path, **builder_kwargs)
    names = resolve_exits(exits, backbone.candidates)
    model = TorchvisionMultiExit(backbone, names, num_classes, head, mean, std)
    check_equivalence(model, backbone.network)
    _warn_costly_heads(model)
    model.model_args = {"input_shape": list(backbone.input_shape), "exits": names, "head": head.value,
                        "small_input_stem": bool(small_input_stem), "mean": [float(m) for m in mean],
                        "std": [float(s) for s in std], **builder_kwargs}
    log.info("%s:%s cut at %s (%d exits, %.3g MFLOPs full, %s)", FAMILY, builder, names, model.num_exits,
             model.cost_profile().full, f"weights {weights or weights_path}" if weights or weights_path else "random init")
    return model


register_family(FAMILY, torchvision_network)
