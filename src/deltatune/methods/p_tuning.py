"""P-tuning: virtual tokens produced by a trained prompt encoder.

Liu et al. 2021, "GPT Understands, Too". Prompt tuning with a reparameterisation:
the n virtual-token embeddings are not trained directly but computed from n
trainable inputs e_1..e_n (d wide) by a small network,

    mlp:   h_i = W3 relu(W2 relu(W1 e_i + b1) + b2) + b3               (d -> h -> h -> d)
    lstm:  [l_1..l_n] = BiLSTM(e_1..e_n) (depth encoder_num_layers),
           h_i = W2 relu(W1 l_i + b1) + b2                              (2h -> 2h -> d)

and the model sees [h_1..h_n ; E(x)], with the mask and labels extended as in
prompt tuning (methods/prompts.py does the injecting). Trainable: n d for the
inputs plus the encoder; for the MLP (h hidden) n d + (d h + h) + (h h + h) + (h d + d).

Only h_1..h_n matter once training is done, so for saving and inference the
encoder is folded away, as peft does: the file holds peft's `prompt_embeddings`
(n x d, one block per transformer submodule), and a loaded adapter is those
plain rows (a `prompt_embeddings` parameter, no encoder); training it further
trains the rows directly. On encoder-decoders the encoder computes the n rows
in front of the encoder input (peft runs it over 2n inputs and keeps the first
n; the file layout is the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from ..config import DeltaConfig, Method, check, not_serialised, register
from ..surgery import root_container
from .prompts import CONTAINER as ROWS, file_blocks, first_block, inject, input_embeddings, model_dims

ENCODER = "prompt_encoder"


@dataclass(kw_only=True)
class PTuningConfig(DeltaConfig):
    """num_virtual_tokens: n; encoder: "mlp" or "lstm"; encoder_hidden_size: h (None: the
    model's width d); encoder_num_layers and encoder_dropout: the LSTM's depth and dropout
    (the MLP always has three linear layers). token_dim and the other model dimensions are
    filled in at attach, as peft's files carry them.
    """

    method = "p_tuning"
    peft_type = "P_TUNING"

    num_virtual_tokens: int = check(20, gt=0)
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = check(None, gt=0)
    encoder_num_layers: int = check(2, gt=0)
    encoder_dropout: float = check(0.0, ge=0, lt=1)
    token_dim: int | None = check(None, gt=0)
    num_layers: int | None = check(None, gt=0)
    num_attention_heads: int | None = check(None, gt=0)
    num_transformer_submodules: int | None = check(None, gt=0)
    # True: the folded rows alone (what a loaded file gives), no encoder. Never written to files.
    inference_mode: bool = not_serialised(False)


class PromptEncoder(nn.Module):
    """n trainable inputs and the network that turns them into n virtual-token embeddings."""

    def __init__(self, config: PTuningConfig) -> None:
        super().__init__()
        n, d, h = config.num_virtual_tokens, config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(n, d)  # N(0, 1) rows
        self.lstm_head = None
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (n, d)
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)  # (n, 2h)
        return self.mlp_head(x)  # (n, d)


def attach(model: nn.Module, config: PTuningConfig, name: str) -> PTuningConfig:
    dim = input_embeddings(model, "P-tuning").weight.shape[1]
    submodules = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
    config = config.replace(token_dim=dim, num_transformer_submodules=submodules,
                            encoder_hidden_size=config.encoder_hidden_size or dim, **model_dims(model))
    device = model.get_input_embeddings().weight.device
    if config.inference_mode:  # the file's folded rows are loaded over these
        root_container(model, ROWS)[name] = nn.Parameter(torch.zeros(config.num_virtual_tokens, dim, device=device))
    else:
        with torch.device(device):  # built where the model is (no memory on the meta device); fp32
            root_container(model, ENCODER, kind=nn.ModuleDict)[name] = PromptEncoder(config)
    return config


def virtual_tokens(model: nn.Module, name: str) -> torch.Tensor:
    """The n virtual-token embeddings (n, d): the encoder's output, or the folded rows."""
    encoders = model._modules.get(ENCODER)
    if encoders is not None and name in encoders:
        return encoders[name]()
    return model._modules[ROWS][name]


def to_file(model: nn.Module, name: str, config: PTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder folded into its output rows, in peft's `prompt_embeddings` layout."""
    encoders = model._modules.get(ENCODER)
    encoder = encoders[name] if encoders is not None and name in encoders else None
    was_training = encoder.training if encoder is not None else False
    try:
        if encoder is not None:
            encoder.eval()  # no dropout in what is saved
        with torch.no_grad():
            rows = virtual_tokens(model, name).detach().float().cpu()
    finally:
        if encoder is not None:
            encoder.train(was_training)
    out = {k: v for k, v in tensors.items() if k != ROWS and not k.startswith(ENCODER + ".")}
    out[ROWS] = file_blocks(config, rows).contiguous()
    return out


def from_file(model: nn.Module, name: str, config: PTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if ROWS in out:
        out[ROWS] = first_block(config, out[ROWS], config.num_virtual_tokens)
    return out


def transform_inputs(model: nn.Module, role: str, name: str, config: PTuningConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    return inject(model, role, config.num_virtual_tokens, 1, lambda: virtual_tokens(model, name), kwargs)


P_TUNING = register(
    Method(
        name="p_tuning",
        config_cls=PTuningConfig,
        kind="input",
        attach=attach,
        containers=(ENCODER, ROWS),
        transform_inputs=transform_inputs,
        to_file=to_file,
        from_file=from_file,
        mergeable=False,
        peft_compatible=True,
        load_overrides={"inference_mode": True},
    )
)
