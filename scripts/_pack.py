"""Import this checkout as a Python package without putting its folders on sys.path.

The host has top-level modules with common names (`nodes`, `utils`, ...), so the pack's own folders
must only ever be reached as submodules of one package: `comfyui_iqa_adapter.adapter`, ...
"""
import importlib.util
import pathlib
import sys

PACK_NAME = "comfyui_iqa_adapter"
PACK_ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module
