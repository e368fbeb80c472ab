"""Does folding a weight a block of rows at a time give the same fp32 bits as one whole ``addmm``?

``lata_peft.fold`` forms ``W[rows].float() + B[rows] @ A`` per block of ``ROW_BLOCK_ELEMENTS`` entries. This
checks, on this machine's BLAS, whether that equals the rows of ``W.float() + B @ A`` bit for bit, for the
module shapes of Llama-3-8B and SmolLM2 with a rank-32 combination, and for tiny shapes (where BLAS may sum a
few rows' product in another order). It prints one line per shape; it asserts nothing, as the answer is the
BLAS's, not ours.

Run (repository root, venv active)::

    python benchmarks/check_row_block_bits.py
"""

from __future__ import annotations

import importlib
import platform

import torch

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (576, 576), (1536, 576), (128, 128)]


def main() -> None:
    fold = importlib.import_module("lata_peft.fold")  # the module (lata_peft.fold is the API function)
    print(f"{platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, rank 32")
    generator = torch.Generator().manual_seed(0)
    for rows_total, columns in SHAPES:
        weight = torch.randn(rows_total, columns, generator=generator).to(torch.bfloat16)
        B, A = torch.randn(rows_total, 32, generator=generator) * 0.01, torch.randn(32, columns, generator=generator)
        whole = weight.float().addmm_(B, A)
        rows = fold.block_rows(weight.shape) or 7  # tiny shapes: 7-row blocks, as the tests force them
        differ = sum(int((weight[s:s + rows].float().addmm_(B[s:s + rows], A) != whole[s:s + rows]).sum())
                     for s in range(0, rows_total, rows))
        print(f"{rows_total:>6} x {columns:<6} blocks of {rows:>5} rows: {differ} of {whole.numel()} entries differ")


if __name__ == "__main__":
    main()
