"""Degradation studies: IQATargetSweep (one token row per target) and IQASweepReport (grid, chart, CSV, JSON).

Thin glue: spacing, statistics, tables and plots are adapter/sweep.py. Wire IQATargetSweep's tokens into
IQAAdapterApply and its `count` into the latent batch size: one sampler run renders the whole sweep
(row i of the tokens conditions latent i).
"""
from __future__ import annotations

import json
import math
import os

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..adapter import errors, files, iqa_models, projection, quality, sweep
from ..adapter.errors import InputError
from . import graph, presentation, types
from .limits import host_batch_cap

SWEEP = "IQATargetSweep"
REPORT = "IQASweepReport"


class IQATargetSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            SWEEP, presentation.SWEEP,
            description="Quality tokens for a row of targets, e.g. percentile 1 -> 99 (a degradation study). Feed "
                        "the tokens to Apply Quality Adapter and 'count' to the latent batch size: one sampler run "
                        "renders every target.",
            inputs=[
                types.Adapter.Input("adapter"),
                io.String.Input("metrics", default="",
                                tooltip="Metrics to sweep, comma separated. Empty: all of the adapter's metrics "
                                        "move together."),
                io.Float.Input("start", display_name="from", default=1.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="First target (percentile in (0, 100), z-score or raw, see mode)."),
                io.Float.Input("stop", display_name="to", default=99.0, min=-1000.0, max=1000.0, step=0.5,
                               tooltip="Last target."),
                io.Int.Input("steps", default=8, min=1, max=sweep.MAX_SWEEP_STEPS,
                             tooltip="Number of targets (default 8, evenly spaced from 'from' to 'to'); greyed "
                                     "out under 'quantile-knots' and 'paper', whose targets are fixed."),
                io.Combo.Input("mode", options=list(quality.TARGET_MODES), default="percentile",
                               tooltip="percentile: CC3M percentile; zscore: normalised value; raw: metric units."),
                io.Combo.Input("spacing", options=list(sweep.SPACINGS), default="linear",
                               tooltip="linear: evenly spaced; quantile-knots: the CC3M quantile levels "
                                       "(1, 5, 10, 25, 50, 75, 90, 95, 99) inside [from, to]; normal: evenly "
                                       "spaced in z, denser in the tails (percentile mode); paper: the "
                                       "paper's five targets, percentiles 1, 25, 50, 75, 99 (from/to/steps "
                                       "greyed out: not used)."),
                io.String.Input("hold", default="",
                                tooltip="Value of the adapter's metrics that are not swept: empty = CC3M median "
                                        "(p50 / z 0 / raw median), a number (in 'mode' units), or 'same' = the "
                                        "swept value. Unused when every metric is swept."),
                io.Float.Input("negative_scale", default=0.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="0: off (the authors' default; unconditional tokens = projection(0)). "
                                       "k > 0: negative quality guidance projection(-k * v); 0.5 is the "
                                       "authors' value when it is on."),
            ],
            outputs=[
                types.QualityTokens.Output(display_name="tokens"),
                types.Targets.Output(display_name="targets"),
                io.Int.Output(display_name="count"),
                io.String.Output(display_name="targets_text"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, metrics=None, start=None, stop=None, steps=None, mode=None, spacing=None, hold=None,
                        negative_scale=None):
        return presentation.validation(SWEEP, cls._check_queued, metrics, start, stop, steps, mode, spacing, hold,
                                       negative_scale)

    @classmethod
    def _check_queued(cls, metrics, start, stop, steps, mode, spacing, hold, negative_scale) -> None:
        sweep.check_sweep_inputs(metrics, start, stop, steps, mode, spacing, hold, negative_scale)
        if None in (start, stop, steps, mode, spacing):
            return
        graph.check_batches(cls.hidden.unique_id if cls.hidden else None,
                            {"start": start, "stop": stop, "steps": steps, "spacing": spacing},
                            len(sweep.sweep_values(start, stop, steps, spacing, mode)), "steps")

    @classmethod
    @errors.node_errors(SWEEP, "adapter")
    def execute(cls, adapter, metrics, start, stop, steps, mode, spacing, hold, negative_scale) -> io.NodeOutput:
        tokens, targets = sweep.sweep_tokens(adapter, metrics, start, stop, steps, mode, spacing, hold,
                                             negative_scale, projection.max_rows_for(adapter.info, host_batch_cap()))
        return io.NodeOutput(tokens, targets, len(targets), sweep.targets_text(targets.rows))


def scores_by_metric(scores, input_name: str) -> dict[str, list[float]]:
    """Accept what a scoring node may hand over: {metric: [floats]}, an object with `.scores` / `.by_metric`
    (such a dict) or with `.metric` + `.values`; returns {metric: list of floats}."""
    data = scores
    for attribute in ("by_metric", "scores"):
        if not isinstance(data, dict) and hasattr(data, attribute) and isinstance(getattr(data, attribute), dict):
            data = getattr(data, attribute)
    if not isinstance(data, dict) and hasattr(data, "metric") and hasattr(data, "values"):
        data = {data.metric: data.values}
    if isinstance(data, dict) and "metric" in data and "values" in data and len(data) <= 4:
        data = {data["metric"]: data["values"]}
    if not isinstance(data, dict) or not data:
        raise InputError(f"expected scores from IQA Score ({{metric: [one float per image]}}), got "
                         f"{type(scores).__name__}", input_name)
    out = {}
    for metric, values in data.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().float().cpu().reshape(-1).tolist()
        try:
            out[str(metric)] = [float(v) for v in values]
        except (TypeError, ValueError):
            raise InputError(f"scores of {errors.quote(metric)} are not a list of numbers", input_name) from None
    return out


def _directions(scores) -> dict[str, bool]:
    """lower_better per metric if the score object carries it."""
    for attribute in ("lower_better",):
        value = getattr(scores, attribute, None)
        if isinstance(value, dict):
            return {str(k): bool(v) for k, v in value.items()}
        if isinstance(value, bool) and hasattr(scores, "metric"):
            return {scores.metric: value}
    return {}


class IQASweepReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return presentation.schema(
            REPORT, presentation.SWEEP,
            description="Report of a target sweep: labelled image grid, chart of measured score vs target "
                        "(Spearman's rho, ideal line), CSV + JSON tables in the output folder. Seed, prompt, "
                        "checkpoint and adapter are read from the graph.",
            inputs=[
                io.Image.Input("images", tooltip="The sweep's images, image i rendered with target i."),
                types.Targets.Input("targets", tooltip="From IQA-Adapter Target Sweep."),
                types.Scores.Input("scores", optional=True, tooltip="From IQA Score (one score per image)."),
                types.Scores.Input("scores_2", optional=True, tooltip="A second metric's scores (optional)."),
                types.Metric.Input("metric", optional=True,
                                 tooltip="Score the images here with this metric (when no 'scores' are wired); "
                                         "images are squashed to 512x512 as the CC3M statistics were made."),
                io.String.Input("filename_prefix", default="iqa_sweep/sweep",
                                tooltip="Path prefix inside the output folder."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            outputs=[
                io.Image.Output(display_name="grid"),
                io.Image.Output(display_name="chart"),
                io.String.Output(display_name="summary"),
            ],
            is_output_node=True,
        )

    @classmethod
    @errors.node_errors(REPORT, "images")
    def execute(cls, images, targets, filename_prefix, scores=None, scores_2=None, metric=None) -> io.NodeOutput:
        if not isinstance(targets, sweep.SweepTargets):
            raise InputError("expected IQA_TARGETS from IQA-Adapter Target Sweep", "targets")
        if images.shape[0] != len(targets):
            raise InputError(f"{images.shape[0]} images for {len(targets)} targets; set the latent batch size to the "
                             f"sweep's 'count' ({len(targets)})", "images")
        measured: dict[str, list[float]] = {}
        directions: dict[str, bool] = {}
        sizes: dict[str, str] = {}
        for name, value in (("scores", scores), ("scores_2", scores_2)):
            if value is not None:
                by_metric = scores_by_metric(value, name)
                measured.update(by_metric)
                directions.update(_directions(value))
                sizes.update({m: str(getattr(value, "score_size", "")) for m in by_metric})
        if metric is not None:
            bar = comfy.utils.ProgressBar(images.shape[0])

            def progress(done, total):
                comfy.model_management.throw_exception_if_processing_interrupted()
                bar.update_absolute(done, total)
            values = iqa_models.score_in_chunks(metric, images.movedim(-1, 1).float().clamp(0, 1), chunk_size=4,
                                                progress=progress, score_size="cc3m")  # comparable with the targets
            measured[metric.name] = values.detach().float().cpu().tolist()
            sizes[metric.name] = "cc3m"
            directions[metric.name] = bool(metric.lower_better)
        if not measured:
            raise InputError("wire scores from IQA Score, or an IQA metric to score the images here", "scores")
        for name, values in measured.items():
            if len(values) != len(targets):
                raise InputError(f"{name}: {len(values)} scores for {len(targets)} images", "scores")

        with errors.blame(REPORT, "filename_prefix"):  # writing the report: file names and folders
            files.check_user_path(filename_prefix, "filename_prefix")
            output_dir = folder_paths.get_output_directory()
            try:
                full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
                    filename_prefix, output_dir, images.shape[2], images.shape[1])
            except Exception as error:  # the host raises for prefixes that leave the output folder
                raise InputError(str(error), "filename_prefix") from None
            os.makedirs(full_folder, exist_ok=True)
            # The host's counter only counts image names: never reuse a stem any earlier report file has.
            stem = files.free_stem(full_folder, f"{filename}_{counter:05}", sweep.REPORT_SUFFIXES + ("_img000.png",))
            array = images.detach().float().cpu().clamp(0, 1).numpy()
            image_names = []
            for i in range(array.shape[0]):
                name = f"{stem}_img{i:03}.png"
                pixels = (array[i] * 255.0 + 0.5).astype(np.uint8)
                files.create_new(os.path.join(full_folder, name), sweep.png_bytes(pixels))
                image_names.append(name)
            meta = cls.graph_facts()
            report = sweep.write_report(full_folder, stem, targets, measured, array, image_names, meta, directions,
                                        score_sizes=sizes)
        text = sweep.summary_text(report["summary"])
        markdown = sweep.summary_markdown(report["summary"], meta)
        ui_images = [{"filename": report["paths"][k].name, "subfolder": subfolder, "type": "output"}
                     for k in ("grid", "chart")]
        grid = torch.from_numpy(report["grid"].astype(np.float32) / 255.0)[None]
        chart = torch.from_numpy(report["chart"].astype(np.float32) / 255.0)[None]
        written = {k: os.path.join(subfolder, p.name) for k, p in report["paths"].items()}
        rho = {m: (s["rho"] if math.isfinite(s["rho"]) else None) for m, s in report["summary"].items()}
        return io.NodeOutput(grid, chart, text, ui={"images": ui_images, **presentation.markdown(markdown),
                                                   "report": [json.dumps({"files": written, "rho": rho})]})

    @classmethod
    def graph_facts(cls) -> dict:
        """Seed, prompt, checkpoint and adapter of the sampler behind this node's images ('' if not literal)."""
        prompt = getattr(cls.hidden, "prompt", None) if cls.hidden else None
        node_id = getattr(cls.hidden, "unique_id", None) if cls.hidden else None
        images = (prompt or {}).get(str(node_id), {}).get("inputs", {}).get("images")
        if not isinstance(images, list) or not images:
            return {"prompt": "", "seed": "", "model": "", "adapter": ""}
        facts = graph.generation_facts(prompt, images[0])
        return {**facts, "seed": "" if facts["seed"] is None else facts["seed"]}


NODES = [IQATargetSweep, IQASweepReport]
