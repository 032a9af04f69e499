"""Catalog of the released IQA-Adapter checkpoints (SDXL), used when a file has no sidecar JSON.

The authors distribute the weights through a Google Drive folder whose file names could not be read.
The candidates are the 26 adapters of the paper's cross-metric heatmap. Each entry lists its pyiqa
metric ids in the order we believe they were passed to the training CLI (the heatmap label's order).

How a file is matched (a documented GUESS; a sidecar `<stem>.json` next to the weights always wins):
- the file name is lower-cased and each entry's `required` tokens must all occur in it as substrings
  (each token is a tuple of alternatives, e.g. ("flive", "paq2piq"));
- entries whose input size cannot match the weights are dropped (see `input_dim_variants`);
- the entry with the most matched tokens (required + `optional`) wins; a tie is no match.

Every entry is *recipe-matched*, never exact: no released file is known to us. The flag and positional
encoding are not stored in the weights. One entry matches the only training recipe in the authors'
repository (topiq_nr + laion_aes, linear, N = 2, z-scored, no flag, no encoding: D_in 2); their inference
wrappers default to `input_dim=3` (a flag), so that entry also accepts the flag variant (D_in 3). For the
others we try, in this order: no flag, flag, no flag + L=10 encoding, flag + L=10 encoding, and take the
first whose input size equals the weights' D_in (n, n+1, 21n, 21(n+1)).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

Token = tuple[str, ...]  # alternatives: any one of them occurring in the file name satisfies the token


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # label as in the paper's heatmap
    metrics: tuple[str, ...]  # pyiqa ids, in input-vector order
    required: tuple[Token, ...]  # file-name tokens that must all occur
    optional: tuple[Token, ...] = ()  # tokens that only make the match more specific
    use_flag: bool = False
    pos_encode_L: int = 0
    recipe: bool = False  # True only for the training recipe found in the authors' repository

    def input_dim_variants(self) -> list[tuple[bool, int, int]]:
        """(use_flag, pos_encode_L, input_dim) layouts to try, the entry's own first."""
        n = len(self.metrics)
        variants = [(self.use_flag, self.pos_encode_L)]
        if self.recipe:  # the recipe (no flag), or the flag the authors' inference wrappers default to
            variants += [(not self.use_flag, self.pos_encode_L)]
        else:
            variants += [(False, 0), (True, 0), (False, 10), (True, 10)]
        out: list[tuple[bool, int, int]] = []
        for flag, L in variants:
            dim = (n + int(flag)) * (2 * L + 1)
            if (flag, L, dim) not in out:
                out.append((flag, L, dim))
        return out


def _t(*alternatives: str) -> Token:
    return tuple(alternatives)


TOPIQ, ARNIQA, MUSIQ, MANIQA = _t("topiq"), _t("arniqa"), _t("musiq"), _t("maniqa")
LIQE, CLIPIQA, LAION = _t("liqe"), _t("clipiqa", "clip_iqa", "clip-iqa"), _t("laion")
MULTI = _t("4x", "x4", "3x", "x3", "2x", "x2", "multi", "all")

# Order = the heatmap's rows (best mean gain first).
CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("TOPIQ + LAION-AES", ("topiq_nr", "laion_aes"), (TOPIQ, LAION), (_t("aes"), _t("koniq")), recipe=True),
    CatalogEntry("4xTOPIQ (multi-dataset)", ("topiq_nr", "topiq_nr-spaq", "topiq_nr-flive", "topiq_iaa"),
                 (TOPIQ, MULTI), (_t("koniq"), _t("spaq"), _t("flive"), _t("ava", "iaa"))),
    CatalogEntry("TOPIQ (KonIQ)", ("topiq_nr",), (TOPIQ,), (_t("koniq"),)),
    CatalogEntry("DBCNN", ("dbcnn",), (_t("dbcnn"),)),
    CatalogEntry("TOPIQ (SPAQ)", ("topiq_nr-spaq",), (TOPIQ, _t("spaq"))),
    CatalogEntry("HyperIQA", ("hyperiqa",), (_t("hyperiqa", "hyper_iqa", "hyper-iqa"),)),
    CatalogEntry("3xARNIQA + LIQE-MIX", ("arniqa", "arniqa-kadid", "arniqa-flive", "liqe_mix"),
                 (ARNIQA, LIQE), (_t("mix"), MULTI, _t("kadid"), _t("flive"))),
    CatalogEntry("ARNIQA (KonIQ)", ("arniqa",), (ARNIQA,), (_t("koniq"),)),
    CatalogEntry("2xMUSIQ (KonIQ+AVA)", ("musiq", "musiq-ava"), (MUSIQ, _t("ava"), _t("koniq", *MULTI))),
    CatalogEntry("TReS (FLIVE)", ("tres-flive",), (_t("tres"),), (_t("flive"),)),
    CatalogEntry("MANIQA (KonIQ)", ("maniqa",), (MANIQA,), (_t("koniq"),)),
    CatalogEntry("CNNIQA", ("cnniqa",), (_t("cnniqa"),)),
    CatalogEntry("TOPIQ (FLIVE)", ("topiq_nr-flive",), (TOPIQ, _t("flive"))),
    CatalogEntry("MANIQA (PIPAL)", ("maniqa-pipal",), (MANIQA, _t("pipal"))),
    CatalogEntry("MUSIQ (AVA)", ("musiq-ava",), (MUSIQ, _t("ava"))),
    CatalogEntry("MUSIQ (KonIQ)", ("musiq",), (MUSIQ,), (_t("koniq"),)),
    CatalogEntry("ARNIQA (FLIVE)", ("arniqa-flive",), (ARNIQA, _t("flive"))),
    CatalogEntry("LIQE", ("liqe",), (LIQE,)),
    CatalogEntry("MUSIQ (FLIVE)", ("musiq-paq2piq",), (MUSIQ, _t("flive", "paq2piq"))),
    CatalogEntry("CLIPIQA+ + LIQE-MIX", ("clipiqa+", "liqe_mix"), (CLIPIQA, LIQE), (_t("mix"),)),
    CatalogEntry("CLIP-IQA+", ("clipiqa+",), (CLIPIQA,)),
    CatalogEntry("TOPIQ (AVA)", ("topiq_iaa",), (TOPIQ, _t("ava", "iaa"))),
    CatalogEntry("NIMA (AVA)", ("nima-vgg16-ava",), (_t("nima"),), (_t("ava"), _t("vgg"))),
    CatalogEntry("LIQE-MIX", ("liqe_mix",), (LIQE, _t("mix"))),
    CatalogEntry("ARNIQA (KADID)", ("arniqa-kadid",), (ARNIQA, _t("kadid"))),
    CatalogEntry("LAION-AES", ("laion_aes",), (LAION,), (_t("aes"),)),
)


def _token_hit(name: str, token: Token) -> bool:
    return any(alternative in name for alternative in token)


def match_catalog(file_name: str, input_dim: int | None = None) -> tuple[CatalogEntry | None, list[CatalogEntry]]:
    """Best catalog entry for a weights file name, and the tied runners-up when the match is ambiguous.

    Returns (entry, []) on a unique best match, (None, tied_entries) on a tie, (None, []) on no match.
    With `input_dim`, entries none of whose layouts gives that input size are not considered.
    """
    name = pathlib.Path(file_name).name.lower()
    scored: list[tuple[int, CatalogEntry]] = []
    for entry in CATALOG:
        if not all(_token_hit(name, token) for token in entry.required):
            continue
        if input_dim is not None and all(dim != input_dim for _, _, dim in entry.input_dim_variants()):
            continue
        score = len(entry.required) + sum(_token_hit(name, token) for token in entry.optional)
        scored.append((score, entry))
    if not scored:
        return None, []
    best = max(score for score, _ in scored)
    winners = [entry for score, entry in scored if score == best]
    if len(winners) > 1:
        return None, winners
    return winners[0], []


