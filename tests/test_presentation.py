"""What the artist sees, in-process: facts read off the graph, the score table and card, the encode node's
fallback to the slider. (The same things through the real server and frontend: test_queue_validation.py,
test_browser.py.)"""
from __future__ import annotations

import numpy as np

from support.graphs import txt2img


def _graph_module():
    import importlib

    from comfyui_iqa_adapter.adapter import score_card  # noqa: F401 - pack importable
    return importlib.import_module("comfyui_iqa_adapter.nodes.graph")


def quality_prompt(batch):
    prompt = txt2img(batch=batch, seed=42, text="a red bicycle")
    prompt["10"] = {"class_type": "IQAAdapterLoader", "inputs": {"adapter_name": "a.safetensors"}}
    prompt["11"] = {"class_type": "IQAAdapterEncodeTarget", "inputs": {"adapter": ["10", 0], "targets": "x"}}
    prompt["12"] = {"class_type": "IQAAdapterApply", "inputs": {"model": ["13", 0], "adapter": ["10", 0],
                                                                "tokens": ["11", 0]}}
    prompt["13"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0]}}  # another patch between
    prompt["5"]["inputs"]["model"] = ["12", 0]
    return prompt


def test_graph_facts_for_the_sweep_report(comfy):
    graph = _graph_module()
    prompt = quality_prompt(batch=3)
    prompt["20"] = {"class_type": "IQASweepReport", "inputs": {"images": ["6", 0]}}
    facts = graph.generation_facts(prompt, "6")
    assert facts == {"seed": 42, "prompt": "a red bicycle", "model": "tiny_sd15.safetensors",
                     "adapter": "a.safetensors"}
    prompt["5"]["inputs"]["seed"] = ["99", 0]  # seed from another node's output: not literal, not guessed
    prompt["99"] = {"class_type": "SomeSeedNode", "inputs": {}}
    assert graph.generation_facts(prompt, "6")["seed"] is None


def test_token_batches_follow_the_model_chain(comfy):
    graph = _graph_module()
    assert graph.token_batches(quality_prompt(batch=3)) == {"11": [("5", 3)]}
    wired = quality_prompt(batch=3)
    wired["4"]["inputs"]["batch_size"] = ["11", 1]  # count wired in: consistent by construction
    assert graph.token_batches(wired) == {}
    graph.record_prompt({"prompt": quality_prompt(batch=3)})
    assert graph.recorded_batches("11", {"targets": "x"}) == [("5", 3)]
    assert graph.recorded_batches("11", {"targets": "other"}) == []  # another prompt's node 11
    graph.record_prompt({"prompt": wired})  # the next prompt's node 11: its batch is not literal any more
    assert graph.recorded_batches("11", {"targets": "x"}) == []


def test_score_table_and_card(comfy):
    from comfyui_iqa_adapter.adapter import score_card

    scores = {"topiq_nr": [0.61234567, 0.5], "piqe": [33.333333333, float("nan")]}
    table = score_card.markdown_table(scores, {"topiq_nr": False, "piqe": True})
    assert "| 1 | 0.6123 | 33.33 |" in table and "| 2 | 0.5 | n/a |" in table
    assert "piqe (↓)" in table and "topiq_nr: higher is better" in table and "**mean**" in table
    card = score_card.render_card(scores, {"topiq_nr": False, "piqe": True})
    assert card.dtype == np.uint8 and card.shape[2] == 3 and card.shape[0] > 100 and card.std() > 10
