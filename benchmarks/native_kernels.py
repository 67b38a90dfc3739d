"""Kernel benchmark: the native kernels (``qcompile/csrc``) against the ATen ops they replace.

``qc.layer_norm_quantize`` against ATen's LayerNorm + smoothing multiply + ``qc.quantize`` on a
MiniLM activation (32 x 128 x 384), and ``qc.attention`` against ATen's ways to attend. Attention
shapes: all-MiniLM's layer at batch 32 x 128 tokens (12 heads of 32), unpadded and with a
Hugging Face padding mask keeping 40 of 128 positions (short sentences in a padded batch); a
Llama-style decode step (batch 1, 14 query heads on 2 key/value heads of 64, a 512-token cache);
and its 128-token causal prefill. Operands arrive as a projection's transposed output and the
result is turned back into [batch, length, width], as in a model, so every row pays its own
relayouts. Rows, all in this run (2 threads, median of 20 after 3 warm-ups): ATen's fp32
``scaled_dot_product_attention``, the same with bf16 operands, bf16 batched matmuls + softmax
(the form the int8 target ran before), and ``qc.attention`` on each instruction set this CPU has.
The error column is the largest difference from fp64 attention, relative to the output's range.

A recurrence table: ATen's GRU / LSTM layer against its input product (one fp32 linear over
every step) plus ``qc.gru_recurrence`` / ``qc.lstm_recurrence``, on each instruction set.

A weight-only table: int4 weights in groups of 128 at decode (1 row) and prefill (64 rows)
shapes, rotating over enough weights (at least 64 MB) that none is cache-resident, as in a
model: ``qc.linear_weight_only`` (the nibble kernel at one row, the blocked dequantize + bf16
GEMM at 64; without AVX512-BF16, ATen's int4pack at one row and the blocked dequantize + fp32 GEMM
at 64) against ATen's ``_weight_int4pack_mm_for_cpu`` on the same bits and a bf16 linear; and
the W4A8 path, ``qc.choose_qparams_per_token`` + ``qc.quantize`` + ``qc.linear_w4a8`` (uint8
activations per token, summed in integers where ``native.w4a8_in_integers()``), as a W4A8 plan's
linear runs it.

An int8 linear table: all-MiniLM's four linears from 1 to 4096 rows through oneDNN, the u8s8
kernel on AVX512-VNNI, and on AMX-INT8 tiles (where the CPU has them), alternated.

A first table gives what one call of the int8 path's operators costs (a decode step's shapes,
one row of 384): each operator through ``torch.ops.qc`` against its kernel alone, the difference
being the dispatch a compiled model pays per node.

Run: ``python -m benchmarks.native_kernels``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved_ms, median_ms
from qcompile import native
from qcompile.targets.cpu_int8 import attention  # noqa: F401  (torch.ops.qc.attention, qc.layer_norm_quantize, ...)

LOWEST = torch.finfo(torch.float32).min
ROWS = (1, 16, 64, 128, 256, 1024, 4096)  # the int8 linear table's row counts


def workloads() -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)

    def heads(batch, n, length, depth):
        return torch.randn(batch, length, n, depth, generator=g).transpose(1, 2)

    minilm = [heads(32, 12, 128, 32) for _ in range(3)]
    padded = torch.zeros(32, 1, 1, 128)
    padded[..., 40:] = LOWEST
    return {
        "MiniLM 32x12x128x32": dict(qkv=minilm, mask=torch.zeros(32, 1, 1, 128), causal=False),
        "MiniLM, 40 of 128 kept": dict(qkv=minilm, mask=padded, causal=False),
        "decode 1x14/2x1+512x64": dict(qkv=[heads(1, 14, 1, 64), heads(1, 2, 512, 64), heads(1, 2, 512, 64)],
                                       mask=None, causal=False),
        "prefill 1x14/2x128x64 causal": dict(qkv=[heads(1, 14, 128, 64), heads(1, 2, 128, 64), heads(1, 2, 128, 64)],
                                             mask=None, causal=True),
    }


def merged(out: torch.Tensor) -> torch.Tensor:
    batch, n, length, depth = out.shape
    return out.transpose(1, 2).reshape(batch, length, n * depth)


def aten(q, k, v, mask, causal, dtype=torch.float32):
    gqa = q.shape[1] != k.shape[1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = None if mask is None else mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    return merged(F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)).float()


def bf16_bmm(q, k, v, mask, causal):
    """softmax(Q·Kᵀ + mask)·V with bf16 batched matmuls (MHA, no causal: the MiniLM rows only)."""
    batch, n, length, depth = q.shape
    qb = (q * depth**-0.5).to(torch.bfloat16).reshape(-1, length, depth)
    kb, vb = (t.to(torch.bfloat16).reshape(-1, t.shape[2], t.shape[3]) for t in (k, v))
    scores = torch.bmm(qb, kb.transpose(1, 2)).view(batch, n, length, -1)
    scores = scores + mask.clamp(min=torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    out = torch.bmm(torch.softmax(scores, -1).view(-1, length, kb.shape[1]), vb)
    return merged(out.view(batch, n, length, -1)).float()


def native_attention(q, k, v, mask, causal):
    return merged(torch.ops.qc.attention(q, k, v, mask, None, causal, torch.float32))


def call_cost() -> None:
    """µs per call, through the operator and for the kernel alone (one row: a decode step)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (1, 384), dtype=torch.uint8, generator=g)
    weight = torch.randint(-127, 128, (384, 384), dtype=torch.int8, generator=g)
    weight_scale, bias, values = torch.rand(384, generator=g) / 100, torch.randn(384, generator=g), torch.randn(1, 384)
    scale, zero_point = torch.tensor([0.02]), torch.tensor([117], dtype=torch.int32)
    packed, sums = native.pack_u8s8_weight(weight)
    rows = [("qc.quantize 1x384", lambda: torch.ops.qc.quantize(values, scale, zero_point, None, 0, 255, torch.uint8),
             lambda: native.quantize_per_tensor(values, 0.02, 117, 0, 255, torch.uint8))]
    if native.has_vnni():
        rows.append(("qc.linear_int8 1x384x384",
                     lambda: torch.ops.qc.linear_int8(x, scale, zero_point, weight, weight_scale, bias, None, 1.0, 0,
                                                      torch.float32, "none"),
                     lambda: native.linear_u8s8(x, 0.02, 117, packed, sums, weight_scale, bias, None, "none", 1.0, 0,
                                                torch.float32)))
    print(f"{'one call (µs)':<64}{'operator':>10}{'kernel':>10}")
    for label, operator, kernel in rows:
        op_us = median_ms(operator, repeats=2000, warmup=200) * 1e3
        kernel_us = median_ms(kernel, repeats=2000, warmup=200) * 1e3
        print(f"{label:<64}{op_us:>10.1f}{kernel_us:>10.1f}")
    print()


def int8_linear() -> None:
    """all-MiniLM's four int8 linears (QKV, output, GELU up-projection to uint8, down-projection with
    the residual add) at request and batch row counts: oneDNN's GEMM (``qc.linear_int8`` above
    FEW_ROWS with tiles off), the u8s8 kernel on AVX512-VNNI, and on AMX tiles where the CPU has
    them; ms for the four, alternated (``interleaved_ms``), and which one ``qc.linear_int8`` runs."""
    if not native.has_vnni():
        return
    g = torch.Generator().manual_seed(3)
    scale, zero_point = torch.tensor([0.02]), torch.tensor([117], dtype=torch.int32)
    layers = []
    for k, n, post_op, out_dtype, add in [(384, 1152, "none", torch.float32, False),
                                          (384, 384, "none", torch.float32, True),
                                          (384, 1536, "gelu", torch.uint8, False),
                                          (1536, 384, "none", torch.float32, True)]:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        packed, sums = native.pack_u8s8_weight(weight)
        layers.append(dict(k=k, n=n, post_op=post_op, out_dtype=out_dtype, add=add, weight=weight, packed=packed,
                           sums=sums, weight_scale=torch.rand(n, generator=g) / 100, bias=torch.randn(n, generator=g)))
    paths = ["oneDNN", "u8s8 VNNI"] + (["u8s8 AMX"] if native.has_amx() else [])
    print(f"{'all-MiniLM linears (ms for the four)':<40}" + "".join(f"{p:>12}" for p in paths) + "   qc.linear_int8 runs")
    for rows in ROWS:
        inputs = [(torch.randint(0, 256, (rows, layer["k"]), dtype=torch.uint8, generator=g),
                   torch.randn(rows, layer["n"], generator=g) if layer["add"] else None) for layer in layers]

        def onednn():
            for layer, (x, other) in zip(layers, inputs):
                torch.ops.qc.linear_int8(x, scale, zero_point, layer["weight"], layer["weight_scale"], layer["bias"],
                                         other, 0.05, 3, layer["out_dtype"], layer["post_op"])

        def u8s8():
            for layer, (x, other) in zip(layers, inputs):
                native.linear_u8s8(x, scale, zero_point, layer["packed"], layer["sums"], layer["weight_scale"],
                                   layer["bias"], other, layer["post_op"], 0.05, 3, layer["out_dtype"])

        calls = {"u8s8 VNNI": lambda: _tiles(False, u8s8)}
        if rows > native.FEW_ROWS:
            calls["oneDNN"] = lambda: _tiles(False, onednn)
        if native.has_amx():
            calls["u8s8 AMX"] = lambda: _tiles(True, u8s8)
        times = interleaved_ms(calls, rounds=4)
        tiled = native.has_amx() and native.TILE_MIN_ROWS <= rows <= native.TILED_ROWS
        runs = "u8s8 AMX" if tiled else "u8s8 VNNI" if rows <= native.FEW_ROWS else "oneDNN"
        print(f"{f'{rows} rows':<40}" + "".join(f"{times.median(p):>12.3f}" if p in calls else f"{'-':>12}"
                                               for p in paths) + f"   {runs}")
    print()


def _tiles(enabled: bool, run):
    with native.amx_tiles(enabled and native.has_amx()):
        return run()


def weight_only() -> None:
    """ms per int4 g128 linear, weights rotated so that none is cache-resident (module doc)."""
    from qcompile.ops import choose_qparams_per_token
    from qcompile.targets.cpu_int8.weight_only_kernels import linear_w4a8, linear_weight_only

    print(f"{'int4 g128 weight [out x in], rows (ms)':<40}{'bf16 linear':>12}{'ATen int4pack':>15}{'qcompile':>10}"
          f"{'GB/s':>7}{'W4A8':>9}{'GB/s':>7}   (W4A8 {'in integers' if native.w4a8_in_integers() else 'dequantized'})")
    g = torch.Generator().manual_seed(3)
    for outputs, inputs in ((4864, 896), (896, 4864), (4096, 4096), (151936, 896)):
        count = max(2, (64 << 20) // (outputs * inputs // 2))
        weights = [torch.randint(-8, 8, (outputs, inputs // 128, 128), dtype=torch.int8, generator=g)
                   for _ in range(count)]
        scales = [torch.rand(outputs, inputs // 128, 1, generator=g) / 100 for _ in range(count)]
        packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu((w.reshape(outputs, inputs).int() + 8), 2)
                  for w in weights]
        tables = [torch.stack([s.reshape(outputs, -1).t(), torch.zeros(inputs // 128, outputs)], -1).bfloat16().contiguous()
                  for s in scales]
        dense = [w.reshape(outputs, inputs).bfloat16() for w in weights[:max(2, count // 4)]]  # bf16: 4x the bytes
        for rows in (1, 64):
            x = torch.randn(rows, inputs, generator=g)
            turn = iter(range(1 << 30))

            def ours():
                i = next(turn) % count
                return linear_weight_only(x, weights[i], scales[i], None, 128, None, "int4pack")

            def aten_int4():
                i = next(turn) % count
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed[i], 128, tables[i]).float()

            def bf16():
                return F.linear(x.bfloat16(), dense[next(turn) % len(dense)]).float()

            def w4a8():
                i = next(turn) % count
                x_scale, x_zero_point = choose_qparams_per_token(x, 0, 255, False)
                x_q = torch.ops.qc.quantize(x, x_scale, x_zero_point, None, 0, 255, torch.uint8)
                return linear_w4a8(x_q, x_scale, x_zero_point, weights[i], scales[i], None, 128, None, torch.float32)

            repeats = 10 if outputs * inputs > 1e8 else 40
            times = [median_ms(run, repeats=repeats, warmup=count) for run in (bf16, aten_int4, ours, w4a8)]
            rates = [f"{outputs * inputs / 2 / (t * 1e-3) / 1e9:>7.1f}" if rows == 1 else " " * 7  # bytes bound it
                     for t in (times[2], times[3])]
            print(f"{f'{outputs} x {inputs}, {rows}':<40}{times[0]:>12.3f}{times[1]:>15.3f}{times[2]:>10.3f}{rates[0]}"
                  f"{times[3]:>9.3f}{rates[1]}")
    print()


def layer_norm_quantize() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 128, 384, generator=g)
    weight, bias, multiplier = torch.randn(384, generator=g), torch.randn(384, generator=g), torch.rand(384) + 0.5
    scale, zero_point = torch.tensor([0.03]), torch.tensor([120], dtype=torch.int32)

    def aten_ops():
        y = F.layer_norm(x, [384], weight, bias, 1e-12)
        return y, torch.ops.qc.quantize(y * multiplier, scale, zero_point, None, 0, 255, torch.uint8)

    aten_ms = median_ms(aten_ops, repeats=50, warmup=5)
    print(f"{'LayerNorm + multiply + quantize, 32x128x384':<64}{'ATen':<10}{aten_ms:>8.2f}")
    for isa in native.available_isas():
        with native.running_on(isa):
            ms = median_ms(lambda: torch.ops.qc.layer_norm_quantize(x, weight, bias, 1e-12, multiplier, 0.03, 120, 0,
                                                                   255, torch.uint8), repeats=50, warmup=5)
        print(f"{'':<64}{isa:<10}{ms:>8.2f}  {aten_ms / ms:.2f}x")
    print()


def recurrence() -> None:
    """A GRU / LSTM layer as ATen runs it against its input product (one fp32 linear over every
    step) followed by ``qc.gru_recurrence`` / ``qc.lstm_recurrence``."""
    print(f"{'recurrent layer (batch x steps x inputs -> hidden)':<64}{'kernel':<10}{'ms':>8}")
    for batch, steps, inputs, hidden in ((6, 64, 64, 64), (1, 32, 256, 1024), (16, 100, 80, 256)):
        for kind in ("gru", "lstm"):
            torch.manual_seed(0)
            layer = (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(inputs, hidden, batch_first=True).eval()
            x, h0 = torch.randn(batch, steps, inputs), torch.zeros(batch, hidden)
            states = (h0,) if kind == "gru" else (h0, h0)
            op = torch.ops.qc.gru_recurrence if kind == "gru" else torch.ops.qc.lstm_recurrence

            def split(op=op, layer=layer, x=x, states=states):
                gates_x = F.linear(x, layer.weight_ih_l0, layer.bias_ih_l0)
                return op(gates_x, *states, layer.weight_hh_l0, layer.bias_hh_l0, False, True)

            label = f"{kind.upper()} {batch}x{steps}x{inputs} -> {hidden}"
            with torch.no_grad():
                aten_ms = median_ms(lambda layer=layer, x=x: layer(x), repeats=20, warmup=3)
                print(f"{label:<64}{'ATen':<10}{aten_ms:>8.3f}")
                for isa in native.available_isas():
                    ms = median_ms(lambda isa=isa, split=split: _on(isa, split), repeats=20, warmup=3)
                    print(f"{'':<64}{isa:<10}{ms:>8.3f}  {aten_ms / ms:.2f}x")
    print()


def main() -> None:
    torch.set_num_threads(2)
    call_cost()
    int8_linear()
    weight_only()
    layer_norm_quantize()
    recurrence()
    isas = native.available_isas()
    print(f"{'workload':<30}{'kernel':<34}{'ms':>8}{'vs fp32':>9}{'error':>10}")
    for name, w in workloads().items():
        q, k, v = w["qkv"]
        mask, causal = w["mask"], w["causal"]
        exact = aten(q.double(), k.double(), v.double(), None if mask is None else mask.double(), causal,
                     torch.float64)
        rows = [("ATen SDPA fp32", lambda: aten(q, k, v, mask, causal)),
                ("ATen SDPA bf16", lambda: aten(q, k, v, mask, causal, torch.bfloat16))]
        if mask is not None:
            rows.append(("bf16 bmm + softmax", lambda: bf16_bmm(q, k, v, mask, causal)))
        for isa in isas:
            rows.append((f"qc.attention ({isa})", lambda isa=isa: _on(isa, lambda: native_attention(q, k, v, mask, causal))))
        fp32_ms = None
        for label, run in rows:
            ms = median_ms(run, repeats=20, warmup=3)
            fp32_ms = fp32_ms or ms
            error = float((run().double() - exact).abs().max() / exact.abs().max())
            print(f"{name:<30}{label:<34}{ms:>8.2f}{fp32_ms / ms:>8.2f}x{error:>10.1e}")


def _on(isa: str, run):
    with native.running_on(isa):
        return run()


if __name__ == "__main__":
    main()
