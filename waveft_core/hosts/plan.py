"""The patch plan: which of an adapter's layers go where on a host's loaded model, which are skipped and why, and
what is said about it. Written once; ComfyUI (nodes/loader.py), A1111 (a1111/a1111_hooks.py) and the Forge family
(a1111/forge_hooks.py) only execute a plan: they build their own patch objects for its targets and log its lines.

Where a layer goes is the host's knowledge (its key map, its layer names, its parameters): each host hands in a
`place` function. What a plan refuses is the same everywhere: two layers on one weight (one layer under two
spellings) would count the change twice, so no host applies such a file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..files.printable import short_list
from ..files.storage import WaveFTFileError
from ..names.matching import MatchReport, SharedTargetError, refuse_shared_targets

UNKNOWN_BASE = "an unknown base model"
SKIPPED_SHOWN = 3  # skipped layers a webui's console line lists before "and N more"
UNMATCHED_LOGGED = 20  # unmatched layer names Load WaveFT writes into the log
UNMATCHED_SHOWN = 10  # ... and WaveFT Info shows on the node


@dataclass
class PatchPlan:
    """targets: layer name -> the host's target (in the adapter's order); skipped: 'layer: why' for each layer the
    host has no place for; wrong_shape: (layer, layer shape, weight shape) where ComfyUI's key map found a weight
    of another shape (the webuis' place functions skip those with a reason instead)."""

    total: int
    base_model: str | None = None
    targets: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def wants(self) -> str:
        """What the file says it is for, for messages."""
        return self.base_model or UNKNOWN_BASE

    @property
    def none_fit(self) -> bool:
        return bool(self.skipped) and len(self.skipped) == self.total

    def skipped_list(self) -> str:
        return short_list(self.skipped, SKIPPED_SHOWN, "; ")

    # --- the webuis' console lines (A1111, Forge) ---

    def none_fit_line(self, name: str) -> str:
        return (
            f"{name}: none of its {self.total} layers fit the loaded model (the file is for {self.wants}): "
            f"{self.skipped_list()}"
        )

    def not_applied_line(self, name: str) -> str:
        return f"{name}: {len(self.skipped)} of {self.total} layers not applied: {self.skipped_list()}"

    def not_applied_note(self) -> str:
        """The tail of Forge's line, '' when every layer applied."""
        return f"; {len(self.skipped)} not applied: {self.skipped_list()}" if self.skipped else ""

    # --- ComfyUI's node (Load WaveFT, WaveFT Info) ---

    def refusal(self, label: str, model_is: str) -> str | None:
        """Why Load WaveFT refuses the file for this model (a layer of another shape, or no layer that matches),
        else None: a file that cannot be right is never applied half."""
        if self.wrong_shape:
            name, mine, theirs = self.wrong_shape[0]
            return (
                f"{label}: {len(self.wrong_shape)} layer(s) have another shape than the model's weights, e.g. "
                f"{name}: adapter {list(mine)}, model {list(theirs)}. The file was made for {self.wants}; the model "
                f"is {model_is}."
            )
        if not self.targets:
            return (
                f"{label}: none of its {self.total} layers match this model. The file was made for {self.wants}; "
                f"the model is {model_is}. Pick the adapter made for this model."
            )
        return None

    def summary(self, label: str, n_model: int, n_clip: int, import_notes: str = "", unused_clip: int = 0) -> str:
        """Load WaveFT's report on the node."""
        text = f"{label}: {len(self.targets)} of {self.total} layers matched ({n_model} model, {n_clip} text encoder)"
        if import_notes:
            text += f"; read as: {import_notes}"
        if self.skipped:
            text += f"; {len(self.skipped)} did not match (names in the log)"
        if unused_clip:
            text += f"; {unused_clip} text-encoder layers unused (no CLIP connected)"
        return text

    def unmatched_log(self) -> str:
        """The unmatched layer names Load WaveFT logs."""
        return short_list(self.skipped, UNMATCHED_LOGGED, more=" ...")

    def match_lines(self, model_is: str) -> str:
        """WaveFT Info's lines on how the adapter matches a model."""
        text = f"\nmatches this model ({model_is}): {len(self.targets)} of {self.total} layers"
        if self.skipped:
            text += f"\nunmatched: {short_list(self.skipped, UNMATCHED_SHOWN, more=' ...')}"
        if self.wrong_shape:
            n, a, b = self.wrong_shape[0]
            text += f"\nwrong shape: {len(self.wrong_shape)} (e.g. {n}: {list(a)} vs {list(b)})"
        return text


def plan_patches(
    layers: Mapping,
    place: Callable[[str, object], tuple[object, str]],
    source: str,
    base_model: str | None = None,
    weight_of: Callable[[object], object] = lambda target: target,
) -> PatchPlan:
    """The plan of a webui: `place(name, layer)` gives (target, '') or (None, why not) for each layer;
    `weight_of(target)` identifies the weight a target changes. Raises WaveFTFileError (naming `source`) when
    two layers change one weight."""
    plan = PatchPlan(total=len(layers), base_model=base_model)
    for name, layer in layers.items():
        target, why = place(name, layer)
        if target is None:
            plan.skipped.append(f"{name}: {why}")
        else:
            plan.targets[name] = target
    try:
        refuse_shared_targets((name, weight_of(target)) for name, target in plan.targets.items())
    except SharedTargetError as e:
        raise WaveFTFileError(source, str(e)) from None
    return plan


def plan_from_match(report: MatchReport, total: int, base_model: str | None = None) -> PatchPlan:
    """ComfyUI's plan: its key map's matches (names.matching.match_layers, which refuses shared weights itself);
    skipped layers are those that matched nothing, named bare."""
    return PatchPlan(
        total=total,
        base_model=base_model,
        targets=dict(report.targets),
        skipped=list(report.unmatched),
        wrong_shape=list(report.wrong_shape),
    )
