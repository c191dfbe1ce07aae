"""The GeoLoRA step as the paper writes it, one layer at a time: the specification that
``GeoLoRAOptimizer`` (its batched form) is tested against. Plain QR and SVD, no padding, no batching.

Per adapter ``W = alpha U S V^T`` of rank r (maximum R), from ``G_S = U.grad``-style gradients
(``S.grad``, ``G_K = U.grad``, ``G_L = V.grad``, see ``layer.py``):
1. ``S' =`` AdamW or SGD step on S (U, V are never decayed);
2. every ``c + 1`` steps: new directions ``Ubar``, the strongest ``a = min(r, R - r)`` of
   ``(I - UU^T) G_K`` (``Vbar`` likewise from G_L); directions below ``noise_floor`` of the gradient are
   rounding, not directions;
3. SVD of ``[[S', -h G_L^T Vbar], [-h Ubar^T G_K, 0]]``, with ``h = lr`` for SGD and, for AdamW,
   ``lr / (sqrt(max(v, q)) + eps)``, q the mean square of the entries of G_S and of both blocks, v its
   running average (first value as is, then ``beta2``-averaged): new directions enter at Adam's scale;
4. keep the smallest rank with ``||sigma_tail|| <= tau ||sigma||`` in [min_rank, max_rank] (or the largest
   ``rank_budget`` singular values over all layers); rotate U, V, S and the S moments into the new bases.

With ``coefficient_steps = c > 0``, steps 2-3 run at the first step of each cycle of c + 1 steps and the layer
goes on at the augmented rank (``min(#Ubar, #Vbar)`` new columns, moments zero there or, ``new_moments="tangent"``,
the second moment ``(1 - beta2^t) v``); the next c steps are step 1 on the whole augmented S, and step 4 (SVD of
S) follows the cycle's last step. ``new_block_step="lr"`` makes h = lr with AdamW too (the authors' code).
"""

from __future__ import annotations

import torch

from .linalg import noise_floor
from .model import adapters, config_of


def _new_directions(basis, grad, width):
    """Orthonormal ``Ubar`` (columns orthogonal to ``basis``) spanning the strongest ``width`` directions of
    ``(I - basis basis^T) grad``, and ``Ubar^T grad``."""
    p = grad - basis @ (basis.T @ grad)
    z, sigma, _ = torch.linalg.svd(p, full_matrices=False)
    z = z[:, sigma > noise_floor(grad.dtype) * grad.norm()][:, :width]
    ubar = torch.linalg.qr(torch.cat([basis, z], 1)).Q[:, basis.shape[1] :]
    return ubar, ubar.T @ grad


class ReferenceStep:
    """``step()`` applies the GeoLoRA step to every adapter of ``model`` with a gradient."""

    def __init__(self, model, lr, weight_decay=0.0, base_optimizer="adamw", betas=(0.9, 0.999), eps=1e-8, **options):
        self.layers, self.config = [layer for _, layer in adapters(model)], config_of(model)
        self.lr, self.wd, self.base, self.betas, self.eps = lr, weight_decay, base_optimizer, betas, eps
        self.momentum = options.get("momentum", 0.0)
        self.h_rule, self.new_moments = options.get("new_block_step", "tangent"), options.get("new_moments", "zero")
        self.state, self.count, self.augmented = {layer: {} for layer in self.layers}, 0, False

    def _coefficient_step(self, s, g, st):
        if self.base == "sgd":
            g = g + self.wd * s
            if self.momentum:
                g = st["exp_avg"] = self.momentum * st.get("exp_avg", torch.zeros_like(s)) + g
            return s - self.lr * g
        (b1, b2), t = self.betas, st["step"]
        st["exp_avg"] = b1 * st.get("exp_avg", torch.zeros_like(s)) + (1 - b1) * g
        st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", torch.zeros_like(s)) + (1 - b2) * g * g
        denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt() + self.eps
        return s * (1 - self.lr * self.wd) - self.lr / (1 - b1**t) * st["exp_avg"] / denom

    def _block_step(self, blocks, st):
        if self.base == "sgd":
            return self.lr
        mean_square = sum(b.pow(2).sum() for b in blocks) / sum(b.numel() for b in blocks)
        old = st.get("tangent_sq", torch.zeros((), dtype=mean_square.dtype))
        st["tangent_sq"] = mean_square if old == 0 else self.betas[1] * old + (1 - self.betas[1]) * mean_square
        return (
            self.lr
            if self.h_rule == "lr"
            else self.lr / (torch.maximum(st["tangent_sq"], mean_square).sqrt() + self.eps)
        )

    def _ranks(self, sigmas, layers):
        if self.config.rank_budget is None:
            ranks = []
            for sigma, layer in zip(sigmas, layers):
                tail = sigma.flip(0).pow(2).cumsum(0).flip(0).sqrt()  # tail[k] = ||sigma[k:]||
                r = int((tail > layer.tau * sigma.norm()).sum())
                ranks.append(min(max(r, layer.min_rank), layer.max_rank, len(sigma)))
            return ranks
        floors = [min(layer.min_rank, len(s)) for s, layer in zip(sigmas, layers)]
        caps = [max(min(layer.max_rank, len(s)), f) for s, layer, f in zip(sigmas, layers, floors)]
        pool = sorted(
            ((-float(v), i) for i, (s, f, c) in enumerate(zip(sigmas, floors, caps)) for v in s[f:c] if v > 0)
        )
        for _, i in pool[: max(self.config.rank_budget - sum(floors), 0)]:
            floors[i] += 1
        return floors

    @staticmethod
    def _svd(layer, u, s, v):
        P, sigma, Q_t = torch.linalg.svd(s)
        return layer, u, v, P, torch.where(sigma > 20 * torch.finfo(s.dtype).eps * s.norm(), sigma, 0.0), Q_t.T

    @torch.no_grad()
    def truncate(self):
        """Truncate every layer a cycle has augmented and not yet truncated."""
        if self.augmented:
            self._truncate([self._svd(layer, layer.u, layer.s, layer.v) for layer in self.layers])
        self.augmented = False

    @torch.no_grad()
    def step(self):
        c = self.config.coefficient_steps
        phase, self.count, pending = self.count % (c + 1), self.count + 1, []
        for layer in (layer for layer in self.layers if layer.S.grad is not None):
            st, r, big = self.state[layer], layer.rank, layer.max_rank
            st["step"] = st.get("step", 0) + 1
            u, v = layer.u.clone(), layer.v.clone()
            s = self._coefficient_step(layer.s.clone(), layer.S.grad[:r, :r], st)
            if phase != 0:
                layer.set_factors(u, s, v)
                pending += [self._svd(layer, u, s, v)] if phase == c else []
                continue
            ubar, k_block = _new_directions(u, layer.U.grad[:, :r], min(r, big - r))
            vbar, l_block = _new_directions(v, layer.V.grad[:, :r], min(r, big - r))
            aug = torch.zeros(r + ubar.shape[1], r + vbar.shape[1], dtype=s.dtype, device=s.device)
            aug[:r, :r] = s
            h = self._block_step([layer.S.grad[:r, :r], k_block, l_block], st)
            aug[r:, :r], aug[:r, r:] = -h * k_block, -h * l_block.T
            u, v = torch.cat([u, ubar], 1), torch.cat([v, vbar], 1)
            if c == 0:
                pending.append(self._svd(layer, u, aug, v))
                continue
            k = r + min(ubar.shape[1], vbar.shape[1])  # the cycle goes on at the augmented rank
            for key in (key for key in ("exp_avg", "exp_avg_sq") if key in st):
                st[key] = torch.nn.functional.pad(st[key], (0, k - r, 0, k - r))
            if self.new_moments == "tangent" and "exp_avg_sq" in st:
                new = torch.ones_like(st["exp_avg_sq"])
                new[:r, :r] = 0
                st["exp_avg_sq"] += (1 - self.betas[1] ** st["step"]) * st["tangent_sq"] * new
            layer.set_factors(u[:, :k], aug[:k, :k], v[:, :k])
        if phase == c:
            self._truncate(pending)
        self.augmented = phase != c and (self.augmented or phase == 0)

    def _truncate(self, pending):
        ranks = self._ranks([p[4] for p in pending], [p[0] for p in pending])
        for (layer, u_aug, v_aug, P, sigma, Q), k in zip(pending, ranks):
            st, r = self.state[layer], layer.rank
            P, Q = P[:, :k], Q[:, :k]
            for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):  # moments follow the basis
                if key in st:
                    st[key] = (P[:r] ** power).T @ st[key] @ Q[:r] ** power
            layer.set_factors(u_aug @ P, torch.diag(sigma[:k]), v_aug @ Q)
