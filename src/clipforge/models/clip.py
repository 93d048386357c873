"""CLIP: an image tower and a causal text transformer projected into one normalised embedding space.

Attribute names follow OpenAI's checkpoints: `visual`, `transformer`, `token_embedding`,
`positional_embedding`, `ln_final`, `text_projection`, `logit_scale`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import LayerNorm, Transformer
from .vision import VisionTransformer

MAX_LOGIT_SCALE = math.log(100.0)


def build_visual(cfg: ModelConfig) -> nn.Module:
    """The image tower named by the config: a ViT, or a modified ResNet when `layers` is a list."""
    vcfg = cfg.vision_cfg
    if vcfg.is_resnet:
        from .resnet import ModifiedResNet  # noqa: PLC0415 - only ResNet configs need it

        return ModifiedResNet(vcfg, cfg.embed_dim)
    return VisionTransformer(vcfg, cfg.embed_dim, quick_gelu=cfg.quick_gelu)


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        tcfg = cfg.text_cfg
        self.context_length = tcfg.context_length
        self.vocab_size = tcfg.vocab_size
        self.visual = build_visual(cfg)
        self.transformer = Transformer(tcfg.width, tcfg.layers, tcfg.heads, tcfg.mlp_ratio, cfg.quick_gelu)
        self.token_embedding = nn.Embedding(tcfg.vocab_size, tcfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(tcfg.context_length, tcfg.width))
        self.ln_final = LayerNorm(tcfg.width)
        self.text_projection = nn.Parameter(torch.empty(tcfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        else:
            self.logit_bias = None
        self._init_text()

    def _init_text(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the matmul weights (embeddings and norms may be kept in fp32)."""
        return self.text_projection.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        inner = getattr(self.visual, "transformer", None)
        if inner is not None:
            inner.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, H, W] -> features [B, D]."""
        features = self.visual(images.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens [B, L] (L <= context_length) -> features [B, D], taken at the end-of-text token."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"text tokens have length {length}, above this model's context length {self.context_length}"
            )
        # The end-of-text token has the highest id in the vocabulary, so argmax finds its position.
        eot = tokens.argmax(dim=-1)  # [B]
        if tokens.device.type == "cpu" and tokens.shape[0] > 0 and not torch.compiler.is_compiling():
            # Causal attention: no position sees the padding after the last end-of-text token of the batch,
            # so dropping it leaves the features unchanged and saves most of the text tower on short
            # captions. (Not on GPUs, where reading the length would stall the stream, nor when compiling.)
            length = int(eot.max()) + 1
            tokens = tokens[:, :length]  # [B, L']
        x = self.token_embedding(tokens).to(self.dtype)  # [B, L, W]
        x = x + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x, causal=True, positions=eot)  # [B, W], the end-of-text token of each row
        x = self.ln_final(x)
        features = x @ self.text_projection  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Normalised image and text features and the logit multiplier exp(logit_scale)."""
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(tokens, normalize=True) if tokens is not None else None
        return image_features, text_features, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = MAX_LOGIT_SCALE) -> None:
        """Keep the temperature from collapsing: exp(logit_scale) <= 100, as in the CLIP paper."""
        self.logit_scale.clamp_(0.0, max_value)

    def logits(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image [Bi, Bt], logits_per_text [Bt, Bi])."""
        image_features, text_features, scale = self(images, tokens)
        assert image_features is not None and text_features is not None
        logits_per_image = scale * image_features @ text_features.t()
        if self.logit_bias is not None:
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()
