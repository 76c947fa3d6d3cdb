"""What the orthogonal methods share: skew-symmetric blocks stored as their upper triangles, the
Cayley transform (exact, and PEFT's truncated Neumann series), block-diagonal matrices applied
without building them, on activations or folded into a weight.

* `skew_symmetric` / `upper_triangle`: a skew-symmetric ``b x b`` matrix holds ``b (b - 1) / 2``
  free values; PEFT stores those (row-major upper triangle, ``torch.triu_indices`` order).
* `cayley` and `cayley_neumann`: an orthogonal matrix from a skew-symmetric one, both as PEFT
  computes them (note the two differ in sign convention, see each).
* `rotate_blocks`: a block-diagonal matrix applied to one axis of an activation, O(n·b) per
  vector, the n x n matrix never built; `fold_blocks` multiplies a weight's input axis by one.
"""

from __future__ import annotations

import torch


def skew_symmetric(upper: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., size (size - 1) / 2)`` upper-triangle values -> ``(..., size, size)`` matrices
    ``S`` with those values above the diagonal and ``S^T = -S``."""
    rows, cols = torch.triu_indices(size, size, 1, device=upper.device)
    matrix = upper.new_zeros(*upper.shape[:-1], size, size)
    matrix[..., rows, cols] = upper
    return matrix - matrix.transpose(-2, -1)


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of `skew_symmetric`: the values above the diagonal, row after row."""
    size = matrix.shape[-1]
    rows, cols = torch.triu_indices(size, size, 1, device=matrix.device)
    return matrix[..., rows, cols]


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """``(I - S)(I + S)^-1`` for a batch of skew-symmetric ``S`` (orthogonal, exactly): what
    PEFT's OFT and BOFT compute (a solve, no explicit inverse)."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's (0.18+) Cayley-Neumann series: ``(I + S)(I - S)^-1 = I + 2S + 2S² + ...`` cut
    after ``terms`` terms: ``I``, ``I + 2S``, then the last power with weight 1 (``I + 2S + 2S²
    + 2S³ + S⁴`` for 5).

    Its sign convention is the transpose of `cayley`'s, and the cut series is only near
    orthogonal. PEFT's loop gives 3 terms the 4-term series; kept so files mean the same."""
    out = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).repeat(
        *skew.shape[:-2], 1, 1
    )
    if terms <= 1:
        return out
    out = out + 2 * skew
    if terms == 2:
        return out
    power = skew @ skew
    out = out + 2 * power
    for _ in range(3, terms - 1):
        power = power @ skew
        out = out + 2 * power
    return out + power @ skew


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` with axis ``dim`` cut into consecutive blocks of ``b``, block ``i`` (a row vector)
    multiplied by ``blocks[i]`` (``x_i ← x_i B_i``): the block-diagonal matrix applied, never
    built. ``blocks``: ``(count, b, b)``; a single block applies to every block of ``x`` (one
    plain matmul). Several blocks run as one ``bmm`` over the blocks (faster than einsum's
    route on the CPU)."""
    moved = x.movedim(dim, -1)
    count, size, _ = blocks.shape
    if count == 1:
        out = (moved.unflatten(-1, (-1, size)) @ blocks[0]).flatten(-2)
    else:
        vectors = moved.reshape(-1, count, size).transpose(0, 1)  # (count, vectors, b)
        out = torch.bmm(vectors, blocks).transpose(0, 1).reshape(moved.shape)
    return out.movedim(-1, dim)


def fold_blocks(rows: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``rows`` (out x n) times the block-diagonal matrix of ``blocks`` (its transpose if
    ``transpose``), block by block: ``rows[:, i] B_i`` (``B_i^T``). A single block applies to
    every block of ``rows``."""
    size = blocks.shape[-1]
    split = rows.unflatten(-1, (-1, size))
    matrices = blocks.transpose(-2, -1) if transpose else blocks
    if matrices.shape[0] == 1:
        return (split @ matrices[0]).flatten(-2)
    return torch.einsum("oik,ikc->oic", split, matrices).flatten(-2)
