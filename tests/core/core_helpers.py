"""Velocity stand-ins for tests/core: an analytic linear field with closed-form gradients, and a tiny MLP."""

from __future__ import annotations

import torch


class LinearField(torch.nn.Module):
    """v(x, sigma) = x A^T + sigma b + c with parameters theta = (A, b, c). Its state Jacobian is J = A."""

    def __init__(self, dim: int = 5, dtype=torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))
        self.c = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))
        self.calls: list[bool] = []  # per call: did the state input carry gradient?

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls.append(bool(x.requires_grad))
        return x @ self.A.T + sigma * self.b + self.c

    def closed_form(self, terms) -> dict[str, torch.Tensor]:
        """Gradient of sum_b <cot_b, sum_terms coef * v(x_b, sigma)> w.r.t. theta for fixed inputs x.

        terms: iterable of (coef, x [B, d], sigma, cot [B, d]).
        """
        gA = torch.zeros_like(self.A)
        gb = torch.zeros_like(self.b)
        gc = torch.zeros_like(self.c)
        for coef, x, sigma, cot in terms:
            x = x.detach().to(self.A.dtype)
            gA += coef * cot.T @ x
            gb += coef * sigma * cot.sum(0)
            gc += coef * cot.sum(0)
        return {"A": gA, "b": gb, "c": gc}

    def grads(self) -> dict[str, torch.Tensor]:
        return {"A": self.A.grad.clone(), "b": self.b.grad.clone(), "c": self.c.grad.clone()}

    def zero(self) -> None:
        for p in self.parameters():
            p.grad = None
        self.calls.clear()


class TinyMLP(torch.nn.Module):
    """A small real network as velocity: per-sample MLP on (x, sigma)."""

    def __init__(self, dim: int = 16, hidden: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        s = torch.full_like(x[:, :1], sigma)
        return self.net(torch.cat([x, s], 1).to(self.net[0].weight.dtype)).to(x.dtype)
