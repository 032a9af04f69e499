"""Thin ComfyUI layer: one module per concern, each exporting NODES (a list of io.ComfyNode classes)."""
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import adapter_nodes, graph, guidance_nodes, metric_nodes, paths, reference_nodes, sweep_nodes

NODE_MODULES = [
    adapter_nodes,
    reference_nodes,
    metric_nodes,
    guidance_nodes,
    sweep_nodes,
]

# Hosts before 0.14 never call ComfyExtension.on_load: register folders when the layer is imported too
# (registration is idempotent).
paths.register_model_folders()
# Rows-vs-batch checks at queue time need the whole prompt, which node validation does not see.
graph.register_prompt_hook()


class IQAAdapterExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        """Awaited by hosts >= 0.14 before get_node_list: the place they give extensions for setup."""
        paths.register_model_folders()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        nodes: list[type[io.ComfyNode]] = []
        for module in NODE_MODULES:
            nodes.extend(module.NODES)
        return nodes
