"""ComfyUI IQA-Adapter: quality-aware generation (arXiv 2412.01794) as ComfyUI nodes.

Only the V3 entrypoint is exported. It imports the node layer lazily so that `adapter/` and `models/`
stay importable (and testable) without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import IQAAdapterExtension

    return IQAAdapterExtension()
