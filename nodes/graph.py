"""Facts read off the API prompt (the graph the host runs): which latent batch each quality-token source
feeds, and the seed, prompt, checkpoint and adapter behind a set of images.

Plain dicts in, plain values out (no ComfyUI imports), so the rules are testable on their own. A fact the
graph does not state literally (a value wired from another node) is reported as unknown, never guessed.
"""
from __future__ import annotations

import threading

from ..adapter.errors import InputError

TOKEN_SOURCES = ("IQAAdapterEncodeTarget", "IQATargetSweep")
SEED_INPUTS = ("seed", "noise_seed")
MODEL_FILE_INPUTS = ("ckpt_name", "unet_name", "model_name")


def _link(value):
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)):
        return str(value[0])
    return None


def _node(prompt: dict, node_id):
    node = prompt.get(str(node_id)) if node_id is not None else None
    return node if isinstance(node, dict) and isinstance(node.get("inputs"), dict) else None


def _upstream(prompt: dict, node_id, input_name: str):
    node = _node(prompt, node_id)
    return _link(node["inputs"].get(input_name)) if node else None


def _literal(prompt: dict, node_id, input_name: str, depth: int = 3):
    """The literal value of an input, following a wire to a node that holds it under the same name or
    'value' (primitive nodes) up to `depth` hops; None when not literal."""
    node = _node(prompt, node_id)
    if node is None:
        return None
    value = node["inputs"].get(input_name)
    source = _link(value)
    if source is None:
        return value
    if depth and (upstream := _node(prompt, source)) is not None:
        for name in (input_name, "value", "text", "string"):
            if name in upstream["inputs"]:
                return _literal(prompt, source, name, depth - 1)
    return None


def _model_chain(prompt: dict, node_id, limit: int = 64):
    """Nodes met walking up a sampler's 'model' wire (patch nodes, adapter applies, the loader)."""
    seen = []
    current = _upstream(prompt, node_id, "model")
    while current is not None and current not in seen and len(seen) < limit:
        seen.append(current)
        current = _upstream(prompt, current, "model")
    return seen


def _samplers(prompt: dict):
    return [node_id for node_id, node in prompt.items() if _node(prompt, node_id)
            and "model" in node["inputs"] and ("latent_image" in node["inputs"] or "samples" in node["inputs"])
            and any(name in node["inputs"] for name in SEED_INPUTS + ("positive",))]


def latent_batch_size(prompt: dict, sampler_id) -> int | None:
    latent = _upstream(prompt, sampler_id, "latent_image") or _upstream(prompt, sampler_id, "samples")
    size = _literal(prompt, latent, "batch_size", depth=1) if latent else None
    return int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else None


def token_batches(prompt: dict) -> dict[str, list[tuple[str, int]]]:
    """{token source node id: [(sampler id, literal latent batch size)]} for every sampler whose model
    passes through Apply Quality Adapter fed (directly) by that source."""
    found: dict[str, list[tuple[str, int]]] = {}
    for sampler in _samplers(prompt):
        batch = latent_batch_size(prompt, sampler)
        if batch is None:
            continue
        for node_id in _model_chain(prompt, sampler):
            if prompt[node_id].get("class_type") != "IQAAdapterApply":
                continue
            source = _upstream(prompt, node_id, "tokens")
            if source is not None and prompt.get(source, {}).get("class_type") in TOKEN_SOURCES:
                found.setdefault(source, []).append((sampler, batch))
    return found


def _ancestors(prompt: dict, node_id, limit: int = 256) -> list[str]:
    order, queue = [], [str(node_id)]
    while queue and len(order) < limit:
        current = queue.pop(0)
        node = _node(prompt, current)
        if node is None or current in order:
            continue
        order.append(current)
        queue += [link for value in node["inputs"].values() if (link := _link(value)) is not None]
    return order


def _conditioning_text(prompt: dict, node_id, limit: int = 16) -> str | None:
    for current in _ancestors(prompt, node_id, limit):
        text = _literal(prompt, current, "text")
        if isinstance(text, str):
            return text
    return None


def generation_facts(prompt: dict, images_node_id) -> dict:
    """{'seed', 'prompt', 'model', 'adapter'} of the sampler that made the images wired from
    `images_node_id` (values the graph states literally; '' / None where it does not)."""
    facts = {"seed": None, "prompt": "", "model": "", "adapter": ""}
    ancestors = _ancestors(prompt, images_node_id)
    sampler = next((n for n in ancestors if n in _samplers(prompt)), None)
    if sampler is None:
        return facts
    for name in SEED_INPUTS:
        seed = _literal(prompt, sampler, name)
        if isinstance(seed, (int, float)) and not isinstance(seed, bool):
            facts["seed"] = int(seed)
            break
    positive = _upstream(prompt, sampler, "positive")
    if positive is not None:
        facts["prompt"] = _conditioning_text(prompt, positive) or ""
    adapters = []
    for node_id in _model_chain(prompt, sampler):
        node = prompt[node_id]
        for name in MODEL_FILE_INPUTS:
            if isinstance(node["inputs"].get(name), str) and not facts["model"]:
                facts["model"] = node["inputs"][name]
        if node.get("class_type") == "IQAAdapterApply":
            loader = _upstream(prompt, node_id, "adapter")
            name = _literal(prompt, loader, "adapter_name") if loader else None
            if isinstance(name, str):
                adapters.append(name)
    facts["adapter"] = ", ".join(dict.fromkeys(adapters))
    return facts


# ------------------------------------------------------------------ queue-time batch facts
# The host validates a node with its own inputs only. An on-prompt hook (run by the server just before
# validation) records, per token source node, the batch sizes its tokens will meet and the inputs it had;
# the node's validate_inputs reads them back when its inputs are the same.
_BATCHES: dict[str, tuple[dict, list[tuple[str, int]]]] = {}
_BATCHES_LOCK = threading.Lock()
_BATCHES_MAX = 256


def record_prompt(json_data):
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict):
        found = token_batches(prompt)
        sources = [n for n, node in prompt.items() if isinstance(node, dict) and node.get("class_type") in TOKEN_SOURCES
                   and isinstance(node.get("inputs"), dict)]
        with _BATCHES_LOCK:
            for node_id in sources:  # this prompt's facts replace an earlier prompt's, known or not
                _BATCHES[node_id] = (_literal_inputs(prompt[node_id]["inputs"]), found.get(node_id, []))
            while len(_BATCHES) > _BATCHES_MAX:
                del _BATCHES[next(iter(_BATCHES))]
    return json_data


def _literal_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if _link(v) is None}


def recorded_batches(node_id, inputs: dict) -> list[tuple[str, int]]:
    """Batch sizes recorded for this node by the current prompt ([] when unknown or inputs differ)."""
    with _BATCHES_LOCK:
        entry = _BATCHES.get(str(node_id))
    if entry is None:
        return []
    recorded, batches = entry
    same = all(recorded.get(k) == v for k, v in inputs.items() if k in recorded)
    return batches if same else []


def check_batches(node_id, inputs: dict, rows: int, input_name: str) -> None:
    """`rows` token rows against the latent batches this node's tokens meet in the current prompt (as
    recorded for these `inputs`): 1 row fits any batch, more must equal it."""
    for sampler, batch in recorded_batches(node_id, inputs):
        if rows > 1 and batch != rows:
            raise InputError(f"{rows} target rows but the latent batch of sampler #{sampler} is {batch}; set its "
                             f"batch size to {rows} (wire this node's 'count' output into it) or use one row",
                             input_name)


def register_prompt_hook() -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None and record_prompt not in instance.on_prompt_handlers:
        instance.add_on_prompt_handler(record_prompt)
