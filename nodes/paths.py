"""Model folders of the pack, registered with the host's folder_paths.

`extra_model_paths.yaml` is read before custom nodes load, so entries may already exist: add to them,
never replace them.
"""
import os

import folder_paths

ADAPTER_FOLDER = "iqa_adapter"  # IQA-Adapter checkpoints (+ optional sidecar JSON descriptors)
METRIC_FOLDER = "iqa"  # weights of IQA metrics (pyiqa architectures)
WEIGHT_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}


def register_model_folders() -> None:
    for name in (ADAPTER_FOLDER, METRIC_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        os.makedirs(default, exist_ok=True)
        if name in folder_paths.folder_names_and_paths:
            paths, extensions = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | WEIGHT_EXTENSIONS)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(WEIGHT_EXTENSIONS))
