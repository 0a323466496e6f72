"""Pretrained weights (`train.timm.pretrained`) loaded into a timm model, every tensor checked.

The file's tensor names and shapes must be the model's. The classifier is the one expected
difference (ImageNet's 1000 classes, PCAM's one logit): it keeps its fresh initialisation, and
the log says so. Anything else that does not fit is an error naming the tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pcam_pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    """The names of the classifier's modules (timm's pretrained config: 'fc', 'head', ...)."""
    config = getattr(net, "pretrained_cfg", None) or {}
    names = config.get("classifier") or ()
    return tuple(f"{name}." for name in ((names,) if isinstance(names, str) else names))


def fitting_tensors(
    own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], head: tuple[str, ...], path: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of `loaded` to copy into a model whose state is `own`, and the classifier's
    names that keep their initialisation. Raises PipelineError for any other mismatch."""
    problems, kept_fresh = [], []
    for name in sorted(own.keys() | loaded.keys()):
        in_head = name.startswith(head)
        if name not in loaded:
            if in_head:
                kept_fresh.append(name)
            else:
                problems.append(f"{name}: in the model, not in the file")
        elif name not in own:
            if not in_head:
                problems.append(f"{name}: in the file, not in the model")
        elif loaded[name].shape != own[name].shape:
            if in_head:
                kept_fresh.append(name)
            else:
                problems.append(
                    f"{name}: shape {tuple(loaded[name].shape)} in the file, "
                    f"{tuple(own[name].shape)} in the model"
                )
    if problems:
        raise PipelineError(
            f"{path}: these weights are not for this model (train.timm.name):\n  "
            + "\n  ".join(problems[:10])
            + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            + "\nFix: download the weights of this architecture (`pcam weights download "
            "<name>.<tag>`) or set train.timm.name to the file's architecture"
        )
    usable = {k: v for k, v in loaded.items() if k in own and k not in kept_fresh}
    return usable, kept_fresh


def load_pretrained(net: nn.Module, path: Path) -> None:
    """Copy the weights in the safetensors file `path` into timm's model `net`, in place."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PipelineError(
            f"{path}: no such file (train.timm.pretrained). Fix: on a machine with network, "
            f"`pcam weights download <name>.<tag>` then `dvc add {path}`; or `dvc pull {path}`"
        )
    try:
        loaded = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise PipelineError(
            f"{path}: not a readable safetensors file ({exc}); download it again"
        ) from None
    own = net.state_dict()
    usable, kept_fresh = fitting_tensors(own, loaded, classifier_prefixes(net), path)
    net.load_state_dict({**own, **usable})
    if kept_fresh:
        log.info(
            "%s: the classifier (%s) does not fit this model's one output: re-initialised",
            path,
            ", ".join(kept_fresh),
        )
    log.info("%s: loaded %d pretrained tensors", path, len(usable))
