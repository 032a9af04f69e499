"""IQAAdapterEncodeReference: a reference image -> quality tokens of a reference-kind IQA-Adapter.

Glue only: the activation extraction and projection live in adapter/reference.py.
"""
from __future__ import annotations

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..adapter import errors, iqa_models, projection
from ..adapter import reference as reference_encoding
from ..adapter.errors import InputError
from ..adapter.iqa_adapter import IQAAdapter
from . import presentation, types
from .inputs import image_to_bchw
from .limits import host_batch_cap

NODE = "IQAAdapterEncodeReference"


class IQAAdapterEncodeReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            NODE, presentation.GENERATE,
            description="Take the look of a reference image's quality (sharpness, noise, aesthetics), not its "
                        "content: needs a reference-kind adapter and the quality metric it was trained with. One "
                        "token row per reference image.",
            inputs=[
                types.Adapter.Input("adapter", tooltip="A reference-kind adapter (descriptor kind 'reference')."),
                io.Image.Input("reference", tooltip="Reference image(s) whose quality traits to transfer."),
                types.Metric.Input(
                    "metric",
                    tooltip="The IQA model the adapter was trained on (named in its descriptor's extractor)."),
                io.Image.Input("negative_reference", optional=True,
                               tooltip="Optional: its tokens replace the default unconditional tokens projection(0)."),
            ],
            outputs=[types.QualityTokens.Output(display_name="tokens")],
        )

    @classmethod
    @errors.node_errors(NODE, "reference")
    def execute(cls, adapter, reference, metric, negative_reference=None) -> io.NodeOutput:
        if not isinstance(adapter, IQAAdapter):
            raise InputError(f"expected an IQA_ADAPTER from IQA-Adapter Loader, got {type(adapter).__name__}",
                             "adapter")
        if not isinstance(metric, iqa_models.LoadedMetric):
            raise InputError(f"expected an IQA_METRIC from IQA Metric Loader, got {type(metric).__name__}", "metric")
        return io.NodeOutput(encode(adapter, reference, metric, negative_reference))


def encode(adapter, images, metric, negative=None):
    reference_encoding.check_reference_adapter(adapter, metric)
    bar = comfy.utils.ProgressBar(2 if negative is not None else 1)
    images_bchw = image_to_bchw(images, "reference")
    # one token row per reference image: bounded by the adapter's architecture and the host's batch cap
    projection.check_row_count(images_bchw.shape[0], projection.max_rows_for(adapter.info, host_batch_cap()),
                               "reference images", "reference")
    negative_bchw = image_to_bchw(negative, "negative_reference") if negative is not None else None
    comfy.model_management.throw_exception_if_processing_interrupted()
    tokens = reference_encoding.encode_reference(adapter, metric, images_bchw, negative_bchw)
    bar.update_absolute(bar.total, bar.total)
    return tokens


NODES = [IQAAdapterEncodeReference]
