"""Masked Autoencoder ViT (He et al.) from timm layers, with MoE MLPs in chosen encoder blocks.

The model owns its loss: `forward` returns the normalised-pixel reconstruction loss plus the weighted
auxiliary balance loss of its MoE layers, so the engine only calls backward and step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from moce_ds.config.schema import MoEConfig
from moce_ds.data.images import normalize
from moce_ds.model.pos_embed import sincos_pos_embed_2d
from moce_ds.model.registry import MAESpec
from moce_ds.moe.layer import MoEMlp
from moce_ds.moe.policies import routing_policy
from moce_ds.moe.routing import ImageRoutes, LayerRoutes

__all__ = ["MAEOutput", "MaskedAutoencoderViT", "RoutedBlock", "moe_block_ids", "init_local_experts"]


@dataclass
class MAEOutput:
    loss: torch.Tensor  # recon_loss + aux_loss_weight * aux_loss: what backward() sees
    recon_loss: torch.Tensor
    aux_loss: torch.Tensor
    pred: torch.Tensor  # (B, L, p*p*3)
    mask: torch.Tensor  # (B, L), 1 = removed
    # forward(..., defer_checks=True) only: 0-dim bool, set when a cluster id was outside the gate's table (those ids
    # were clamped for this forward); read it with the step's other flags, then call check_clusters for the error
    bad_clusters: torch.Tensor | None = None


class RoutedBlock(Block):
    """timm's pre-norm Block whose MLP may be a MoE that takes this step's routes (or the images' cluster ids)."""

    def forward(self, x: torch.Tensor, routes: LayerRoutes | torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        h = self.norm2(x)
        h = self.mlp(h, routes) if isinstance(self.mlp, MoEMlp) else self.mlp(h)
        return x + self.drop_path2(self.ls2(h))


def moe_block_ids(depth: int, moe: MoEConfig) -> list[int]:
    """Encoder blocks whose MLP is a MoE (the routing policy decides: none for dense)."""
    return routing_policy(moe).moe_blocks(depth)


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, spec: MAESpec, moe: MoEConfig, ep_size: int = 1, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.spec, self.moe_cfg = spec, moe
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.aux_loss_weight = moe.aux_loss_weight
        d, p = spec.embed_dim, spec.patch_size
        norm = functools.partial(nn.LayerNorm, eps=1e-6)

        # ---- encoder
        self.patch_embed = PatchEmbed(spec.img_size, p, 3, d)
        grid = spec.img_size // p
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed sin-cos embeddings: a buffer, so no optimizer state and no "unused parameter".
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid).unsqueeze(0))
        self.policy = routing_policy(moe)  # the one owner of what moe.routing means
        self.moe_blocks = self.policy.moe_blocks(spec.depth)
        moe_mlp = functools.partial(
            MoEMlp, routing=moe.routing, num_experts=moe.num_experts, ep_size=ep_size, top_k=moe.top_k,
            num_clusters=moe.num_clusters, capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
            drop_tokens=moe.drop_tokens, gate_noise_std=moe.gate_noise_std, use_rts=moe.use_rts,
        )
        self.blocks = nn.ModuleList([
            RoutedBlock(d, spec.num_heads, spec.mlp_ratio, qkv_bias=True, norm_layer=norm,
                        mlp_layer=moe_mlp if i in self.moe_blocks else Mlp)
            for i in range(spec.depth)
        ])
        self.norm = norm(d)

        # ---- light decoder (always dense)
        dd = spec.decoder_embed_dim
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, grid).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList([
            Block(dd, spec.decoder_num_heads, spec.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(spec.decoder_depth)
        ])
        self.decoder_norm = norm(dd)
        self.decoder_pred = nn.Linear(dd, p * p * 3)
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, as in MAE
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith("gate.wg"):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ MoE plumbing
    def moe_layers(self) -> list[tuple[int, MoEMlp]]:
        return [(i, self.blocks[i].mlp) for i in self.moe_blocks]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary balance losses from the last forward (0 for dense)."""
        losses = [m.l_aux for _, m in self.moe_layers() if m.l_aux is not None]
        return torch.stack(losses).sum() if losses else self.cls_token.new_zeros(())

    def route_images(self, cluster: torch.Tensor, tokens_per_image: int) -> ImageRoutes | None:
        """cluster (N,) -> the routes of every MoE layer for this step, planned at once by the routing policy
        (one (N, E) logit row per layer, one vectorised top-k + capacity pass and, with expert parallelism, one
        collective for all layers, before any block runs); None when the layers route by themselves."""
        return self.policy.plan(self, cluster, tokens_per_image)

    # ------------------------------------------------------------------ pixels
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, 3, H, W) -> (N, L, p*p*3)"""
        p = self.spec.patch_size
        n, c, h, w = imgs.shape
        if h != w or h % p or c != 3:
            raise ValueError(f"images must be (N, 3, S, S) with S divisible by {p}, got {tuple(imgs.shape)}.")
        g = h // p
        x = imgs.reshape(n, 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, g * g, p * p * 3)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, L, p*p*3) -> (N, 3, H, W)"""
        p = self.spec.patch_size
        g = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], g, g, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 3, g * p, g * p)

    # ------------------------------------------------------------------ masking
    def num_kept(self, mask_ratio: float) -> int:
        return int(self.spec.num_patches * (1 - mask_ratio))

    def random_masking(self, x: torch.Tensor, mask_ratio: float):
        """Per-sample random masking by argsort of uniform noise. x: (N, L, D) -> kept (N, K, D), mask, restore."""
        n, length, d = x.shape
        keep = self.num_kept(mask_ratio)
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def _check_clusters(self, cluster: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.moe_blocks:
            return None
        return self.policy.check_clusters(cluster, batch)

    def check_clusters(self, cluster: torch.Tensor | None) -> None:
        """The range check with its host sync: raises the clear error for an id outside the gate's table."""
        self._check_clusters(cluster, 0 if cluster is None else cluster.shape[0])

    def pixels(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs uint8 (N, 3, H, W) 0..255 (the loader's wire format; normalised here, on the device) or float
        (N, 3, H, W) already normalised -> float32 normalised pixels: the norm-pix target is computed from these."""
        return normalize(imgs) if imgs.dtype == torch.uint8 else imgs.float()

    def _input(self, imgs: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's input: uint8 images normalised in float32, then cast to the weights' dtype (bf16 runs)."""
        if imgs.dtype != torch.uint8:
            return imgs
        return (self.pixels(imgs) if pixels is None else pixels).to(self.patch_embed.proj.weight.dtype)

    def forward_encoder(self, imgs: torch.Tensor, cluster: torch.Tensor | None, mask_ratio: float):
        """imgs (N, 3, H, W) uint8 or normalised float, cluster (N,) -> latent (N, 1+K, D), mask (N, L),
        ids_restore (N, L)."""
        return self._encode(self._input(imgs), self._check_clusters(cluster, imgs.shape[0]), mask_ratio)

    def _encode(self, imgs: torch.Tensor, cluster: torch.Tensor | None, mask_ratio: float):
        """forward_encoder with the cluster ids already checked."""
        x = self.patch_embed(imgs)
        pos = self.pos_embed.to(x.dtype)  # DeepSpeed keeps buffers in fp32 under bf16; adding them would upcast x
        x = x + pos[:, 1:, :]
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio)
        else:  # no masking: keep the patch order, so tokens line up with a plain ViT's
            mask = x.new_zeros(x.shape[:2])
            ids_restore = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        cls = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        # block index -> its MoE layer's routes for this step (cluster routing only)
        plan = None if cluster is None else self.route_images(cluster, x.shape[1])
        routes = {} if plan is None else dict(zip(self.moe_blocks, plan.layers))
        for i, blk in enumerate(self.blocks):
            x = blk(x, routes.get(i))
        return self.norm(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        """The unmasked encoder's tokens (N, 1+L, D): what an exported dense ViT computes."""
        latent, _, _ = self.forward_encoder(imgs, cluster, 0.0)
        return latent

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)  # (N, L) per patch
        return (loss * mask).sum() / mask.sum()  # mean over removed patches

    def forward(self, imgs: torch.Tensor, cluster: torch.Tensor | None = None,
                mask_ratio: float | None = None, defer_checks: bool = False) -> MAEOutput:
        """defer_checks: the cluster-id range check costs no host sync (see MAEOutput.bad_clusters)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if defer_checks and self.moe_blocks:
            cluster, bad = self.policy.check_clusters_deferred(cluster, imgs.shape[0])
        else:
            cluster, bad = self._check_clusters(cluster, imgs.shape[0]), None
        pixels = self.pixels(imgs)  # float32 (N, 3, H, W)
        latent, mask, ids_restore = self._encode(self._input(imgs, pixels), cluster, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        recon = self.forward_loss(pixels, pred, mask)
        aux = self.aux_loss()
        return MAEOutput(recon + self.aux_loss_weight * aux, recon, aux, pred, mask, bad)


@torch.no_grad()
def init_local_experts(model: MaskedAutoencoderViT, ep_rank: int, seed: int) -> None:
    """Give every expert its own init from (seed, layer, global expert id).

    DeepSpeed deep-copies one expert into all local slots (identical experts) and every rank would
    otherwise draw the same numbers; this makes the init independent of ep_size as well.
    """
    for layer, moe in model.moe_layers():
        local = moe.deepspeed_moe.experts.deepspeed_experts
        for j, mlp in enumerate(local):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + ep_rank * len(local) + j)
            for lin in (mlp.fc1, mlp.fc2):
                bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # xavier_uniform
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * 2 * bound - bound)
                lin.bias.zero_()
