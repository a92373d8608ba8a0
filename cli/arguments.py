"""Arguments shared by the commands: model sources, shapes, radii."""

from __future__ import annotations

import argparse

__all__ = ["add_capture_argument", "add_model_arguments", "add_test_set_arguments", "eps_list_argument",
           "input_shape_argument", "load_from_args"]


def input_shape_argument(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,224,224, got {text!r}")
    return shape


def _kwarg(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. drop_rate=0.1), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model arguments every command that reads a model shares."""
    p.add_argument("model", metavar="MODEL", help=(
        "a training checkpoint (certify-fx train), a converted model (certify-fx convert -o), a timm model "
        "name (random weights unless --weights), 'module:attr' or 'file.py:attr'"))
    g = p.add_argument_group("model options (for a model name or file.py:attr)")
    g.add_argument("--num-classes", type=int, default=None, help="number of classes")
    g.add_argument("--in-chans", type=int, default=None, help="input channels (timm models), e.g. 1 for grey images")
    g.add_argument("--kwarg", type=_kwarg, action="append", default=[], metavar="KEY=VALUE",
                   help="another architecture argument of the model (repeatable; values are YAML). timm's loading "
                   "options (pretrained, checkpoint_path, pretrained_cfg, ...) are refused: use --weights")
    g.add_argument("--weights", "--checkpoint", "--pretrained-file", dest="weights", default=None, metavar="FILE",
                   help="load these weights strictly: a state_dict .pt/.pth, .safetensors or a certify-fx file")
    g.add_argument("--weights-key", default=None, metavar="KEY",
                   help="the entry of the weights file that holds the model (e.g. backbone; a/b for a nested one), "
                        "or a parameter-name prefix to strip (e.g. model for model.conv.weight)")
    g.add_argument("--trust-source", action="store_true",
                   help="allow a checkpoint or converted file made from Python code to import that code")


#: certify_fx.bounds.capture.CAPTURE_MODES, written out so that --help does not import torch (a test ties them)
CAPTURE_CHOICES = ("auto", "symbolic", "export")


def add_capture_argument(p: argparse.ArgumentParser) -> None:
    """``--capture``: how a command that bounds a model builds its graph."""
    p.add_argument("--capture", choices=CAPTURE_CHOICES, default="auto", help=(
        "how the model's graph is built: 'auto' traces it symbolically (torch.fx) and, where that fails "
        "(Python on weights, a branch on the input's shape), captures it with torch.export; 'symbolic' or "
        "'export' uses only that path (default: auto)"))


def load_from_args(args: argparse.Namespace):
    """The :class:`certify_fx.LoadedModel` the model arguments name."""
    from certify_fx.loading import load_model

    kwargs = dict(args.kwarg)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    return load_model(args.model, kwargs=kwargs, weights=args.weights, weights_key=args.weights_key,
                      trust_source=args.trust_source)


def eps_list_argument(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected radii like 0.1,0.2, got {text!r}")
    return values


def add_test_set_arguments(p: argparse.ArgumentParser, limit: int | None, limit_help: str) -> None:
    """The test set, radii and certificate kind of the commands that certify a dataset."""
    p.add_argument("--data", default=None, metavar="NAME", help="dataset (default: the recipe's)")
    p.add_argument("--root", default=None, help="dataset folder (default: the recipe's data.root)")
    p.add_argument("--eps", type=eps_list_argument, default=None, metavar="E1,E2",
                   help="radii to report VRA at (default: the recipe's eps.evaluate)")
    p.add_argument("--limit", type=int, default=limit, help=limit_help)
    p.add_argument("--method", choices=("lipschitz", "crc"), default="lipschitz",
                   help="certificate: 'lipschitz' (margins over K, default) or 'crc' (CRC-Lip, for models whose "
                        "classifier is a softplus MLP, e.g. lipconvnet_5 with head=mlp: a per-input convex "
                        "problem; each class keeps the larger of the two proven radii)")
    p.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="relaxed top-k certificates (lipschitz only): a point counts when its label provably stays "
                        "among the K largest logits inside the radius; accuracy becomes top-K accuracy (default 1)")
