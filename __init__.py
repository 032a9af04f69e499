"""ComfyUI IQA-Adapter: quality-aware generation (arXiv 2412.01794) as ComfyUI nodes.

Only the V3 entrypoint is exported. It imports the node layer lazily so that `adapter/` and `models/`
stay importable (and testable) without ComfyUI.
"""


# Served by the host at /extensions/<pack folder>/: js/ (scores on the canvas, preset <-> slider) and
# docs/<NodeId>.md (the frontend's per-node help pages).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import IQAAdapterExtension

    return IQAAdapterExtension()
