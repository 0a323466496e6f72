"""The drift reference written with the model: image features of a seeded sample of the train
split (what the model learned from), and the model's confidences and penultimate-layer
embeddings on a seeded sample of the valid split (held out from training, as evaluate scores
it). `pcam drift` and `pcam serve` test inputs against it (docs/drift.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pcam_pipeline.data.loader import normalise
from pcam_pipeline.data.processed import ProcessedData
from pcam_pipeline.drift.features import FEATURES, macenko_vectors, patch_features
from pcam_pipeline.drift.inputs import seeded_sample
from pcam_pipeline.drift.profile import FORMAT_VERSION, Reference, confidence
from pcam_pipeline.errors import PipelineError
from pcam_pipeline.params import DriftParams

FEATURE_SPLIT = "train"
MODEL_SPLIT = "valid"


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's last linear layer: its input is the penultimate-layer embedding."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise PipelineError(f"{type(model).__name__}: no linear layer to take embeddings from")
    return linears[-1]


@torch.no_grad()
def embed(
    model: nn.Module,
    patches: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N,), embeddings (N, D)) of uint8 patches: the input of the final linear
    layer, taken by a forward hook, so any architecture (CNN, MLP, timm) gives its own."""
    model.eval()
    captured: list[torch.Tensor] = []
    hook = final_linear(model).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].detach().float().cpu())
    )
    probabilities = []
    try:
        for start in range(0, len(patches), batch_size):
            x = torch.from_numpy(patches[start : start + batch_size]).to(device)
            logits = model(normalise(x, mean, std))
            probabilities.append(torch.sigmoid(logits.float()).cpu())
    finally:
        hook.remove()
    if not probabilities:
        return np.empty(0), np.empty((0, 0), dtype=np.float32)
    embeddings = torch.cat([c.reshape(len(c), -1) for c in captured]).numpy()
    return torch.cat(probabilities).numpy().astype(np.float64), embeddings.astype(np.float32)


def build_reference(
    dataset: ProcessedData,
    model: nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
    params: DriftParams,
    model_md5: str,
) -> Reference:
    train = seeded_sample(dataset.split_path(FEATURE_SPLIT), params.reference_patches, params.seed)
    stain_vectors = macenko_vectors(train, params.seed)
    features = patch_features(train, stain_vectors).values
    held_out = seeded_sample(dataset.split_path(MODEL_SPLIT), params.model_patches, params.seed + 1)
    probabilities, embeddings = embed(model, held_out, mean, std, device, params.batch_size)
    meta: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "features": list(FEATURES),
        "feature_split": FEATURE_SPLIT,
        "feature_patches": len(train),
        "model_split": MODEL_SPLIT,
        "model_patches": len(held_out),
        "embedding_dim": int(embeddings.shape[1]),
        "seed": params.seed,
        "alpha": params.alpha,
        "correction": params.correction,
        "mmd_permutations": params.mmd_permutations,
        "input_patches": params.input_patches,
        "model_md5": model_md5,
        "stain_vectors": np.round(stain_vectors, 6).tolist(),
    }
    return Reference(
        features=features.astype(np.float32),
        confidence=confidence(probabilities).astype(np.float32),
        embeddings=embeddings,
        stain_vectors=stain_vectors,
        meta=meta,
    )
