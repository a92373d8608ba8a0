"""What :func:`~certify_fx.convert` returns: a GraphModule with timm's classifier API.

A converted model is used where a timm model was: ``num_classes``, a ``pretrained_cfg`` that
makes timm's data pipeline feed the ``[0, 1]`` pixels its certificates are stated in (see
:mod:`certify_fx.pretrained_cfg`), ``get_classifier`` / ``reset_classifier`` for fine-tuning on
another label set, and ``forward_features`` / ``forward_head`` split at the classifier.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import CertifyFxError
from ..pretrained_cfg import pixel_space_cfg

__all__ = ["ConvertedModel"]

#: Attributes the conversion records on its result, kept when the graph module is rebuilt.
_RECORDS = ("input_shape", "conversion", "rewrite_log")


class ConvertedModel(fx.GraphModule):
    """A converted classifier whose last operation is its (linear) classifier.

    Unlike timm's, ``forward_features`` returns what the classifier receives (already pooled),
    so ``forward_head`` is the classifier alone.
    """

    @classmethod
    def from_graph_module(cls, gm: fx.GraphModule, input_shape: Sequence[int]) -> "ConvertedModel":
        model = cls(gm, gm.graph, class_name="ConvertedModel")
        for name in _RECORDS:
            if hasattr(gm, name):
                setattr(model, name, getattr(gm, name))
        was_training = gm.training
        model.train(was_training)
        with torch.no_grad():
            logits = model.eval()(torch.zeros(2, *input_shape, dtype=_dtype(model)))
        model.train(was_training)
        model.num_classes = int(logits.shape[-1])
        model.pretrained_cfg = pixel_space_cfg(input_shape, model.num_classes, classifier=model._head_node().target
                                               if model._head_node() is not None else "")
        return model

    def __deepcopy__(self, memo: dict) -> "ConvertedModel":
        # GraphModule's deepcopy rebuilds a plain GraphModule; keep the class and the records
        # (timm's ModelEmaV3 and copy-based fine-tuning deep-copy models)
        plain = super().__deepcopy__(memo)
        copied = ConvertedModel(plain, plain.graph, class_name="ConvertedModel")
        for name in (*_RECORDS, "num_classes", "pretrained_cfg"):
            if name in self.__dict__:
                setattr(copied, name, copy.deepcopy(self.__dict__[name], memo))
        return copied.train(self.training)

    @property
    def default_cfg(self) -> dict[str, Any]:  # the name older timm releases read
        return self.pretrained_cfg

    def _head_node(self) -> fx.Node | None:
        """The classifier's node: a linear module whose result is the output, if there is one."""
        output = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        node = output.args[0]
        if isinstance(node, fx.Node) and node.op == "call_module":
            if isinstance(self.get_submodule(node.target), (nn.Linear, nn.Identity)):
                return node
        return None

    def _require_head(self) -> fx.Node:
        node = self._head_node()
        if node is None:
            raise CertifyFxError("this converted model does not end in a linear classifier, so it has no "
                                 "classifier to return, reset or split at")
        return node

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self._require_head().target)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier of the same kind for ``num_classes`` (0: none, features out)."""
        if global_pool is not None:
            raise ValueError("a converted model keeps its pooling; reset_classifier takes no global_pool")
        node = self._require_head()
        old = self.get_submodule(node.target)
        features = old.in_features if isinstance(old, nn.Linear) else self.pretrained_cfg["num_features"]
        kind = type(old) if isinstance(old, nn.Linear) else nn.Linear
        new = kind(features, num_classes) if num_classes else nn.Identity()
        parent, _, name = node.target.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, name, new.to(_dtype(self)))
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes, "num_features": features}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier receives."""
        return _features_module(self)(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The classifier applied to ``forward_features``' output (``pre_logits``: not applied)."""
        return x if pre_logits else self.get_classifier()(x)


def _dtype(module: nn.Module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.get_default_dtype()


def _features_module(model: ConvertedModel) -> fx.GraphModule:
    """The graph up to the classifier's input, built once per graph (held outside ``_modules`` so
    that it adds nothing to the state_dict)."""
    cached = model.__dict__.get("_features")
    if cached is not None and cached[0] is model.graph:
        return cached[1]
    head = model._require_head()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in model.graph.nodes:
        if node is head:
            graph.output(env[head.args[0]])
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    features = fx.GraphModule(model, graph, class_name="ConvertedFeatures")
    features.graph.eliminate_dead_code()
    features.recompile()
    model.__dict__["_features"] = (model.graph, features)
    return features
