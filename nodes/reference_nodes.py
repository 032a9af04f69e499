"""IQAAdapterEncodeReference: a reference image -> quality tokens of a reference-kind IQA-Adapter.

Glue only: the activation extraction and projection live in adapter/reference.py.
"""
from __future__ import annotations

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..adapter import errors, iqa_models, projection
from ..adapter import reference as reference_encoding
from ..adapter.iqa_adapter import IQAAdapter
from . import presentation
from .limits import host_batch_cap
from .metric_nodes import image_to_bchw

NODE = "IQAAdapterEncodeReference"


def _fail(input_name: str, message: str):
    errors.fail(NODE, input_name, message)


class IQAAdapterEncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            NODE, presentation.GENERATE,
            description="Take the look of a reference image's quality (sharpness, noise, aesthetics), not its "
                        "content: needs a reference-kind adapter and the quality metric it was trained with. One "
                        "token row per reference image.",
            inputs=[
                io.Custom("IQA_ADAPTER").Input("adapter", tooltip="A reference-kind adapter (descriptor kind 'reference')."),
                io.Image.Input("reference", tooltip="Reference image(s) whose quality traits to transfer."),
                io.Custom("IQA_METRIC").Input(
                    "metric", tooltip="The IQA model the adapter was trained on (named in its descriptor's extractor)."),
                io.Image.Input("negative_reference", optional=True,
                               tooltip="Optional: its tokens replace the default unconditional tokens projection(0)."),
            ],
            outputs=[io.Custom("QUALITY_TOKENS").Output(display_name="tokens")],
        )

    @classmethod
    @errors.node_errors(NODE, "reference")
    def execute(cls, adapter, reference, metric, negative_reference=None) -> io.NodeOutput:
        if not isinstance(adapter, IQAAdapter):
            _fail("adapter", f"expected an IQA_ADAPTER from IQA-Adapter Loader, got {type(adapter).__name__}")
        if not isinstance(metric, iqa_models.LoadedMetric):
            _fail("metric", f"expected an IQA_METRIC from IQA Metric Loader, got {type(metric).__name__}")
        return io.NodeOutput(encode(adapter, reference, metric, negative_reference))


def encode(adapter, images, metric, negative=None):
    try:
        reference_encoding.check_reference_adapter(adapter, metric)
    except ValueError as error:
        _fail("adapter" if "score-conditioned" in str(error) else "metric", str(error))
    bar = comfy.utils.ProgressBar(2 if negative is not None else 1)
    images_bchw = image_to_bchw(images, NODE, "reference")
    try:  # one token row per reference image: bounded by the adapter's architecture and the host's batch cap
        projection.check_row_count(images_bchw.shape[0], projection.max_rows_for(adapter.info, host_batch_cap()),
                                   "reference images")
    except ValueError as error:
        _fail("reference", str(error))
    negative_bchw = image_to_bchw(negative, NODE, "negative_reference") if negative is not None else None
    comfy.model_management.throw_exception_if_processing_interrupted()
    try:
        tokens = reference_encoding.encode_reference(adapter, metric, images_bchw, negative_bchw)
    except ValueError as error:
        _fail("reference", str(error))
    bar.update_absolute(bar.total, bar.total)
    return tokens


NODES = [IQAAdapterEncodeReference]
