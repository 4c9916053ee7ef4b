"""A backbone cut at a stage boundary: the *trunk* (image -> the activation before its last N stages) and the
*tail* (that activation -> embedding). A fine-tuned version of a head owns a tail (its last N stages, tuned) and
shares the build's frozen trunk, so a server runs the trunk once for every version and each tail on its rows only.

The cut is made on the module's ``torch.fx`` graph, whatever the architecture: the nodes before the first node of
the tail's first stage (the registry's ``stages``) make the trunk, the rest the tail. Exactly one value may cross
the cut (the activation), else it is refused. Both parts are ``GraphModule`` s over the module's own submodules
(the same parameters, the same arithmetic): in eager PyTorch, tail(trunk(x)) equals the whole module bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ..core.errors import BadRequest
from .backbones import LoadedBackbone, stage_paths

ROOT = "features"  # NormalizedBackbone's attribute holding the torchvision model: every stage path is under it


class CutError(BadRequest):
    """A cut that cannot be made: no such stage, or more than one value crossing the boundary."""


@dataclass
class Cut:
    """A backbone cut before its last ``stages`` stages: ``at`` is the dotted path of the tail's first module,
    ``activation`` the per-image shape of what the trunk hands the tail."""

    stages: int
    at: str
    trunk: nn.Module
    tail: nn.Module
    activation: tuple[int, ...]

    def record(self) -> dict:
        """What a manifest keeps of the cut (enough to make it again from the build's backbone)."""
        return {"stages": self.stages, "at": self.at, "activation": list(self.activation)}


def cut_backbone(backbone: LoadedBackbone, stages: int) -> Cut:
    """``backbone.module`` cut before its last ``stages`` stages (:class:`CutError` when it cannot be): the two parts
    share the module's parameters, so a cut of a fine-tuned module has its tuned tail."""
    first = stage_paths(backbone.spec, stages)[0]  # a clear error for a count the backbone does not have
    graph = torch.fx.symbolic_trace(backbone.module).graph
    nodes = list(graph.nodes)
    target = f"{ROOT}.{first}"
    start = next(
        (
            i
            for i, node in enumerate(nodes)
            if node.op == "call_module" and (node.target == target or str(node.target).startswith(target + "."))
        ),
        None,
    )
    if start is None:
        raise CutError(f"{backbone.spec.name}: stage module {first!r} never runs in the embedding's forward pass")
    side = {node: int(i >= start) for i, node in enumerate(nodes)}
    crossing = [node for node in nodes if not side[node] and node.op != "get_attr" and any(side[u] for u in node.users)]
    if len(crossing) != 1:
        names = ", ".join(node.name for node in crossing)
        raise CutError(
            f"{backbone.spec.name} cannot be cut before its last {stages} stage(s): {len(crossing)} values cross "
            f"the boundary at {first} ({names}); a tail takes one activation"
        )
    (edge,) = crossing
    trunk_graph, trunk_env = _part(nodes, side, 0, {nodes[0]: "image"})
    trunk_graph.output(trunk_env[edge])
    tail_graph, tail_env = _part(nodes, side, 1, {edge: "activation"})
    tail_graph.output(torch.fx.map_arg(nodes[-1].args[0], lambda arg: tail_env[arg]))
    trunk = torch.fx.GraphModule(backbone.module, trunk_graph).eval()
    tail = torch.fx.GraphModule(backbone.module, tail_graph).eval()
    size = backbone.preprocessing.crop_size
    with torch.no_grad():
        activation = trunk(torch.zeros((1, 3, size, size), dtype=torch.uint8))
    return Cut(stages, first, trunk, tail, tuple(activation.shape[1:]))


def _part(
    nodes: list[torch.fx.Node], side: dict[torch.fx.Node, int], which: int, inputs: dict[torch.fx.Node, str]
) -> tuple[torch.fx.Graph, dict[torch.fx.Node, torch.fx.Node]]:
    """A new graph with placeholders for ``inputs`` and a copy of every node on side ``which`` (a parameter read,
    ``get_attr``, is copied to each side that uses it)."""
    graph = torch.fx.Graph()
    env = {node: graph.placeholder(name) for node, name in inputs.items()}
    for node in nodes:
        if node in env or node.op in ("placeholder", "output"):
            continue
        used_here = any(side[user] == which for user in node.users)
        if (node.op == "get_attr" and used_here) or (node.op != "get_attr" and side[node] == which):
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    return graph, env


def tail_state(cut: Cut) -> dict[str, torch.Tensor]:
    """The tail's parameters and buffers (what a tuned version saves: the trunk is the build's backbone.pt)."""
    return {key: value.detach().clone() for key, value in cut.tail.state_dict().items()}
